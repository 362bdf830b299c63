"""Modules staged into a WASM sandbox's /sandgate folder as top-level packages (plugins/wasm/agent_dir.py),
importable by the guest's own code: `sandgate` (outbound HTTP through the host door)."""
