"""The caption stage (Med-Art's Visual Symptom Generator): one caption per training image.

``run(recipe)`` writes ``<workdir>/captions.jsonl``: one JSON object per image of the train split
(every split with ``caption.splits: all`` / ``--all-splits``)::

    {"path", "label", "split", "sha256", "caption", "source", "n_tokens", "how", "settings",
     "model" and "generations" (source vlm only)}

``how``: 'generated' (kept as the source produced it), 'prefixed' (the VLM never started with the
class prefix, so it was prepended), 'simplified' (rewritten by the seq2seq simplifier to fit the
T5 limit), 'truncated' (cut at a sentence/word boundary to fit). ``n_tokens`` counts the base
model's T5 tokens including ``</s>``; every caption has ``n_tokens <= model.max_text_tokens``.

Resume: the file is append-only and keyed by (sha256, path); a killed run rerun skips every image
already captioned and never writes a second line for one. ``settings`` is a short hash of what
decides a caption's text (source, model, prompt, sampling, seed, token limit, ...): when the
recipe changed it, the old file is moved to ``caption/previous/`` and everything is captioned
again (``fresh=True`` forces that). ``caption/`` holds config.yaml and provenance.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import console
from ..data import read_classes, read_manifest
from ..errors import UserError
from ..prompts import fill_template, simple_caption
from ..recipe import Recipe
from ..workspace import atomic_write_text, ensure_dir, sha256_file, sha256_json, write_provenance
from . import store
from .text import TokenCounter

SOURCES = ("vlm", "simple", "empty", "file", "stats")


def caption_family(recipe: Recipe) -> dict:
    """``{"family": F}`` when ``model.family`` names a family other than PixArt, else nothing.

    The family decides the tokenizer that counts caption tokens (and so where captions are cut)
    even on the same ``model.base`` ('tiny'); PixArt, the default, adds nothing, so the caption
    settings written before families existed stay valid."""
    family = getattr(recipe.model, "family", None)
    return {"family": family} if family and family != "pixart" else {}


def captions_path(workdir: Path) -> Path:
    return Path(workdir) / "captions.jsonl"


def _settings(recipe: Recipe, source: str, categories: dict[str, str]) -> dict:
    """Everything that decides the text of a caption (not speed knobs like batch size or device)."""
    c = recipe.caption
    s: dict = {"source": source, "max_text_tokens": recipe.model.max_text_tokens, "base": recipe.model.base,
               "simplify_model": c.simplify_model, "simplify_retries": c.simplify_retries}
    s.update(caption_family(recipe))
    if source in ("vlm", "stats", "simple"):
        s.update(modality=recipe.modality, categories=categories)
    if source == "vlm":
        s.update(model=c.model, revision=c.revision, prompt=c.prompt, visual_features=recipe.visual_features,
                 do_sample=c.do_sample, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                 max_new_tokens=c.max_new_tokens, prefix_retries=c.prefix_retries, seed=recipe.seed)
        # Not batch_size: sampled text depends on the batch composition, but a rerun with a smaller
        # batch after running out of GPU memory must keep the captions already written.
    elif source == "stats":
        from .stats import STATS_VERSION

        s.update(stats_version=STATS_VERSION)
    elif source == "file":
        p = Path(c.file).expanduser()
        s.update(file=str(p.resolve()), file_sha256=sha256_file(p) if p.is_file() else None)
    return s


def _backup(out: Path, stage_dir: Path, why: str) -> None:
    dest_dir = ensure_dir(stage_dir / "previous")
    dest = dest_dir / f"captions-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    n = 1
    while dest.exists():
        dest = dest_dir / f"captions-{time.strftime('%Y%m%d-%H%M%S')}-{n}.jsonl"
        n += 1
    out.replace(dest)
    console.warn(f"{out}: {why}; the old captions were moved to {dest} and every image is captioned again")


def run(recipe: Recipe, source: str | None = None, all_splits: bool = False, fresh: bool = False) -> Path:
    """Caption the train images (every image with ``all_splits``); return the captions.jsonl path."""
    from ..workspace import require  # a workdir that is not a workspace is refused before any write
    require(recipe)
    read_classes(recipe.workdir_path)  # no workspace yet: say "run prepare" before creating anything
    stage_dir = ensure_dir(Path(recipe.workdir_path) / "caption")
    with store.exclusive(stage_dir / ".lock"):
        return _run(recipe, source, all_splits, fresh)


def _run(recipe: Recipe, source: str | None, all_splits: bool, fresh: bool) -> Path:
    src = source or recipe.caption.source
    if src not in SOURCES:
        raise UserError(f"caption source {src!r} is not one of {', '.join(SOURCES)}")
    if src == "file" and not recipe.caption.file:
        raise UserError("caption.file is not set; source 'file' needs a CSV/JSONL with path,caption (--set caption.file=PATH)")
    workdir = Path(recipe.workdir_path)
    classes = read_classes(workdir)
    categories = {c["name"]: c["category"] for c in classes}
    if src == "vlm":
        try:
            fill_template(recipe.caption.prompt, recipe.modality, "x", recipe.visual_features)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"caption.prompt: cannot fill {recipe.caption.prompt!r} ({type(e).__name__}: {e}); the only "
                            "placeholders are {Article} {article} {modality} {category} {visual_features} "
                            "(write {{ and }} for literal braces)") from None
    splits = "all" if all_splits else recipe.caption.splits
    rows = read_manifest(workdir, None if splits == "all" else "train")
    out = captions_path(workdir)
    stage_dir = ensure_dir(workdir / "caption")
    settings = _settings(recipe, src, categories)
    sig = sha256_json(settings)[:16]

    # Read without repairing: nothing in captions.jsonl may change before every model is checked.
    existing = store.read(out, repair=False)
    restart = None  # why the existing captions cannot be kept
    if existing and fresh:
        restart = "--fresh was given"
    elif existing:
        old = {(r.get("source"), r.get("model"), r.get("settings")) for r in existing}
        if any(s != sig for _, _, s in old):
            was = ", ".join(sorted(f"source {s!r}" + (f" (model {m})" if m else "") for s, m, _ in old))
            now = f"source {src!r}" + (f" (model {recipe.caption.model})" if src == "vlm" else "")
            detail = "the same source with other settings" if any(s == src for s, _, _ in old) else now
            restart = f"it holds captions from {was}; this run asks for {detail}"
    if restart:
        existing = []

    target = {store.key(r.sha256, r.path) for r in rows}
    done = {store.key(r["sha256"], r["path"]) for r in existing}
    todo_keys = target - done
    console.info(f"caption: {len(rows)} image(s) ({'all splits' if splits == 'all' else 'train split'}), "
                 f"{len(rows) - len(todo_keys)} already captioned, source {src}")

    # Everything that can fail for want of a file or weights fails here, before any work (and
    # before old captions are moved aside): the base tokenizer, the VLM, and the simplifier
    # whenever this run might call it.
    tokenizer = _tokenizer(recipe)
    limit = _token_limit(recipe, tokenizer)
    counter = TokenCounter(tokenizer, limit)
    produce = _make_source(recipe, src, rows, categories) if todo_keys else None
    from .simplify import Simplifier

    simplifier = Simplifier(recipe)
    if todo_keys and _may_simplify(recipe, src, rows, todo_keys, categories, produce, counter):
        simplifier.load()
    if restart:
        _backup(out, stage_dir, restart)
    elif out.is_file():
        store.read(out)  # now cut off a line torn by a killed run, before appending after it
    write_provenance(stage_dir, recipe, "caption", config=settings, complete=False,
                     inputs={"manifest.csv": sha256_file(workdir / "manifest.csv")})

    counts = {"generated": 0, "prefixed": 0, "simplified": 0, "truncated": 0}
    if todo_keys:
        bs = recipe.caption.batch_size if src == "vlm" else 16
        # Batches are cut from the full ordered list, so a resumed run forms the same VLM batches.
        batches = [rows[i:i + bs] for i in range(0, len(rows), bs)]
        if src != "vlm":  # only sampled VLM captions depend on their batch mates
            batches = [[r for r in b if store.key(r.sha256, r.path) in todo_keys] for b in batches]
        batches = [b for b in batches if any(store.key(r.sha256, r.path) in todo_keys for r in b)]
        bar = console.progress(total=len(todo_keys), desc=f"caption ({src})", unit="img")
        with store.Appender(out) as app:
            for batch in batches:
                records = _caption_batch(recipe, src, batch, categories, produce, counter, simplifier, sig)
                new = [rec for rec in records if store.key(rec["sha256"], rec["path"]) in todo_keys]
                app.write(new)
                for rec in new:
                    counts[rec["how"]] += 1
                bar.update(len(new))
        bar.close()

    final = store.read(out)
    seen: dict[tuple[str, str], dict] = {}
    for rec in final:
        seen.setdefault(store.key(rec["sha256"], rec["path"]), rec)
    stale = [r for r in final if store.key(r["sha256"], r["path"]) not in target]
    if stale or len(seen) != len(final):
        # Images that left the data set (or the other split) must not linger as captions: rewrite
        # the file with exactly the current images, keeping the old one.
        keep = [seen[store.key(r.sha256, r.path)] for r in rows if store.key(r.sha256, r.path) in seen]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
        prev = ensure_dir(stage_dir / "previous") / f"captions-{time.strftime('%Y%m%d-%H%M%S')}-all.jsonl"
        atomic_write_text(prev, out.read_text(encoding="utf-8"))
        atomic_write_text(out, text)
        console.info(f"caption: dropped {len(stale)} caption(s) of images not in this run "
                     f"({'data set' if splits == 'all' else 'train split'}); the full old file is {prev}")
        final = keep
    missing = target - {store.key(r["sha256"], r["path"]) for r in final}
    if missing:  # cannot happen unless the file was edited concurrently; never report success then
        raise UserError(f"{out}: {len(missing)} image(s) still lack a caption; rerun `medsynth caption`")
    over = [r["path"] for r in final if r["n_tokens"] > limit]
    if over:
        raise UserError(f"{out}: {len(over)} caption(s) exceed the token limit {limit} (model.max_text_tokens, capped by "
                        "the text encoder's own); rerun with --fresh")

    write_provenance(stage_dir, recipe, "caption", config=settings, complete=True,
                     inputs={"manifest.csv": sha256_file(workdir / "manifest.csv"), "captions.jsonl": sha256_file(out)},
                     extra={"source": src, "n_captions": len(final), "this_run": counts,
                            "settings": sig, "caption_settings": settings})
    console.info(f"caption: {len(final)} caption(s) -> {out}")
    return out


def summary(path: Path) -> dict:
    """Counts for --json output."""
    recs = store.read(Path(path), repair=False)
    how: dict[str, int] = {}
    for r in recs:
        how[r["how"]] = how.get(r["how"], 0) + 1
    n = [r["n_tokens"] for r in recs]
    return {"captions": str(path), "n": len(recs), "how": how,
            "sources": sorted({r["source"] for r in recs}),
            "max_tokens": max(n) if n else 0, "mean_tokens": round(sum(n) / len(n), 1) if n else 0}


# ----------------------------------------------------------------------------- internals


def _tokenizer(recipe: Recipe):
    from .hf import load_base_tokenizer

    return load_base_tokenizer(recipe)


def _token_limit(recipe: Recipe, tokenizer) -> int:
    """The family's caption token limit (``Backbone.caption_token_limit``; CLIP caps it at 77)."""
    from ..models.backbone import family_of, get

    family = family_of(recipe, strict=False)
    if family is None:
        return recipe.model.max_text_tokens
    limit = get(family).caption_token_limit(recipe, tokenizer)
    if limit < recipe.model.max_text_tokens:
        console.info(f"caption: captions are fitted to {limit} tokens, the text encoder's limit "
                     f"(model.max_text_tokens is {recipe.model.max_text_tokens})")
    return limit


