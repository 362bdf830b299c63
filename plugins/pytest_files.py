"""pytest as every sandbox carries it, for the agent's test mode (guest_agent/testrun.py).

The host's own pytest and the pure-Python modules it imports are staged beside the agent, in a
folder of their own (PYTEST_DIR) that guest_agent/testrun.py puts on sys.path for a test run
only: ordinary execs never see them, so they never shadow a sandbox's own packages.

What is staged is what pytest can import: every module of `pytest` and `_pytest` (pytest
loads its built-in plugins by name), then, transitively, every module their import statements
name in the packages pytest depends on, read from the sources without importing anything. So
pluggy and iniconfig come whole, and of pygments (4.5 MB of sources, most of them lexers for
other languages, which pytest never loads) only the ~20 modules pytest's terminal writer imports:
the microVM's initramfs is copied by the kernel at every boot, and the WASM folder is compiled
by the guest's CPython once per content, so the staged size is a cost paid often.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

#: The folder beside guest_agent/ that holds pytest (guest_agent/testrun.py names it too).
PYTEST_DIR = "pytest_libs"
#: Staged whole: pytest imports its own plugins by name, which no import statement shows.
WHOLE = ("pytest", "_pytest", "py")
#: Top-level names pytest's imports may lead to (its dependencies on Python 3.11+; `py` is
#: pytest's one-file shim of pylib's py.path). Imports of anything else (the stdlib, optional
#: extras behind try/except) are not followed.
REACHABLE = (*WHOLE, "pluggy", "iniconfig", "packaging", "pygments")


def _top_level(name: str) -> Path | None:
    """The file of a top-level module or the folder of a top-level package, found without
    importing it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin else None


class _Modules:
    """Dotted module names -> source files, below the top-level packages in REACHABLE."""

    def __init__(self) -> None:
        self.roots: dict[str, Path] = {}
        for name in REACHABLE:
            root = _top_level(name)
            if root is None:
                raise RuntimeError(f"{name!r} (pytest, or one of its dependencies) is not installed")
            self.roots[name] = root

    def source(self, dotted: str) -> Path | None:
        """The module's source file (a package's __init__.py); None for a name that is not a
        module (an attribute imported with `from x import y`) or lies outside REACHABLE."""
        top, *rest = dotted.split(".")
        root = self.roots.get(top)
        if root is None:
            return None
        if root.is_file():
            return root if not rest else None
        base = root.joinpath(*rest)
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        return None

    def name_of(self, source: Path) -> str:
        for top, root in self.roots.items():
            if source == root:
                return top
            if root.is_dir() and source.is_relative_to(root):
                parts = source.relative_to(root).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                return ".".join((top, *parts))
        raise ValueError(source)

    def rel(self, source: Path) -> str:
        """The path below PYTEST_DIR the source is staged at."""
        for top, root in self.roots.items():
            if source == root:
                return source.name
            if root.is_dir() and source.is_relative_to(root):
                return f"{top}/{source.relative_to(root).as_posix()}"
        raise ValueError(source)


# Import statements, found with a regular expression rather than `ast`: ~20 ms for pytest's
# 2 MB of sources instead of ~1.5 s (this runs at every gateway start). Each must begin a line,
# as they do in pytest and its dependencies (no `x; import y`); a match inside a string only
# stages a module more, never one less.
_FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|(?:[^\n\\]|\\\n)*)", re.M)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+((?:[^\n\\]|\\\n)*)", re.M)
_COMMENT = re.compile(r"#[^\n]*")


def _names(listed: str) -> list[str]:
    """`a.b as c, d` (or a parenthesised, commented, continued list) -> ["a.b", "d"]."""
    listed = _COMMENT.sub("", listed).replace("\\\n", " ").strip("() \t\n")
    return [item.split()[0] for item in listed.split(",") if item.strip()]


def _imported_names(source: Path, module: str) -> set[str]:
    """Every dotted name an import statement in `source` names (for `from a import b`, both
    `a` and `a.b`, as `b` may be a submodule), relative imports resolved, and their parents."""
    text = source.read_text(encoding="utf-8")
    bases: list[str] = []
    names: set[str] = set()
    for match in _IMPORT.finditer(text):
        bases += _names(match.group(1))
    for match in _FROM_IMPORT.finditer(text):
        base = match.group(1)
        level = len(base) - len(base.lstrip("."))
        if level:
            package = module.split(".")
            package = package if source.name == "__init__.py" else package[:-1]
            package = package[: len(package) - (level - 1)]
            base = ".".join([*package, *([base[level:]] if base[level:] else [])])
        bases.append(base)
        names.update(f"{base}.{name}" for name in _names(match.group(2)) if name != "*")
    for base in bases:
        parts = base.split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)) if all(parts[: i + 1]))
    return names


@functools.cache
def pytest_files() -> dict[str, Path]:
    """pytest and what it imports: path below PYTEST_DIR -> host source file (module docstring).

    Raises:
        RuntimeError: pytest or one of its dependencies is not installed on the host.
    """
    from plugins.common import py_files

    modules = _Modules()
    todo: list[Path] = []
    for name in WHOLE:
        root = modules.roots[name]
        todo += [root] if root.is_file() else [root / rel for rel in py_files(root)]
    seen: set[Path] = set()
    while todo:
        source = todo.pop()
        if source in seen:
            continue
        seen.add(source)
        name = modules.name_of(source)
        # a module's parent packages run first when it is imported
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        for dotted in [*parents, *_imported_names(source, name)]:
            found = modules.source(dotted)
            if found is not None and found not in seen:
                todo.append(found)
    return {modules.rel(source): source for source in sorted(seen)}


def stage(dest: Path) -> None:
    """Copy `pytest_files()` into `dest` (helm/Dockerfile.agent stages the image's copy so)."""
    import shutil

    for rel, source in pytest_files().items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / rel)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m plugins.pytest_files DEST")
    stage(Path(sys.argv[1]))
