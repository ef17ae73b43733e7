"""python -m kestrel: the same as the `kestrel` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