def _make_source(recipe: Recipe, src: str, rows, categories):
    if src == "vlm":
        from .vlm import VLMCaptioner

        return VLMCaptioner(recipe)
    if src == "file":
        from .sources import read_caption_file

        return read_caption_file(recipe.caption.file, rows, recipe.data.root)
    return None


def _simplify_retries(recipe: Recipe, src: str) -> int:
    # 'stats' is weight-free and its sentences come most-important-first: cut, never load a simplifier.
    return 0 if src == "stats" else recipe.caption.simplify_retries


def _may_simplify(recipe: Recipe, src: str, rows, todo_keys, categories, produce, counter: TokenCounter) -> bool:
    """Could this run call the simplifier? Decided up front, so that a missing one fails before any work.

    Generated (VLM) text is known only after generation: any VLM run may need it. Simple, empty
    and file captions are known now, so the simplifier is needed only if one is over the limit.
    """
    if _simplify_retries(recipe, src) == 0:
        return False
    if src == "vlm":
        return True
    todo = [r for r in rows if store.key(r.sha256, r.path) in todo_keys]
    if src == "file":
        texts = [produce[r.path] for r in todo]
    elif src == "simple":
        texts = [simple_caption(recipe.modality, categories[r.label]) for r in todo]
    else:  # empty
        texts = [""] * len(todo)
    return any(n > counter.limit for n in counter.count(texts))


