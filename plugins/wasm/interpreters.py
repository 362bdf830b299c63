"""Ruby and PHP as one-shot WASI commands: how a run's folder is laid out and the interpreter's argv.

Each run is a fresh instance of the interpreter's module (plugins.wasm.runno fetched it) that sees
the sandbox's /work (read-write, its working directory) and, read-only at /sandgate, a folder the
runtime made for this run alone, holding the program and a prelude that runs first (preludes/):
nothing of the run is left in the sandbox's files, and no run sees another's program.

PHP is php-cgi: `-q` keeps its HTTP headers off stdout, errors are logged to stderr (as the CLI
does) instead of displayed as HTML in the output, output is flushed as it is written, and the
limits are the sandbox's (no memory_limit or max_execution_time of PHP's own). Its stdin is a file
of the folder (see preludes/php.php). Ruby runs without RubyGems: this build has no gems (the
default gems' libraries are in the stdlib), and loading RubyGems takes half of a hello world.

Imported by the launcher at every Ruby or PHP start and by the runtime: standard library only.
"""

from __future__ import annotations

from pathlib import Path

LANGUAGES = ("ruby", "php")
#: Where the run's folder is in the guest (the agent's folder's place: a run has no agent).
CODE_GUEST = "/sandgate"
#: The program's file in the run's folder.
SOURCE = {"ruby": "main.rb", "php": "main.php"}
PRELUDE = {"ruby": "prelude.rb", "php": "prelude.php"}
#: The stdin of a PHP run (php-cgi cannot read the descriptor; Ruby reads its real stdin).
STDIN_FILE = "stdin"
#: The least linear memory a run gets (plugins.wasm.runtime gives it what the agent leaves of
#: memory_mb, at least this, and never more than memory_mb). Measured: Ruby 3.2's hello world
#: grows its memory to 90 MiB before it prints (its bundled file system unpacks into it); PHP
#: starts in 9 MiB and a hello world ends at 13.
MIN_MEMORY_MB = {"ruby": 128, "php": 32}

_PRELUDES = Path(__file__).resolve().parent / "preludes"
_PRELUDE_SOURCE = {"ruby": _PRELUDES / "ruby.rb", "php": _PRELUDES / "php.php"}


def argv(language: str) -> list[str]:
    """The interpreter's WASI argv for the run's program."""
    source, prelude = f"{CODE_GUEST}/{SOURCE[language]}", f"{CODE_GUEST}/{PRELUDE[language]}"
    if language == "ruby":
        return ["ruby", "--disable-gems", "-r", prelude, source]
    if language == "php":
        settings = {
            "display_errors": "0", "log_errors": "1", "html_errors": "0", "error_reporting": "E_ALL",
            "implicit_flush": "1", "output_buffering": "0", "memory_limit": "-1", "max_execution_time": "0",
            "auto_prepend_file": prelude,
        }
        return ["php", "-q", *(arg for key, value in settings.items() for arg in ("-d", f"{key}={value}")), source]
    raise ValueError(f"no interpreter for {language!r}")


def prepare(language: str, folder: Path, code: str, stdin: bytes) -> None:
    """Fill the run's (new, private) folder: the program, the prelude, PHP's stdin."""
    (folder / SOURCE[language]).write_text(code, encoding="utf-8")
    (folder / PRELUDE[language]).write_bytes(_PRELUDE_SOURCE[language].read_bytes())
    if language == "php":
        (folder / STDIN_FILE).write_bytes(stdin)
