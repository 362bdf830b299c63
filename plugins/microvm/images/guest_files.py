"""sandgate's own files in every image: the init script (PID 1) and the guest agent's sources.
They are part of each image's recipe, so editing either makes the image out of date."""

from __future__ import annotations

from pathlib import Path

from plugins.common import package_dir, py_files

INIT_FILE = Path(__file__).parent.parent / "guest" / "init"


def init_script() -> bytes:
    """guest/init, which becomes /opt/sandgate/init (and /init) in the image."""
    return INIT_FILE.read_bytes()


def agent_sources() -> dict[str, bytes]:
    """The guest agent's files, guest path below /opt/sandgate -> content."""
    agent = package_dir("guest_agent")
    if agent is None:
        raise RuntimeError("the guest_agent package is not importable; run from the sandgate checkout or install")
    return {f"guest_agent/{rel.as_posix()}": (agent / rel).read_bytes() for rel in py_files(agent)}
