"""Signal names and numbers, where the platform has signals at all (WASI has none to send)."""

from __future__ import annotations

from typing import Any

from .wire import ProtocolError


def signal_number(value: Any) -> int:
    """A signal given as a name ("SIGTERM", "TERM") or a number.

    Raises:
        ProtocolError: `bad_request` for a signal this platform does not know, `unsupported`
            where there is no signal module.
    """
    try:
        import signal
    except ImportError:
        raise ProtocolError("unsupported", "this platform has no signals") from None
    try:
        if isinstance(value, str):
            name = value.upper()
            return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        if isinstance(value, int) and not isinstance(value, bool):
            return int(signal.Signals(value))
    except (KeyError, ValueError):
        pass
    raise ProtocolError("bad_request", f"unknown signal {value!r:.40}")


def signal_name(number: int) -> str:
    try:
        import signal

        return signal.Signals(number).name
    except (ImportError, ValueError):
        return f"SIG{number}"
