"""The sandgate guest agent: runs inside every sandbox and speaks docs/protocol.md on a byte channel.

Stdlib + msgpack only (msgpack's pure-Python fallback must do): it runs under host CPython,
CPython-on-WASI, a microVM's Python and a pod's Python. It never imports the gateway.
"""

__version__ = "0.1.0"
