"""`python -m agent` runs the device agent (same as `edgeguide-agent`)."""

from agent.cli import main

raise SystemExit(main())
