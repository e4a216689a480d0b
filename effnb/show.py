"""Show the source of an effnb function inside a notebook, so nothing is hidden from the reader.

Introduced in Chapter 0.
"""
from __future__ import annotations

import inspect

__all__ = ["show", "source"]


def source(obj: object) -> str:
    """The source code of a function, class or module, as text."""
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"cannot show {obj!r}: pass a function, class or module defined in Python.") from err


def show(obj: object):
    """Display ``obj``'s source with syntax highlighting (plain text outside IPython)."""
    text = source(obj)
    try:
        from IPython.display import Code
    except ImportError:  # pragma: no cover - IPython ships with every notebook install
        print(text)
        return None
    return Code(text, language="python")
