"""``python -m morphoprof``: the command-line interface."""

import sys

from morphoprof.cli import main

if __name__ == "__main__":
    sys.exit(main())
