"""The built-in WASM runtime (see `plugin.py` for its registration). Kept empty: the launcher
process imports this package at every sandbox start."""
