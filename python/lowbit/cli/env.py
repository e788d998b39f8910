"""`lowbit env`: what a bug report needs: versions, CPU features, threads, CUDA."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

# The CPU flags the kernels dispatch on (AVX2 / AVX-512 / VNNI) and the ones fp16/bf16 paths use.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "f16c", "fma")
PACKAGES = ("lowbit", "torch", "transformers", "accelerate", "peft", "bitsandbytes")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_flags(path: str = "/proc/cpuinfo") -> dict[str, bool] | None:
    """The flags line of the first CPU; None where /proc/cpuinfo does not exist (macOS, Windows)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return {name: name in flags for name in CPU_FLAGS}
    except OSError:
        return None
    return None


def collect() -> dict:
    import torch

    import lowbit
    from lowbit import _native

    versions = {name: _version(name) for name in PACKAGES}
    versions["lowbit"] = lowbit.__version__
    # torch's own string: PyPI's CUDA wheels carry the build ("+cu130") only there, not in their
    # package metadata, and a bug report needs it.
    versions["torch"] = torch.__version__
    versions["python"] = platform.python_version()
    return {
        "versions": versions,
        "platform": platform.platform(),
        "cpu_model": platform.processor() or platform.machine(),
        "cpu_flags": _cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "lowbit_cpu_isa": _native.cpu_isa(),
        "lowbit_best_cpu_isa": _native.best_cpu_isa(),
        "lowbit_cpu_gemv_activations": _native.cpu_gemv_mode(),
        "lowbit_with_cuda": _native.with_cuda(),
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "checkpoint_formats": _formats(),
    }


# Other libraries whose checkpoints lowbit reads: none is needed to load them; the versions say
# which are present (compressed-tensors and hqq are the tests' oracles).
FORMAT_PACKAGES = ("compressed-tensors", "hqq", "gptqmodel", "auto-gptq", "autoawq", "optimum")


def _formats() -> dict:
    from lowbit.formats import SUPPORTED

    return {
        "read": {"lowbit / bitsandbytes": "int8 (LLM.int8()), nf4, fp4, double quant", **SUPPORTED},
        "libraries_present": {name: _version(name) for name in FORMAT_PACKAGES},
    }


def run(args) -> int:
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0
    for name, version in info["versions"].items():
        print(f"{name:<22}{version or 'not installed'}")
    print(f"{'platform':<22}{info['platform']}")
    flags = info["cpu_flags"]
    if flags is None:
        print(f"{'cpu flags':<22}unknown (no /proc/cpuinfo)")
    else:
        print(
            f"{'cpu flags':<22}" + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in flags.items())
        )
    print(f"{'torch cpu capability':<22}{info['torch_cpu_capability']}")
    print(f"{'threads':<22}{info['threads']} (interop {info['interop_threads']})")
    print(
        f"{'lowbit cpu kernels':<22}{info['lowbit_cpu_isa']} (best here: {info['lowbit_best_cpu_isa']});"
        f" 4-bit products with {info['lowbit_cpu_gemv_activations']} activations"
    )
    print(f"{'lowbit built w/ CUDA':<22}{'yes' if info['lowbit_with_cuda'] else 'no'}")
    print(f"{'torch CUDA':<22}{info['torch_cuda_version'] or 'none'}")
    devices = ", ".join(info["cuda_devices"]) or "none"
    print(f"{'cuda available':<22}{'yes' if info['cuda_available'] else 'no'} ({devices})")
    print("checkpoint formats lowbit reads (no other library needed to load them):")
    for method, what in info["checkpoint_formats"]["read"].items():
        print(f"  {method:<22}{what}")
    present = info["checkpoint_formats"]["libraries_present"]
    print(
        f"{'format libraries':<22}"
        + ", ".join(f"{k} {v or 'not installed'}" for k, v in present.items())
    )
    return 0
