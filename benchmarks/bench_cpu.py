"""CPU benchmark table: the same as `python -m lowbit bench --device cpu` (see lowbit/bench.py)."""

import sys

from lowbit.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
