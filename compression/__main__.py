"""``python -m compression`` = ``edgeguide-compress``."""

import sys

from compression.cli import main

sys.exit(main())
