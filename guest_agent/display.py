"""Rich output of Python execs: MIME bundles, as Jupyter's display machinery makes them.

An exec's rich output is a `display` stream event carrying one MIME bundle (guest_agent/schema.py:
every value text, `image/png` base64, `application/json` JSON text, `text/plain` always there).
Three things make one, in the exec's order with its stdout and stderr:

- the last expression of a cell, when its value has a rich representation (`_repr_html_`,
  `_repr_png_`, `_repr_json_`, `_repr_mimebundle_`, ... as IPython's display formatter looks them
  up): `pyexec.run_cell` calls `show_result`, which displays it instead of printing its repr
  (the repr is the bundle's text/plain). A value without one is printed, as before;
- `display(*objs)`, a builtin in the agent's interpreter (as IPython puts it in builtins): every
  object becomes a bundle, a plain one being its repr as text/plain; `display(bundle, raw=True)`
  sends a bundle as given;
- matplotlib figures: the agent makes matplotlib's backend its own (`mplbackend`, Agg underneath)
  when user code imports matplotlib, unless MPLBACKEND is set: `plt.show()` displays each open
  figure as a PNG and closes it, and figures still open when a cell ends are displayed then
  (`flush_figures`), as Jupyter's inline backend does.

Where a bundle goes: `sys.stdout` is the agent's per-exec proxy (pyexec), whose writer knows its
exec's streams (`sandgate_exec`, a `pyexec.ExecStreams`); so a bundle reaches the exec of the
thread that made it, as print() does. Outside an exec (or with sys.stdout replaced), its
text/plain is printed.

Bounds (the agent keeps to the schema's, so the gateway never sees it break them): a bundle
larger than `MAX_DISPLAY_BYTES` keeps its text/plain only, and past `MAX_EXEC_DISPLAY_BYTES` in
one exec further bundles are dropped; either is said once on the exec's stderr.
"""

from __future__ import annotations

import builtins
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .schema import BASE64_TYPES, MAX_DISPLAY_BYTES, bundle_size

#: What `mplbackend` is called when matplotlib imports it.
MPL_BACKEND = "module://guest_agent.mplbackend"
#: The representations looked up on a value, in IPython's order, and their MIME types.
REPR_METHODS: tuple[tuple[str, str], ...] = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
)
#: A figure's PNG resolution (matplotlib's savefig default, "figure", is the figure's dpi: 100).
FIGURE_DPI = 100

Bundle = dict[str, str]


# ---------------------------------------------------------------------------------------------
# Making bundles
# ---------------------------------------------------------------------------------------------


def mime_bundle(obj: Any) -> Bundle | None:
    """`obj`'s rich representations, with its repr as text/plain; None when it has none.

    A representation method that raises or returns something unusable is left out (with a
    note on stderr), as IPython does; the repr itself raising is the caller's error.
    """
    if _is_figure(obj):
        return figure_bundle(obj)
    if isinstance(obj, type):  # a class: its _repr_*_ are functions that want an instance
        return None
    bundle: Bundle = {}
    mimebundle = _method(obj, "_repr_mimebundle_")
    if mimebundle is not None:
        found = _call(obj, "_repr_mimebundle_", mimebundle)
        if isinstance(found, tuple) and found:
            found = found[0]  # (bundle, metadata)
        if isinstance(found, Mapping):
            for mime, value in found.items():
                text = normalize(mime, value) if isinstance(mime, str) else None
                if text is not None:
                    bundle[mime] = text
    for mime, name in REPR_METHODS:
        if mime in bundle:
            continue
        method = _method(obj, name)
        if method is None:
            continue
        value = _call(obj, name, method)
        if isinstance(value, tuple) and value:
            value = value[0]  # (data, metadata)
        text = normalize(mime, value)
        if text is not None:
            bundle[mime] = text
    if not bundle:
        return None
    bundle.pop("text/plain", None)
    return {"text/plain": repr(obj), **bundle}


def figure_bundle(figure: Any) -> Bundle:
    """A matplotlib figure as a PNG (and its repr, e.g. `<Figure size 640x480 with 1 Axes>`)."""
    import base64
    import io

    buffer = io.BytesIO()
    # The figure's own size, not Jupyter's bbox_inches="tight": cropping draws the figure twice,
    # 3.0-3.6 s instead of 1.2-1.3 s a line plot under TCG (bench/datascience.py's machine).
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return {"text/plain": repr(figure), "image/png": base64.b64encode(buffer.getvalue()).decode("ascii")}


def normalize(mime: str, value: Any) -> str | None:
    """A representation as a bundle's text (schema.py): bytes of a base64 type are encoded, a
    JSON value is dumped; None for what cannot be one."""
    import base64

    if value is None:
        return None
    if mime in BASE64_TYPES:
        if isinstance(value, bytes | bytearray):
            return base64.b64encode(value).decode("ascii")
        if isinstance(value, str):  # already base64 (IPython accepts both)
            try:
                return base64.b64encode(base64.b64decode(value, validate=True)).decode("ascii")
            except ValueError:
                _note(f"display: the {mime} representation is neither bytes nor base64; left out")
                return None
        return None
    if mime == "application/json" or mime.endswith("+json"):
        if isinstance(value, str):
            return value
        import json

        try:
            return json.dumps(value)
        except (TypeError, ValueError) as exc:
            _note(f"display: the {mime} representation is not JSON ({exc}); left out")
            return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return None


