"""Quantize models in place, and load / save Transformers-format checkpoints quantized.

from_pretrained builds the model on the meta device, swaps its linear layers for empty quantized
ones and streams the checkpoint one tensor at a time: each float weight is quantized as it
arrives, so peak memory stays near the quantized model plus one tensor. Checkpoints written by
lowbit or by Transformers + bitsandbytes (same key layout) load without re-quantization.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from lowbit.config import FORMAT_VERSION, LowbitConfig
from lowbit.nn.modules import Linear4bit, Linear8bitLt
from lowbit.nn.parameters import Int8Params, Params4bit
from lowbit.nn.replace import (
    QUANTIZED_LINEAR_TYPES,
    default_skip_modules,
    float_weight_of,
    linear_features,
    linear_layers_to_quantize,
    make_quantized_linear,
    set_submodule,
    swap_in_empty,
)

__all__ = [
    "quantize_model",
    "replace_linear_layers",
    "TensorLoader",
    "from_pretrained",
    "save_pretrained",
]

logger = logging.getLogger("lowbit")

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
METADATA = {"format": "pt", "lowbit_format_version": str(FORMAT_VERSION)}


def _progress(iterable=None, total=None, desc="", enabled=None):
    """tqdm, shown on a terminal (enabled=None), forced on (True) or off (False)."""
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)


def as_config(config) -> LowbitConfig:
    """A LowbitConfig from a LowbitConfig, a dict, or any config with to_dict() (BitsAndBytesConfig)."""
    if isinstance(config, LowbitConfig):
        return config
    if isinstance(config, dict):
        return LowbitConfig.from_dict(config)
    if hasattr(config, "to_dict"):
        return LowbitConfig.from_dict(config.to_dict())
    raise TypeError(f"expected a LowbitConfig or a dict, got {type(config).__name__}")


def _skip_list(model, config: LowbitConfig, skip_modules) -> list[str]:
    if skip_modules is not None and (
        isinstance(skip_modules, str) or not all(isinstance(s, str) for s in skip_modules)
    ):
        raise TypeError(f"skip_modules must be a list of str, got {skip_modules!r}")
    return default_skip_modules(model) + config.skip_modules + list(skip_modules or [])


def _mark_quantized(model: nn.Module, config: LowbitConfig) -> None:
    # PEFT's prepare_model_for_kbit_training looks for these flags.
    model.is_loaded_in_4bit = config.bits == 4
    model.is_loaded_in_8bit = config.bits == 8
    model.quantization_method = "lowbit"
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        hf_config.quantization_config = config


def replace_linear_layers(model: nn.Module, config, skip_modules=None) -> nn.Module:
    """Swap every quantizable linear layer (nn.Linear, Transformers' Conv1D) for an EMPTY quantized
    layer on the meta device, in place. Weights are then loaded tensor by tensor (TensorLoader,
    or the layer's load_state_dict). Returns the model."""
    config = as_config(config)
    for name in linear_layers_to_quantize(model, _skip_list(model, config, skip_modules)):
        swap_in_empty(model, name, config)
    _mark_quantized(model, config)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, config, skip_modules=None, progress=None) -> nn.Module:
    """Swap the model's linear layers for quantized copies in place (each quantized on its own
    device; bias kept), skipping lm_head, tied output layers and the skip lists. Returns the model."""
    config = as_config(config)
    if config.bits is None:
        raise ValueError("the config selects neither load_in_4bit nor load_in_8bit")
    names = linear_layers_to_quantize(model, _skip_list(model, config, skip_modules))
    for name in _progress(names, desc="Quantizing", enabled=progress):
        old = model.get_submodule(name)
        in_f, out_f = linear_features(old)
        new = make_quantized_linear(in_f, out_f, old.bias is not None, config, device="meta")
        new.source_cls = type(old)
        new.train(old.training)
        state = {"weight": float_weight_of(old)}
        if old.bias is not None:
            state["bias"] = old.bias.detach()
        new.load_state_dict(state, assign=True)
        if old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        if not old.weight.is_meta and not (config.bits == 8 and config.llm_int8_has_fp16_weight):
            new.quantize_()
        set_submodule(model, name, new)
    _mark_quantized(model, config)
    return model


# ---- loading one tensor at a time -------------------------------------------------------------


def _required_4bit(stash: dict[str, torch.Tensor]) -> set[str]:
    need = {"weight", "weight.absmax", "weight.quant_map"}
    qs = [k for k in stash if k.startswith("weight.quant_state.")]
    if not qs:
        return need | {"weight.quant_state.bitsandbytes__<nf4|fp4>"}
    try:
        meta = json.loads(bytes(stash[qs[0]].reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return set()  # let the layer's loader report the bad JSON, naming the key
    if isinstance(meta, dict) and "nested_offset" in meta:
        need |= {"weight.nested_absmax", "weight.nested_quant_map"}
    return need


class TensorLoader:
    """Places checkpoint tensors one at a time into a model prepared by replace_linear_layers.

    - a float `weight` of a quantized layer is quantized on arrival (on the layer's device),
      transposed first when the layer replaced a Conv1D;
    - pre-quantized keys (`weight` + `weight.absmax`... or `weight` + `SCB`) are gathered per layer
      and loaded when the layer's set is complete;
    - any other tensor replaces the matching parameter or buffer, cast to `dtype` if it is float.

    device_for(module_name) gives each tensor's device (default: cpu). Call finish() at the end: it
    reports incomplete quantized layers and returns the checkpoint keys the model has no place for.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, device_for=None):
        self.model = model
        self.dtype = dtype
        self.device_for = device_for or (lambda name: torch.device("cpu"))
        self.modules = dict(model.named_modules())
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.stash: dict[str, dict[str, torch.Tensor]] = {}
        self.unexpected: list[str] = []
        self.fp32_modules: set[str] = set()  # kept in float32 (fp32 CPU offload)

    # key -> (module name, local key)
    def _resolve(self, key: str) -> tuple[str, str] | None:
        candidates = [key]
        if self.prefix:
            p = self.prefix + "."
            candidates.append(key[len(p) :] if key.startswith(p) else p + key)
        for cand in candidates:
            parts = cand.split(".")
            for i in range(len(parts) - 1, -1, -1):
                mod = ".".join(parts[:i])
                if mod in self.modules:
                    local = ".".join(parts[i:])
                    if self._accepts(self.modules[mod], local):
                        return mod, local
                    break
        return None

    @staticmethod
    def _accepts(module: nn.Module, local: str) -> bool:
        if isinstance(module, QUANTIZED_LINEAR_TYPES):
            return local in ("weight", "bias", "SCB", "weight_format") or local.startswith(
                "weight."
            )
        return local in module._parameters or local in module._buffers

    def _float_dtype(self, mod_name: str, t: torch.Tensor) -> torch.dtype:
        if mod_name in self.fp32_modules or any(
            mod_name.startswith(m + ".") for m in self.fp32_modules
        ):
            return torch.float32
        return self.dtype or t.dtype

    def add(self, key: str, tensor: torch.Tensor) -> None:
        where = self._resolve(key)
        if where is None:
            self.unexpected.append(key)
            return
        mod_name, local = where
        module = self.modules[mod_name]
        device = torch.device(self.device_for(mod_name))
        full = f"{mod_name}.{local}" if mod_name else local
        if isinstance(module, QUANTIZED_LINEAR_TYPES):
            self._add_quantized(mod_name, module, local, tensor, device, full)
        else:
            self._set_plain(module, local, tensor, device, mod_name, full)

    def _set_plain(self, module, local, t, device, mod_name, full):
        old = module._parameters.get(local)
        if old is None:
            old = module._buffers.get(local)
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise ValueError(
                f"{full}: checkpoint shape {list(t.shape)} does not match the model's {list(old.shape)}"
            )
        dtype = self._float_dtype(mod_name, t) if t.is_floating_point() else t.dtype
        # copy=True: never keep a view into the checkpoint's memory map (it would pin the file).
        value = t.to(device=device, dtype=dtype, copy=True)
        if local in module._parameters:
            requires_grad = old.requires_grad if old is not None else value.is_floating_point()
            module._parameters[local] = nn.Parameter(value, requires_grad=requires_grad)
        else:
            module._buffers[local] = value

    def _add_quantized(self, mod_name, module, local, t, device, full):
        stash = self.stash.get(mod_name)
        if local == "bias":
            self._set_plain(module, "bias", t, device, mod_name, full)
            return
        if local == "weight_format" and stash is None and module.is_quantized:
            value = t.item() if t.numel() == 1 else None
            if value != 0:
                raise ValueError(f"{full}: only the row-major format (0) is supported, got {value}")
            return
        # A float [out, in] (Conv1D: [in, out]) weight; packed 4-bit data is [n, 1] or integer.
        is_float_weight = (
            local == "weight"
            and stash is None
            and t.is_floating_point()
            and _float_shape_ok(module, t)
        )
        if is_float_weight:
            self._quantize_float(mod_name, module, t, device, full)
            return
        stash = self.stash.setdefault(mod_name, {})
        stash[local] = t.to(device=device, copy=True)
        if self._complete(module, stash):
            self._flush(mod_name, module)

    def _quantize_float(self, mod_name, module, t, device, full):
        if is_conv1d_source(module):
            t = t.t()
        w = t.to(device=device, dtype=self._float_dtype(mod_name, t), copy=True).contiguous()
        if isinstance(module, Linear4bit):
            old = module.weight
            module.weight = Params4bit(
                w,
                requires_grad=False,
                blocksize=old.blocksize,
                compress_statistics=old.compress_statistics,
                quant_type=old.quant_type,
                quant_storage=old.quant_storage,
            )
        else:
            has_fp16 = module.weight.has_fp16_weights
            module.weight = Int8Params(w, requires_grad=has_fp16, has_fp16_weights=has_fp16)
        if not (isinstance(module, Linear8bitLt) and module.weight.has_fp16_weights):
            module.quantize_()

    @staticmethod
    def _complete(module, stash) -> bool:
        if isinstance(module, Linear8bitLt):
            return "weight" in stash and "SCB" in stash
        need = _required_4bit(stash)
        return bool(need) and need <= set(stash)

    def _flush(self, mod_name: str, module) -> None:
        stash = self.stash.pop(mod_name)
        prefix = f"{mod_name}." if mod_name else ""
        errors: list[str] = []
        module._load_from_state_dict(
            {prefix + k: v for k, v in stash.items()}, prefix, {}, False, [], [], errors
        )
        if errors:
            raise ValueError("; ".join(errors))

    def finish(self) -> list[str]:
        """Load (and so validate) every incomplete layer; returns the unexpected keys."""
        for mod_name in list(self.stash):
            module = self.modules[mod_name]
            need = (
                {"weight", "SCB"}
                if isinstance(module, Linear8bitLt)
                else _required_4bit(self.stash[mod_name])
            )
            missing = sorted(need - set(self.stash[mod_name]))
            if missing:
                raise ValueError(
                    f"{mod_name}: incomplete quantized weight, missing "
                    + ", ".join(f"{mod_name}.{k}" for k in missing)
                )
            self._flush(mod_name, module)
        return self.unexpected


def is_conv1d_source(module: nn.Module) -> bool:
    src = getattr(module, "source_cls", None)
    return src is not None and src.__name__ == "Conv1D"


def _float_shape_ok(module, t) -> bool:
    shape = (
        (module.in_features, module.out_features)
        if is_conv1d_source(module)
        else (
            module.out_features,
            module.in_features,
        )
    )
    return tuple(t.shape) == shape


def load_tensor(model: nn.Module, key: str, tensor: torch.Tensor, dtype=None, device="cpu") -> None:
    """Place one checkpoint tensor (float weight: quantized on arrival). For pre-quantized
    checkpoints, whose layers need several keys, keep one TensorLoader for the whole load."""
    loader = TensorLoader(model, dtype=dtype, device_for=lambda name: device)
    loader.add(key, tensor)
    loader.finish()


# ---- checkpoints on disk ----------------------------------------------------------------------


def _checkpoint_files(path: Path, allow_pickle: bool) -> list[Path]:
    if (path / SAFE_INDEX).is_file():
        index = json.loads((path / SAFE_INDEX).read_text())
        return [path / f for f in dict.fromkeys(index["weight_map"].values())]
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    has_bin = (path / BIN_INDEX).is_file() or (path / BIN_SINGLE).is_file()
    if has_bin and not allow_pickle:
        raise FileNotFoundError(
            f"{path} holds only pickled weights ({BIN_SINGLE}); lowbit reads safetensors by "
            "default. Pass allow_pickle=True to read them with torch.load(weights_only=True)."
        )
    if (path / BIN_INDEX).is_file():
        index = json.loads((path / BIN_INDEX).read_text())
        return [path / f for f in dict.fromkeys(index["weight_map"].values())]
    if (path / BIN_SINGLE).is_file():
        return [path / BIN_SINGLE]
    raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path}")


def _iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".bin":
        # mmap keeps the pickle's tensors on disk until touched; weights_only refuses code.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        for key in list(state):
            yield key, state.pop(key)
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:
        # One open per tensor: safe_open memory-maps the whole file and every page read stays
        # resident until the file is closed, so a long-lived handle would grow to the shard size.
        with safe_open(str(file), framework="pt") as f:
            t = f.get_tensor(key)
        yield key, t
        del t


def _count_tensors(files: list[Path]) -> int | None:
    from safetensors import safe_open

    n = 0
    for file in files:
        if file.suffix == ".bin":
            return None
        with safe_open(str(file), framework="pt") as f:
            n += len(list(f.keys()))
    return n


# ---- device maps ------------------------------------------------------------------------------

_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _is_accelerator(device) -> bool:
    d = str(device)
    return d not in ("cpu", "disk", "meta")


def _normalize_device(d):
    if isinstance(d, int):
        return f"cuda:{d}"
    return str(d)


def _infer_device_map(model, device_map, config, dtype, skip, max_memory):
    try:
        from accelerate import infer_auto_device_map
        from accelerate.utils import CustomDtype, get_balanced_memory
    except ImportError:
        if torch.cuda.is_available():
            raise ImportError(f"device_map={device_map!r} needs accelerate installed") from None
        return {"": "cpu"}
    special = {}
    if config is not None and config.bits is not None:
        small = CustomDtype.INT4 if config.bits == 4 else torch.int8
        special = {f"{n}.weight": small for n in linear_layers_to_quantize(model, skip)}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    kwargs = {"no_split_module_classes": no_split, "dtype": dtype, "special_dtypes": special}
    if device_map != "sequential" and max_memory is None:
        max_memory = get_balanced_memory(
            model, low_zero=device_map == "balanced_low_0", max_memory=max_memory, **kwargs
        )
    return dict(infer_auto_device_map(model, max_memory=max_memory, **kwargs))


def _device_lookup(device_map: dict[str, str]):
    entries = sorted(device_map.items(), key=lambda kv: -len(kv[0]))

    def device_of(module_name: str) -> str:
        for prefix, dev in entries:
            if prefix == "" or module_name == prefix or module_name.startswith(prefix + "."):
                return dev
        raise ValueError(
            f"device_map does not place module {module_name!r} (add it or an ancestor)"
        )

    return device_of


def _resolve_device_map(model, device_map, config, dtype, skip, max_memory):
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, str) and device_map in _AUTO_MAPS:
        return _infer_device_map(model, device_map, config, dtype, skip, max_memory)
    if isinstance(device_map, (str, int, torch.device)):
        return {"": _normalize_device(device_map)}
    if isinstance(device_map, dict):
        return {k: _normalize_device(v) for k, v in device_map.items()}
    raise TypeError(f"device_map must be 'cpu', 'auto', a device or a dict, got {device_map!r}")


# ---- from_pretrained --------------------------------------------------------------------------


def _resolve_dtype(torch_dtype, hf_config) -> torch.dtype | None:
    """None / "auto": the checkpoint's dtype (config.json "dtype" / "torch_dtype" when given)."""
    if torch_dtype is None or torch_dtype == "auto":
        saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        torch_dtype = saved
        if torch_dtype is None:
            return None
    if isinstance(torch_dtype, str):
        name = torch_dtype.removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"torch_dtype {torch_dtype!r} is not a torch dtype name")
        torch_dtype = getattr(torch, name)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise TypeError(f"torch_dtype must be a floating torch.dtype, got {torch_dtype!r}")
    return torch_dtype


def _model_class(hf_config):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(hf_config, "architectures", None) or [])
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(a in causal or a.endswith("ForCausalLM") for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _requested_config(load_in_8bit, load_in_4bit, quantization_config) -> LowbitConfig | None:
    if quantization_config is not None:
        if load_in_8bit or load_in_4bit:
            raise ValueError(
                "pass either quantization_config or load_in_8bit/load_in_4bit, not both"
            )
        return as_config(quantization_config)
    if load_in_8bit or load_in_4bit:
        return LowbitConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    return None


def _merge_saved(saved: LowbitConfig, requested: LowbitConfig | None) -> LowbitConfig:
    """A pre-quantized checkpoint keeps its format; only loading attributes may change."""
    if requested is None or requested.bits is None:
        return saved
    same = requested.bits == saved.bits and (
        saved.bits != 4
        or (requested.bnb_4bit_quant_type, requested.bnb_4bit_use_double_quant)
        == (saved.bnb_4bit_quant_type, saved.bnb_4bit_use_double_quant)
    )
    if not same:
        raise ValueError(
            f"the checkpoint is already quantized ({saved.quantization_method()}, double quant "
            f"{saved.bnb_4bit_use_double_quant}); it cannot be loaded as "
            f"{requested.quantization_method()} (double quant {requested.bnb_4bit_use_double_quant})"
        )
    merged = saved.to_dict()
    for k, v in requested.get_loading_attributes().items():
        merged[k] = v if not isinstance(v, torch.dtype) else str(v).removeprefix("torch.")
    return LowbitConfig.from_dict(merged)


def _saved_quant_config(hf_config) -> LowbitConfig | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qd = qc if isinstance(qc, dict) else qc.to_dict()
    method = getattr(qd.get("quant_method"), "value", qd.get("quant_method"))
    if method is None and any(k in qd for k in ("load_in_4bit", "load_in_8bit", "bits")):
        method = (
            "bitsandbytes"  # diff-serialised BitsAndBytesConfig: defaults (and method) left out
        )
    if method not in ("lowbit", "bitsandbytes"):
        raise ValueError(
            f"cannot load a checkpoint quantized with {method!r}; lowbit reads lowbit and bitsandbytes checkpoints"
        )
    return LowbitConfig.from_dict(qd)


def from_pretrained(
    path,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    quantization_config=None,
    device_map=None,
    torch_dtype=None,
    skip_modules=None,
    *,
    allow_pickle: bool = False,
    max_memory=None,
    offload_folder=None,
    model_class=None,
    trust_remote_code: bool = False,
    progress: bool | None = None,
):
    """Load a Transformers-format directory quantized, streaming it tensor by tensor.

    The model class comes from config.json's `architectures` (AutoModelForCausalLM for causal LMs,
    else AutoModel; `model_class` overrides). A checkpoint already quantized by lowbit or by
    Transformers + bitsandbytes loads as saved. Only safetensors are read unless
    allow_pickle=True (then torch.load(weights_only=True)).

    device_map: None/"cpu", a device, "auto" (through accelerate), or a {module prefix: device}
    dict. With an accelerator in the map, modules mapped to "cpu"/"disk" need
    llm_int8_enable_fp32_cpu_offload=True and then stay unquantized in float32.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json (expected a Transformers model directory)"
        )
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    saved = _saved_quant_config(hf_config)
    requested = _requested_config(load_in_8bit, load_in_4bit, quantization_config)
    config = _merge_saved(saved, requested) if saved is not None else requested
    if config is not None and config.bits is None:
        config = None
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # keep Transformers' own quantizers out of from_config
    dtype = _resolve_dtype(torch_dtype, hf_config)
    files = _checkpoint_files(path, allow_pickle)

    cls = model_class or _model_class(hf_config)
    model = _build_empty(cls, hf_config, trust_remote_code)
    skip = _skip_list(model, config, skip_modules) if config is not None else []
    dmap = _resolve_device_map(model, device_map, config, dtype, skip, max_memory)
    device_of = _device_lookup(dmap)
    for name, mod in model.named_modules():  # every module holding tensors needs a place
        if next(mod.parameters(recurse=False), None) is not None:
            device_of(name)
    accel = any(_is_accelerator(d) for d in dmap.values())
    offloaded = [m for m, d in dmap.items() if d in ("cpu", "disk")] if accel else []
    if offloaded and config is not None:
        if saved is not None:
            raise ValueError("a pre-quantized checkpoint cannot keep offloaded modules in float32")
        if not config.llm_int8_enable_fp32_cpu_offload:
            raise ValueError(
                f"device_map puts {offloaded} on cpu/disk next to accelerator modules; set "
                "llm_int8_enable_fp32_cpu_offload=True to keep those modules unquantized in float32"
            )
        skip = skip + offloaded
    if not accel and "disk" in dmap.values():
        logger.warning(
            "device_map 'disk' entries without an accelerator are loaded into CPU memory"
        )

    if config is not None:
        replace_linear_layers(model, config, skip)

    def device_for(name: str) -> str:
        # "disk" modules are read into CPU memory; with an accelerator, dispatch offloads them.
        dev = device_of(name)
        return "cpu" if dev == "disk" else dev

    loader = TensorLoader(model, dtype=dtype, device_for=device_for)
    loader.fp32_modules = set(offloaded)
    bar = _progress(total=_count_tensors(files), desc="Loading", enabled=progress)
    for file in files:
        for key, tensor in _iter_tensors(file):
            loader.add(key, tensor)
            del tensor
            bar.update(1)
    bar.close()
    unexpected = loader.finish()
    if unexpected:
        logger.warning("checkpoint keys the model does not use: %s", unexpected[:20])
    _finalize(model, device_for)
    if accel and (len(set(dmap.values())) > 1 or offloaded):
        _dispatch(model, dmap, offload_folder)
    model.eval()
    return model


def _build_empty(cls, hf_config, trust_remote_code):
    try:
        from accelerate import init_empty_weights
    except ImportError:
        init_empty_weights = None
    if init_empty_weights is not None:
        # include_buffers=False: non-persistent buffers (rotary inv_freq) are computed for real.
        with init_empty_weights(include_buffers=False):
            return cls.from_config(hf_config, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return cls.from_config(hf_config, trust_remote_code=trust_remote_code)


def _finalize(model: nn.Module, device_for) -> None:
    """Tie weights, then initialise (with a warning) anything the checkpoint did not hold."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if not missing:
        return
    for name in missing:
        mod_name = name.rpartition(".")[0]
        module = model.get_submodule(mod_name)
        if isinstance(module, QUANTIZED_LINEAR_TYPES):
            raise ValueError(
                f"{name}: missing from the checkpoint (a quantized layer needs its weight)"
            )
    logger.warning("weights missing from the checkpoint, newly initialised: %s", missing[:20])
    for mod_name in dict.fromkeys(n.rpartition(".")[0] for n in missing):
        module = model.get_submodule(mod_name)
        module.to_empty(device=device_for(mod_name), recurse=False)
        init = getattr(model, "_init_weights", None)
        if callable(init):
            init(module)
    if callable(tie):
        tie()


def _dispatch(model, device_map, offload_folder):
    from accelerate import dispatch_model

    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("device_map sends modules to 'disk': pass offload_folder")
    dispatch_model(model, device_map=device_map, offload_dir=offload_folder)


# ---- save_pretrained --------------------------------------------------------------------------


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _model_quant_config(model) -> LowbitConfig | None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qc, LowbitConfig):
        return qc
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LINEAR_TYPES)]
    if not layers:
        return None
    first = layers[0]
    if isinstance(first, Linear4bit):
        return LowbitConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=first.weight.quant_type,
            bnb_4bit_use_double_quant=bool(first.weight.compress_statistics),
            bnb_4bit_compute_dtype=first.compute_dtype,
        )
    return LowbitConfig(load_in_8bit=True, llm_int8_threshold=first.threshold)


