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
`as_process` turns one into the single process a guest runs (`run`, or a shell that compiles
with stdin from /dev/null and then `exec`s `run`): one process group, so stdin, the exec's
timeout, exec.signal and a pty cover the compile and the run alike, and a compile error is
the compiler's stderr and its exit code.
"""

from __future__ import annotations

import re
import shlex
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
    #: Extra environment for both steps ({dir} is expanded): toolchains that want a writable
    #: home or cache get one in the exec's private directory, never in the sandbox's files.
    env: tuple[tuple[str, str], ...] = ()
    #: Variables of the agent's own environment (the image's, in a pod) that the toolchain needs
    #: to find itself, passed on when set: an exec otherwise starts from a minimal environment.
    inherit: tuple[str, ...] = ()

    @property
    def programs(self) -> tuple[str, ...]:
        """The programs a guest needs on its PATH to offer this language as a process."""
        steps = [self.run] + ([self.compile] if self.compile else [])
        return tuple(dict.fromkeys(step[0] for step in steps if not step[0].startswith("{")))


#: Java's flags for both JVMs (javac's as -J...): one sandbox runs one short program on one small
#: CPU, so the serial collector, no C2 compiler and no hsperfdata file (it would go to /tmp).
_JVM = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData")

LANGUAGES: tuple[Language, ...] = (
    Language("python", ("py", "python3"), "main.py", None, ("python3", "{src}")),
    Language("javascript", ("js", "node", "nodejs"), "main.js", None, ("node", "{src}")),
    Language("ruby", ("rb",), "main.rb", None, ("ruby", "{src}"), inherit=("GEM_HOME", "GEM_PATH")),
    Language("php", (), "main.php", None, ("php", "{src}")),
    Language("c", (), "main.c", ("gcc", "-O1", "-o", "{out}", "{src}", "-lm"), ("{out}",)),
    Language("cpp", ("c++", "cxx"), "main.cpp", ("g++", "-O1", "-o", "{out}", "{src}"), ("{out}",)),
    # (not `go run`: it answers 1 for whatever status the program exits with)
    Language("go", ("golang",), "main.go", ("go", "build", "-o", "{out}", "{src}"), ("{out}",),
             # (Go >= 1.23 keeps telemetry counters under the user config dir, $HOME/.config)
             env=(("GOCACHE", "{dir}/.gocache"), ("GOPATH", "{dir}/.gopath"), ("GO111MODULE", "off"),
                  ("XDG_CONFIG_HOME", "{dir}/.config")),
             inherit=("GOROOT",)),
    Language("java", (), "{main}.java", ("javac", *(f"-J{flag}" for flag in _JVM), "-d", "{dir}", "{src}"),
             ("java", *_JVM, "-cp", "{dir}", "{main}"), inherit=("JAVA_HOME",)),
    Language("rust", ("rs",), "main.rs", ("rustc", "-C", "opt-level=1", "-o", "{out}", "{src}"), ("{out}",),
             inherit=("RUSTUP_HOME", "CARGO_HOME", "RUSTUP_TOOLCHAIN")),
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


def find_programs(which: Callable[[str], str | None]) -> dict[str, str]:
    """Every program of the table that `which` finds -> its path. The agent looks them up once, on
    its own PATH (a pod image's, which may hold /usr/local/go/bin), and runs them by that path:
    what it advertises is what it runs, whatever PATH an exec's environment has."""
    found = {}
    for lang in LANGUAGES:
        for program in lang.programs:
            if program not in found and (path := which(program)) is not None:
                found[program] = path
    return found


_JAVA_MAIN = re.compile(r"\bpublic\s+(?:final\s+)?class\s+([A-Za-z_$][A-Za-z0-9_$]*)")
_JAVA_ANY_CLASS_WITH_MAIN = re.compile(
    r"\bclass\s+([A-Za-z_$][A-Za-z0-9_$]*)[^{]*\{(?:(?!\bclass\b).)*?\bstatic\s+void\s+main\s*\(", re.S)


def java_main_class(code: str) -> str:
    """The class Java code's `main` is in: its public class, else the first class with a main."""
    found = _JAVA_MAIN.search(code) or _JAVA_ANY_CLASS_WITH_MAIN.search(code)
    return found.group(1) if found else "Main"


def expand(step: tuple[str, ...], values: Mapping[str, str]) -> list[str]:
    return [arg.format_map(values) for arg in step]


@dataclass(frozen=True)
class LanguageProcess:
    """Code in a language made into the one process that compiles (if need be) and runs it."""

    #: Where the code goes, in the private directory.
    source: str
    argv: list[str]
    #: The language's own environment, under the exec's `env` (which overrides it).
    env: dict[str, str]


def as_process(lang: Language, code: str, folder: str, programs: Mapping[str, str],
               inherited: Mapping[str, str]) -> LanguageProcess:
    """How a guest with processes runs `code` in `lang`.

    Args:
        folder: a fresh private directory (not the sandbox's files) that holds the source and
            whatever the compiler makes, removed when the exec ends.
        programs: `find_programs`'s answer: the table's programs by path.
        inherited: the agent's environment; `lang.inherit` names what passes from it.
    """
    main = java_main_class(code) if "{main}" in lang.filename else "Main"
    source = f"{folder}/{lang.filename.format(main=main)}"
    values = {"src": source, "dir": folder, "out": f"{folder}/main", "main": main}

    def step(recipe: tuple[str, ...]) -> list[str]:
        argv = expand(recipe, values)
        return [programs.get(argv[0], argv[0]), *argv[1:]]

    run = step(lang.run)
    if lang.compile is None:
        argv = run
    else:
        # A two-process runner in the agent would need its own timeout, signal and pty plumbing
        # across the two; a shell keeps both steps in one process group, for ~1 ms.
        script = f"{shlex.join(step(lang.compile))} </dev/null && exec {shlex.join(run)}"
        argv = ["/bin/sh", "-c", script, f"sandgate-{lang.id}"]
    env = {name: value.format_map(values) for name, value in lang.env}
    env.update({name: inherited[name] for name in lang.inherit if name in inherited})
    return LanguageProcess(source, argv, env)


def unsupported(language: str, offered: list[str], runtime: str, why: str | None = None) -> ProtocolError:
    """The one answer for a language a sandbox does not run, naming what it does run (and `why`
    not, when the runtime knows: a module this host has not fetched)."""
    because = f" ({why[:300]})" if why else ""
    return ProtocolError("unsupported", f"runtime {runtime} does not run {language!r:.40} here{because}; it runs: "
                                        f"{', '.join(sorted(offered)) or 'no languages'}")
