"""The one language table: every `language` a request may name, its aliases, its source file, and
how a guest with processes compiles and runs it (sans-I/O, stdlib only).

Everything that knows something about a language takes it from here: the schema's exec.start
(which canonicalises an alias before anything else sees it), the agent (which languages it can run
as processes, by the programs it finds: its `exec.<id>` capabilities), the gateway's
`unsupported` answers and `GET /v1/runtimes`, the function harnesses and the MCP server. A runtime
that runs a language itself (WASM's QuickJS, Ruby, PHP) declares `exec.<id>` for it; the recipe
below is for guests that run programs (microVM templates, pod images).

A recipe is argv lists with placeholders: `{src}` the source file, `{dir}` a fresh private
directory holding it, `{out}` a binary to build there, `{main}` the Java class with `main`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .wire import ProtocolError


@dataclass(frozen=True)
class Language:
    id: str
    #: Other names a request may use (lower case).
    aliases: tuple[str, ...]
    #: The source file's name in its directory (Java wants the class's name: found from the code).
    filename: str
    #: Compile step (None: interpreted), then the run step.
    compile: tuple[str, ...] | None
    run: tuple[str, ...]
    #: Extra environment for both steps ({dir} is expanded): toolchains that want a writable home.
    env: tuple[tuple[str, str], ...] = ()

    @property
    def programs(self) -> tuple[str, ...]:
        """The programs a guest needs on its PATH to offer this language as a process."""
        steps = [self.run] + ([self.compile] if self.compile else [])
        return tuple(dict.fromkeys(step[0] for step in steps if not step[0].startswith("{")))


LANGUAGES: tuple[Language, ...] = (
    Language("python", ("py", "python3"), "main.py", None, ("python3", "{src}")),
    Language("javascript", ("js", "node", "nodejs"), "main.js", None, ("node", "{src}")),
    Language("ruby", ("rb",), "main.rb", None, ("ruby", "{src}")),
    Language("php", (), "main.php", None, ("php", "{src}")),
    Language("c", (), "main.c", ("gcc", "-O1", "-o", "{out}", "{src}", "-lm"), ("{out}",)),
    Language("cpp", ("c++", "cxx"), "main.cpp", ("g++", "-O1", "-o", "{out}", "{src}"), ("{out}",)),
    Language("go", ("golang",), "main.go", None, ("go", "run", "{src}"),
             env=(("GOCACHE", "{dir}/.gocache"), ("GOPATH", "{dir}/.gopath"), ("GO111MODULE", "off"))),
    Language("java", (), "{main}.java", ("javac", "-d", "{dir}", "{src}"), ("java", "-cp", "{dir}", "{main}")),
    Language("rust", ("rs",), "main.rs", ("rustc", "-C", "opt-level=1", "-o", "{out}", "{src}"), ("{out}",)),
)

BY_ID: dict[str, Language] = {lang.id: lang for lang in LANGUAGES}
_BY_NAME: dict[str, Language] = {name: lang for lang in LANGUAGES for name in (lang.id, *lang.aliases)}


def canonical(name: str) -> str:
    """The language id `name` (an id or an alias, any case) stands for; unknown names are kept as
    they are, so the sandbox's capabilities decide (a runtime may offer a language of its own)."""
    lang = _BY_NAME.get(name.lower())
    return lang.id if lang is not None else name


def offered_by_programs(which: Callable[[str], str | None]) -> list[str]:
    """The ids of the languages whose programs `which` finds (the agent passes shutil.which)."""
    return [lang.id for lang in LANGUAGES if all(which(p) for p in lang.programs)]


_JAVA_MAIN = re.compile(r"\bpublic\s+(?:final\s+)?class\s+([A-Za-z_$][A-Za-z0-9_$]*)")
_JAVA_ANY_CLASS_WITH_MAIN = re.compile(
    r"\bclass\s+([A-Za-z_$][A-Za-z0-9_$]*)[^{]*\{(?:(?!\bclass\b).)*?\bstatic\s+void\s+main\s*\(", re.S)


def java_main_class(code: str) -> str:
    """The class Java code's `main` is in: its public class, else the first class with a main."""
    found = _JAVA_MAIN.search(code) or _JAVA_ANY_CLASS_WITH_MAIN.search(code)
    return found.group(1) if found else "Main"


def expand(step: tuple[str, ...], values: Mapping[str, str]) -> list[str]:
    return [arg.format_map(values) for arg in step]


def unsupported(language: str, offered: list[str], runtime: str, why: str | None = None) -> ProtocolError:
    """The one answer for a language a sandbox does not run, naming what it does run (and `why`
    not, when the runtime knows: a module this host has not fetched)."""
    because = f" ({why[:300]})" if why else ""
    return ProtocolError("unsupported", f"runtime {runtime} does not run {language!r:.40} here{because}; it runs: "
                                        f"{', '.join(sorted(offered)) or 'no languages'}")
