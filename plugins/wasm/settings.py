"""`[runtimes.wasm]`: the WASM runtime's settings, checked once at gateway start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from gateway.config import ConfigError, check_fields, check_keys, check_positive


def mem_total_mb() -> int:
    """The host's MemTotal in MiB (from /proc/meminfo), or 0 when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def default_max_total_disk_mb() -> int:
    """The host's memory: every sandbox's /work is a tmpfs (RAM, or swap), so the sum of the
    quotas must not promise more than the host has; tmpfs takes memory only as files are
    written, so a gateway of mostly-empty sandboxes still leaves room for the guests' memory."""
    return max(1, mem_total_mb())


@dataclass(frozen=True)
class WasmSettings:
    """Every `[runtimes.wasm]` setting (README: Configuration)."""

    #: Warm launchers kept ready, and how fast the pool refills.
    pool_size: int = 2
    pool_refill_per_s: float = 4.0
    #: The limits of pooled sandboxes: a create asking for exactly these takes a warm launcher.
    memory_mb: int = 256
    cpu_seconds: float = 600.0
    disk_mb: int = 512
    #: The sum of `disk_mb` over this gateway's live WASM sandboxes, warm pool included; a create
    #: beyond it answers `unavailable`. 0 means the default: the host's MemTotal.
    max_total_disk_mb: int = 0
    #: The folder holding Ruby's and PHP's wasm files (plugins.wasm.runno); "" means the cache's,
    #: where `sandgate images build wasm` puts them. Absolute.
    runno_dir: str = ""

    #: C and C++: each jailed compile's wall-clock limit, CPU per compiler process (also capped
    #: by the sandbox's remaining budget), address space per compiler process, and scratch tmpfs
    #: (source, objects, the module); see plugins/wasm/jail.py.
    compile_timeout_s: float = 60.0
    compile_cpu_s: float = 60.0
    compile_memory_mb: int = 1024
    compile_disk_mb: int = 256
    #: Compiles running at once across the gateway (more wait); 0 means one per CPU core.
    compile_concurrency: int = 0
    #: The compiled C/C++ programs kept (by source); the least recently run go first beyond it.
    compiled_cache_mb: int = 1024
    #: The largest response body one `sandgate.fetch` (or urllib request) reads (plugins/wasm/fetch.py).
    fetch_max_response_mb: int = 64


    def __post_init__(self) -> None:
        check_fields(self, "[runtimes.wasm] ")
        check_positive(self, "[runtimes.wasm] ", zero_ok=("pool_size", "max_total_disk_mb", "compile_concurrency"))
        if self.runno_dir and not os.path.isabs(self.runno_dir):
            raise ConfigError(f"[runtimes.wasm] runno_dir must be an absolute path, not {self.runno_dir!r}")
        if self.max_total_disk_mb == 0:  # never below what the pool alone holds
            object.__setattr__(self, "max_total_disk_mb", max(default_max_total_disk_mb(),
                                                              self.pool_size * self.disk_mb))
        if self.pool_size and self.pool_size * self.disk_mb > self.max_total_disk_mb:
            raise ConfigError(f"[runtimes.wasm] the warm pool alone ({self.pool_size} x {self.disk_mb} MB) "
                              f"exceeds max_total_disk_mb = {self.max_total_disk_mb}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WasmSettings:
        """Raises ConfigError (a ValueError) naming the bad setting."""
        check_keys(config, (f.name for f in fields(cls)), "[runtimes.wasm]")
        return cls(**config)
