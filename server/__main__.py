"""`python -m server` runs the `edgeguide-server` command line."""

import sys

from server.cli import main

sys.exit(main())
