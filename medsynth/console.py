"""Messages and progress bars go to stderr, so stdout stays clean for ``--json``."""

from __future__ import annotations

import sys

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = bool(quiet)


def is_quiet() -> bool:
    return _state["quiet"]


def info(msg: str) -> None:
    if not _state["quiet"]:
        print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    # Warnings are shown even with -q: they are about the user's data or results.
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def progress(iterable=None, **kwargs):
    """tqdm on stderr, silent with -q."""
    from tqdm.auto import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=_state["quiet"], **kwargs)
