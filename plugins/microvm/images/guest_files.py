"""sandgate's own files in every image: the init script (PID 1), the guest agent's sources and
pytest's (staged from the host's, as for every runtime: plugins/pytest_files.py). They are part of
each image's recipe, so editing any of them (or upgrading the host's pytest) makes the image out
of date."""

from __future__ import annotations

from pathlib import Path

from plugins.common import package_dir, py_files
from plugins.pytest_files import PYTEST_DIR, pytest_files

INIT_FILE = Path(__file__).parent.parent / "guest" / "init"


def init_script() -> bytes:
    """guest/init, which becomes /opt/sandgate/init (and /init) in the image."""
    return INIT_FILE.read_bytes()


def agent_sources() -> dict[str, bytes]:
    """The guest agent's files and pytest's (for the agent's test mode), guest path below
    /opt/sandgate -> content. msgpack is Debian's, from the image's packages."""
    agent = package_dir("guest_agent")
    if agent is None:
        raise RuntimeError("the guest_agent package is not importable; run from the sandgate checkout or install")
    files = {f"guest_agent/{rel.as_posix()}": (agent / rel).read_bytes() for rel in py_files(agent)}
    files.update({f"{PYTEST_DIR}/{rel}": source.read_bytes() for rel, source in pytest_files().items()})
    return files
