"""The backend contract every runtime implements (see docs/plugins.md)."""

from gateway.runtime.base import (
    Backend,
    ByteChannel,
    Runtime,
    RuntimeRegistry,
    SandboxSpec,
    StreamChannel,
)

__all__ = ["Backend", "ByteChannel", "Runtime", "RuntimeRegistry", "SandboxSpec", "StreamChannel"]
