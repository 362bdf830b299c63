"""One thread that runs callbacks at given times (host only: deadlines and keepalives)."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._log import log_exception


@dataclass(order=True)
class Timer:
    when: float
    order: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


#: How long `Scheduler.stop` waits for the timer thread.
STOP_TIMEOUT_S = 5.0


class Scheduler:
    """Runs each callback once, on the scheduler's thread, at or after its time."""

    def __init__(self, *, stop_timeout: float = STOP_TIMEOUT_S) -> None:
        self.stop_timeout = stop_timeout
        self._heap: list[Timer] = []
        self._cond = threading.Condition(threading.Lock())
        self._counter = itertools.count()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agent-timers", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, next(self._counter), callback)
        with self._cond:
            heapq.heappush(self._heap, timer)
            self._cond.notify()
        return timer

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            # Bounded: a callback may be blocked writing to a peer that is gone (a keepalive to a
            # disconnected port), and shutdown must not wait on it. The thread is a daemon.
            self._thread.join(self.stop_timeout)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0].when <= now:
                    timer = heapq.heappop(self._heap)
                    if not timer.cancelled:
                        due.append(timer)
                if due:
                    self._cond.release()
                    try:
                        for timer in due:
                            try:
                                timer.callback()
                            except Exception:
                                log_exception("a timer callback failed")
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(self._heap[0].when - now if self._heap else None)