def _dedupe_shared(
    state: dict[str, torch.Tensor], tied_first: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Drop all but one name of tensors sharing memory (tied weights), as Transformers does;
    the loader ties them again. Names in `tied_first` (the tied copies) are dropped first."""
    tied = set(tied_first)
    seen: dict[tuple, str] = {}
    order = sorted(state, key=lambda k: k in tied)
    out = {}
    for k in order:
        t = state[k]
        sig = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.dtype,
        )
        if t.numel() and sig in seen:
            continue
        seen[sig] = k
        out[k] = t
    return {k: out[k] for k in state if k in out}


def save_pretrained(model: nn.Module, path, max_shard_size="5GB") -> None:
    """Write model.safetensors (sharded with an index past max_shard_size) in bitsandbytes' key
    layout, and config.json carrying {"quant_method": "lowbit", ...} (no load_in_* keys)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    state = _dedupe_shared(model.state_dict(), list(tied))
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / SAFE_INDEX]:
        if old.exists():
            old.unlink()  # stale shards from an earlier save would shadow the new index
    if len(shards) == 1:
        save_file(shards[0], str(path / SAFE_SINGLE), metadata=METADATA)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata=METADATA)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total, **METADATA}, "weight_map": weight_map}
        (path / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_config(model, path)


def _write_config(model, path: Path) -> None:
    hf_config = getattr(model, "config", None)
    d = {}
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        d = hf_config.to_dict()
    d.pop("quantization_config", None)
    if not d.get("architectures") and hasattr(model, "config"):
        d["architectures"] = [type(model).__name__]
    qc = _model_quant_config(model)
    if qc is not None:
        d["quantization_config"] = qc.to_dict()
    d = {
        k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
        for k, v in d.items()
    }
    (path / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True, default=str) + "\n")
