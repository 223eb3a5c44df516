"""The `edgeguide-server` subcommands, one module per group; `server.cli` parses and dispatches to them."""
