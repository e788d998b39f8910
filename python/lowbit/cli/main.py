"""The command line: `python -m lowbit {demo,quantize,inspect,env,bench}`.

Each command lives in its own module and is imported only when it runs, so `lowbit env` does not
pay for transformers and `--help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lowbit.cli.errors import CliError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="quantize all-MiniLM-L6-v2 to int8/NF4/FP4 and compare memory, speed, accuracy",
        description="Quantize a sentence-embedding model (default: the bundled all-MiniLM-L6-v2) "
        "to LLM.int8(), NF4 and FP4, and print memory, load+quantize time, forward latency and "
        "the cosine similarity of the embeddings to the fp32 model.",
    )
    p.add_argument("--model", metavar="DIR", help="a Transformers encoder checkpoint directory")
    p.add_argument("--sentences", metavar="FILE", help="sentences to embed, one per line")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes (default 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--formats",
        metavar="LIST",
        help="instead: write int4 g128 checkpoints in other libraries' formats (comma-separated: "
        "hqq, compressed-tensors, compressed-tensors-gptq), load their checkpoints with lowbit and compare to fp32",
    )


def _add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a quantized checkpoint directory",
        description="Load SRC (a Transformers checkpoint directory), quantize its Linear layers "
        "and write DST, loadable by lowbit.from_pretrained and by Transformers with lowbit.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--bits", type=int, choices=(4, 8), required=True)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the scales too")
    p.add_argument(
        "--threshold", type=float, default=6.0, help="8-bit: LLM.int8() outlier threshold"
    )
    p.add_argument(
        "--compute-dtype",
        choices=("float32", "float16", "bfloat16"),
        help="4-bit compute dtype (default: the model's dtype)",
    )
    p.add_argument("--skip", default="", help="comma-separated module names to keep in float")
    p.add_argument("--force", action="store_true", help="write into a non-empty DST")


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-layer formats, sizes and error statistics of a checkpoint",
        description="List every weight of a checkpoint directory with its format "
        "(int8/nf4/fp4/float, or the GPTQ/AWQ/compressed-tensors/HQQ layers decoded by lowbit's "
        "readers), shape, bytes and bits per weight. With --reference, compare each quantized "
        "weight to the original; without it, summarise the stored scales.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--reference", metavar="SRC", help="the unquantized checkpoint")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_env(sub) -> None:
    p = sub.add_parser(
        "env",
        help="versions, CPU features and CUDA status for bug reports",
        description="Print the versions of lowbit and its dependencies, the CPU features and the "
        "CPU kernels in use (LOWBIT_CPU_ISA forces one), the CUDA status, the checkpoint formats "
        "lowbit reads and which of those formats' own libraries happen to be installed.",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_bench(sub) -> None:
    # add_help=False: `lowbit bench --help` is answered by the benchmark module itself.
    sub.add_parser(
        "bench",
        add_help=False,
        help="run the benchmarks (arguments go to lowbit.bench, e.g. --device cpu)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lowbit",
        description="lowbit: low-bit weight quantization for PyTorch (LLM.int8(), NF4/FP4; "
        "GPTQ, AWQ, compressed-tensors and HQQ checkpoints).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_quantize, _add_inspect, _add_env, _add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # Everything after `bench` belongs to the benchmark module, which has its own parser.
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        import lowbit

        print(lowbit.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        module = importlib.import_module(f"lowbit.cli.{args.command}")
        return module.run(args)
    except CliError as e:
        # One line, even when the message wraps a library error that spans several.
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `lowbit env | head`: the reader has gone; point stdout at devnull so the interpreter's
        # final flush does not raise again, and exit quietly as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130
