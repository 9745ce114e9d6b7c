"""``captions.jsonl``: append-only, one JSON object per image, safe to kill at any moment.

Each batch of finished captions is appended with a single ``write`` and ``fsync``; a run killed
mid-write leaves at most one torn final line, which the next run cuts off (it has no newline
and/or is not valid JSON). Records are keyed by (sha256, path), so a rerun skips every image
that already has a caption and never writes a second line for it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .. import console
from ..errors import UserError

REQUIRED = ("path", "label", "sha256", "caption", "source", "n_tokens", "how")


def key(sha256: str, path: str) -> tuple[str, str]:
    return (sha256, path)


def read(path: Path, repair: bool = True) -> list[dict]:
    """Complete records of ``path`` in file order; a torn last line is cut off when ``repair``.

    A malformed line anywhere but at the end is not a torn write but a damaged or foreign
    file: that is an error naming the line (we never silently drop captions).
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw = data[pos:end]
        lineno += 1
        last = end >= len(data)
        try:
            rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
            ok = rec is None or (isinstance(rec, dict) and all(k in rec for k in REQUIRED))
        except (UnicodeDecodeError, ValueError):
            rec, ok = None, False
        if not ok or (last and nl < 0):
            if last:
                # A run killed in the middle of an append: drop the partial line.
                if repair:
                    console.warn(f"{path}: line {lineno} is incomplete (an interrupted run); dropping it and re-captioning that image")
                    with open(path, "r+b") as fh:
                        fh.truncate(good_end)
                        fh.flush()
                        os.fsync(fh.fileno())
                break
            raise UserError(f"{path}:{lineno}: not a caption record (a JSON object with {', '.join(REQUIRED)}); "
                            "fix or delete the line, or rerun with --fresh to caption everything again")
        if rec is not None:
            records.append(rec)
        good_end = end
        pos = end
    return records


class Appender:
    """Appends records to captions.jsonl, one fsync'd write per batch."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # Unbuffered: a failed write must not leave bytes in a buffer that close() would flush later.
            self._fh = open(path, "ab", buffering=0)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}; check permissions or choose another workdir") from None

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records).encode("utf-8")
        start = os.fstat(self._fh.fileno()).st_size
        try:
            view = memoryview(blob)
            while view:  # a raw write may take only part of the bytes
                view = view[self._fh.write(view):]
            os.fsync(self._fh.fileno())
        except OSError as e:
            # Disk full (or gone) mid-append: cut the partial batch off so the file holds whole
            # records only, then stop with a message; the captions before it are kept.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fh.fileno(), start)
            fix = "free some space or choose another workdir" if e.errno == 28 else \
                "check the disk and its permissions, or choose another workdir"
            raise UserError(f"cannot write {self.path}: {e.strerror or e}; {fix}. The captions written so far are "
                            "kept: run `medsynth caption` again to continue") from None

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """Hold an exclusive lock so two caption runs never append to one file at the same time.

    flock is released by the kernel when the process dies (even by kill -9), so a killed run
    never leaves a stale lock behind. Where fcntl does not exist (Windows) no lock is taken.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another `medsynth caption` is writing this workspace (lock {lock_path} is held); "
                            "wait for it to finish or stop it, then run again") from None
        yield
    finally:
        fh.close()