def _caption_batch(recipe: Recipe, src: str, batch, categories, produce, counter: TokenCounter,
                   simplifier, sig: str) -> list[dict]:
    from ..images import read_image
    from .simplify import fit

    prefixes = [simple_caption(recipe.modality, categories[r.label]) for r in batch]
    extra: list[dict] = [{} for _ in batch]
    if src == "simple":
        raw = [(p, "generated") for p in prefixes]
    elif src == "empty":
        raw = [("", "generated") for _ in batch]
    elif src == "file":
        raw = [(produce[r.path], "generated") for r in batch]
    elif src == "stats":
        from .stats import caption as stats_caption

        raw = [(stats_caption(_read(r.path, read_image), p), "generated") for r, p in zip(batch, prefixes)]
    else:  # vlm
        images = [_read(r.path, read_image) for r in batch]
        prompts = [fill_template(recipe.caption.prompt, recipe.modality, categories[r.label], recipe.visual_features)
                   for r in batch]
        res = produce.caption(images, prompts, prefixes, [r.sha256 for r in batch], recipe.caption.prefix_retries)
        raw = [(t, how) for t, how, _ in res]
        extra = [{"model": recipe.caption.model, "generations": n} for _, _, n in res]
    # User captions (file) need not start with the class prefix; generated ones keep it when shortened.
    keep = [None if src in ("file", "empty") else p for p in prefixes]
    fitted = fit([t for t, _ in raw], keep, counter, simplifier, _simplify_retries(recipe, src))
    texts = [t for t, _ in fitted]
    n_tokens = counter.count(texts)
    records = []
    for r, (t0, how0), (t, how), n, ex in zip(batch, raw, fitted, n_tokens, extra):
        records.append({"path": r.path, "label": r.label, "split": r.split, "sha256": r.sha256, "caption": t,
                        "source": src, "n_tokens": n, "how": how0 if how == "fits" else how,
                        "settings": sig, **ex})
    return records


def _read(path: str, read_image):
    from ..images import BadImage

    try:
        return read_image(path)
    except (BadImage, OSError) as e:
        raise UserError(f"{path}: {e}; the image changed since `medsynth prepare`: rerun prepare") from None


__all__ = ["run", "summary", "captions_path", "SOURCES"]
