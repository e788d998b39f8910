"""`python -m lowbit` and the `lowbit` console script."""

import sys

from lowbit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
