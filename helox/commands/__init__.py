"""The `helox` commands, one module per area; `helox/cli.py` registers them."""
