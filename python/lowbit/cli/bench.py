"""`lowbit bench`: a dispatcher to `lowbit.bench`, which the CPU benchmark suite provides.

The benchmarks live with their owner (benchmarks/ and python/lowbit/bench.py); the CLI only
forwards its arguments so that `python -m lowbit bench --device cpu` has a stable spelling.
"""

from __future__ import annotations

import importlib
import importlib.util

from lowbit.cli.errors import CliError


def run(args) -> int:
    if importlib.util.find_spec("lowbit.bench") is None:
        raise CliError(
            "benchmarks are not available in this install (no module lowbit.bench); "
            "from a source checkout run the scripts in benchmarks/"
        )
    bench = importlib.import_module("lowbit.bench")
    if not callable(getattr(bench, "main", None)):
        raise CliError("lowbit.bench has no main(argv) entry point")
    rc = bench.main(list(args.bench_args))
    return 0 if rc is None else int(rc)
