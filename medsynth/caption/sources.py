"""Caption sources that need no model: the class template, empty text, and a user file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import UserError


def read_caption_file(path_str: str, rows, data_root: str | None) -> dict[str, str]:
    """Captions of ``rows`` (manifest rows) from a CSV or JSONL file with path,caption.

    A file's path matches an image by absolute path, by path relative to ``data.root`` (or to
    the caption file's folder), or by file name when that name is unique among the images.
    Every image must get a caption; the error lists those that do not.
    """
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise UserError(f"caption.file: {path} not found; give a CSV (header path,caption) or JSONL ({{\"path\": ..., \"caption\": ...}} per line)")
    entries: list[tuple[str, str, int]] = []
    problems = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                problems.append(f"{path}:{i}: not valid JSON ({e.msg})")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not isinstance(rec.get("caption"), str):
                problems.append(f"{path}:{i}: needs string fields 'path' and 'caption'")
                continue
            entries.append((rec["path"], rec["caption"], i))
    else:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            if "path" not in cols or "caption" not in cols:
                raise UserError(f"caption.file: {path} has columns {list(cols)}; it needs a header with 'path' and 'caption'")
            for i, r in enumerate(reader, start=2):
                entries.append(((r[cols["path"]] or "").strip(), r[cols["caption"]] or "", i))
    if problems:
        raise UserError("caption.file has problems:\n  - " + "\n  - ".join(problems[:30]))

    bases = [Path(data_root).expanduser().resolve()] if data_root else []
    bases.append(path.parent.resolve())
    by_abs: dict[str, str] = {}
    by_name: dict[str, list[str]] = {}
    dup = []
    for p, cap, line in entries:
        q = Path(p).expanduser()
        cands = [q.resolve()] if q.is_absolute() else [(b / q).resolve() for b in bases]
        for c in cands:
            key = c.as_posix()
            if key in by_abs and by_abs[key] != cap:
                dup.append(f"{path}:{line}: {p} has a second, different caption")
            by_abs[key] = cap
        by_name.setdefault(Path(p).name, []).append(cap)
    if dup:
        raise UserError("caption.file gives conflicting captions:\n  - " + "\n  - ".join(dup[:30]))

    name_counts: dict[str, int] = {}
    for r in rows:
        name_counts[Path(r.path).name] = name_counts.get(Path(r.path).name, 0) + 1
    out, missing = {}, []
    for r in rows:
        cap = by_abs.get(Path(r.path).resolve().as_posix())
        if cap is None:
            name = Path(r.path).name
            caps = by_name.get(name)
            if caps and len(caps) == 1 and name_counts[name] == 1:
                cap = caps[0]
        if cap is None:
            missing.append(r.path)
        else:
            out[r.path] = cap
    if missing:
        shown = "\n  - ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise UserError(f"caption.file: {path} has no caption for {len(missing)} image(s):\n  - {shown}\n"
                        "Add a line per image (path absolute, relative to data.root, or a unique file name).")
    return out
