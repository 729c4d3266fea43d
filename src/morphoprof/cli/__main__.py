"""``python -m morphoprof.cli``."""

import sys

from morphoprof.cli import main

sys.exit(main())
