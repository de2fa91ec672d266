"""Sub-commands of the `vss` CLI, one module each (see service/cli.py)."""
