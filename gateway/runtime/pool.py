"""A warm pool: ready sandboxes made ahead of demand, for any runtime.

A create that finds the pool empty (or asks for something the pool does not hold) starts cold, so
the pool only ever makes starts faster. Refills are capped at `refill_per_s` and begin
`REFILL_DELAY_S` after a take, so a burst of creates cannot turn into a fork storm that slows the
creates it should serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from guest_agent.wire import ProtocolError

log = logging.getLogger(__name__)

T = TypeVar("T")

REFILL_DELAY_S = 0.05
#: After a failed make, wait this long before the next: a broken host must not spin.
BACKOFF_S = 1.0


class WarmPool(Generic[T]):
    """Args:
    name: for logs and the refill task's name.
    size: how many ready items to hold (0: no pool).
    refill_per_s: at most this many makes per second.
    make: makes one ready item (raises on failure).
    alive: whether a held item is still usable when taken.
    discard: releases an item that is not handed out (dead, or the pool is stopping).
    """

    def __init__(
        self,
        name: str,
        size: int,
        refill_per_s: float,
        *,
        make: Callable[[], Awaitable[T]],
        alive: Callable[[T], bool],
        discard: Callable[[T], Coroutine[Any, Any, None]],
    ) -> None:
        self.name = name
        self.size = size
        self.interval = 1.0 / refill_per_s if refill_per_s > 0 else 0.0
        self.ready: list[T] = []
        self._make = make
        self._alive = alive
        self._discard = discard
        self._wanted = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dead: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Begin filling. Called from the runtime's `start`."""
        if self.size > 0:
            self._task = asyncio.create_task(self._refill_forever(), name=f"{self.name}-pool")
            self._wanted.set()

    async def wait_full(self) -> None:
        """Until the pool holds `size` ready items (benchmarks and tests wait on this)."""
        await self._full.wait()

    def take(self) -> T | None:
        """A ready item, or None when the pool is empty; a refill follows either way."""
        self._full.clear()
        while self.ready:
            item = self.ready.pop(0)
            asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._wanted.set)
            if self._alive(item):
                return item
            task = asyncio.create_task(self._discard(item))
            self._dead.add(task)
            task.add_done_callback(self._dead.discard)
        self._wanted.set()
        return None

    async def _refill_forever(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while len(self.ready) < self.size:
                try:
                    item = await self._make()
                except asyncio.CancelledError:
                    raise  # `make` leaves nothing behind when cancelled
                except Exception as exc:  # never let the refill task die: log, back off, retry
                    log.error("%s warm pool: a sandbox failed to start: %s", self.name, exc,
                              exc_info=not isinstance(exc, ProtocolError | OSError | TimeoutError))
                    await asyncio.sleep(BACKOFF_S)
                    continue
                self.ready.append(item)
                if len(self.ready) >= self.size:
                    self._full.set()
                await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """Stop filling and discard what is held. Called from the runtime's `stop`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(self._discard(item) for item in self.ready), *self._dead)
        self.ready.clear()
