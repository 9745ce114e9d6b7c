"""Messages and progress bars go to stderr, so stdout stays clean for ``--json``."""

from __future__ import annotations

import logging
import os
import sys
import warnings

_state = {"quiet": False}

# With -q the libraries' own chatter goes too (their log lines, weight-loading progress bars); set
# before they are imported, these are read at import.
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_LIBRARIES = r"(diffusers|transformers|peft|timm|accelerate|huggingface_hub|torch|torchvision|webdataset)(\.|$)"


class _EmptyFp32ListFilter(logging.Filter):
    # diffusers (0.42) warns "There are modules in X that should be kept in float32: []" on every
    # `.to(dtype)`, also when that list is empty: a line about nothing, on every run.
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = bool(quiet)
    if quiet:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Silence the libraries' informational output, warnings included (medsynth's own warnings,
    :func:`warn`, still show: they are about the user's data or results)."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=_LIBRARIES)
    if "transformers" in sys.modules:  # already imported (medsynth used as a library): tell it directly
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()


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