def _method(obj: Any, name: str) -> Callable[..., Any] | None:
    try:
        method = getattr(obj, name, None)
    except Exception:  # a __getattr__ that raises something else than AttributeError
        return None
    return method if callable(method) else None


def _call(obj: Any, name: str, method: Callable[..., Any]) -> Any:
    try:
        return method()
    except Exception as exc:
        _note(f"display: {type(obj).__name__}.{name}() raised {type(exc).__name__}: {exc}; left out")
        return None


def _is_figure(obj: Any) -> bool:
    """A matplotlib Figure (looked up without importing matplotlib)."""
    figure_module = sys.modules.get("matplotlib.figure")
    figure_class = getattr(figure_module, "Figure", None) if figure_module is not None else None
    return figure_class is not None and isinstance(obj, figure_class)


# ---------------------------------------------------------------------------------------------
# Sending bundles
# ---------------------------------------------------------------------------------------------


def display(*objs: Any, raw: bool = False) -> None:
    """Show each object as rich output of the running exec (a `display` event).

    Args:
        objs: anything: an object with rich representations (a pandas DataFrame, a matplotlib
            figure, an object with `_repr_html_`, ...) is sent as them, any other as its repr.
        raw: each object is a MIME bundle already ({"text/html": "<b>hi</b>"}; text/plain is
            added when missing); values as in the schema (bytes of an image are encoded).
    """
    for obj in objs:
        if raw:
            if not isinstance(obj, Mapping):
                raise TypeError(f"display(raw=True) takes MIME bundles (dicts), not {type(obj).__name__}")
            bundle = {mime: text for mime, value in obj.items()
                      if isinstance(mime, str) and (text := normalize(mime, value)) is not None}
            bundle.setdefault("text/plain", "")
        else:
            bundle = mime_bundle(obj) or {"text/plain": repr(obj)}
            _mark_shown(obj, _current())
        send(bundle)


def show_result(value: Any, streams: Any) -> bool:
    """A cell's last value: displayed in `streams` (the cell's `pyexec.ExecStreams`) when it has
    rich representations (True), else False (the caller prints its repr)."""
    bundle = mime_bundle(value)
    if bundle is None:
        return False
    _mark_shown(value, streams)
    send(bundle, streams)
    return True


def _current() -> Any:
    """The running exec's `pyexec.ExecStreams`, found through sys.stdout (module doc); or None."""
    return getattr(sys.stdout, "sandgate_exec", None)


def send(bundle: Bundle, streams: Any = None) -> None:
    """Hand a bundle to `streams` (default: the current exec's, module doc), within the bounds."""
    bundle = {mime: _valid_text(text) for mime, text in bundle.items()}
    size = bundle_size(bundle)
    if size > MAX_DISPLAY_BYTES:
        _note(f"display: a bundle of {size} bytes is larger than the {MAX_DISPLAY_BYTES} a display event "
              f"carries; only its text/plain is sent")
        bundle = {"text/plain": bundle.get("text/plain", "")[: MAX_DISPLAY_BYTES // 4]}
    streams = streams if streams is not None else _current()
    if streams is None:
        print(bundle.get("text/plain", ""))
    else:
        streams.display(bundle)


def _valid_text(text: str) -> str:
    """`text` as msgpack can carry it (a lone surrogate is not UTF-8)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _note(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# matplotlib
# ---------------------------------------------------------------------------------------------


def _mark_shown(obj: Any, streams: Any) -> None:
    """A figure displayed explicitly in an exec is not displayed again at the end of its cell."""
    if streams is not None and _is_figure(obj):
        streams.shown_figures.add(id(obj))


def show_figures() -> None:
    """plt.show() with the agent's backend: display every open figure, then close them all."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        send(figure_bundle(figure))
    pyplot.close("all")


def flush_figures(streams: Any) -> None:
    """At the end of a cell: display the figures still open (not displayed by this cell
    already) in `streams` and close them, when matplotlib draws with the agent's backend."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    matplotlib = sys.modules.get("matplotlib")
    if pyplot is None or matplotlib is None:
        return
    try:
        if dict.__getitem__(matplotlib.rcParams, "backend") != MPL_BACKEND:
            return  # the user chose another backend: their figures are theirs
        numbers = pyplot.get_fignums()
        if not numbers:
            return
        for number in numbers:
            figure = pyplot.figure(number)
            if id(figure) not in streams.shown_figures:
                send(figure_bundle(figure), streams)
        pyplot.close("all")
    except Exception as exc:  # a figure that cannot be drawn: the cell's own error, reported
        _note(f"display: drawing the open figures failed: {type(exc).__name__}: {exc}")


class _MatplotlibHook:
    """A meta path finder that, when matplotlib is first imported, makes the agent's backend its
    default (module doc). Only in the agent's own interpreter: an environment variable would
    reach every process the sandbox starts."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if name != "matplotlib":
            return None
        # matplotlib's caches and settings go to /tmp, not the user's files (HOME is /work)
        os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "matplotlib"))
        if "MPLBACKEND" in os.environ:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            try:
                module.use(MPL_BACKEND)
            except Exception as exc:
                _note(f"display: matplotlib would not take the display backend: {exc}")

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_HOOK = _MatplotlibHook()


def install() -> None:
    """Make `display` a builtin and hook matplotlib's import (module doc); idempotent."""
    if not hasattr(builtins, "display"):
        builtins.display = display  # type: ignore[attr-defined]
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
