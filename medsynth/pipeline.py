"""`medsynth run`: every stage in order, skipping stages whose inputs and settings did not change.

Each stage has a *key*: a hash of the recipe settings it depends on and of the files it
reads (upstream outputs), so a change upstream re-runs everything that depends on it, and
a change in, say, ``synthesize.per_class`` re-runs synthesize, classify and score only. The
keys of completed stages are kept in ``<workdir>/stages.json``; a stage is skipped when its
key is unchanged *and* its outputs are complete (its provenance.json says so).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import console
from .errors import UserError
from .recipe import Recipe, to_dict
from .workspace import atomic_write_json, read_provenance, sha256_json

STAGES = ("prepare", "caption", "finetune", "synthesize", "classify", "score")


def _data_listing(recipe: Recipe) -> list:
    """Cheap identity of the input data: relative path, size and mtime of every file."""
    if recipe.data.manifest:
        p = Path(recipe.data.manifest)
        st = p.stat() if p.is_file() else None
        roots = [(str(p), st.st_size if st else None, st.st_mtime_ns if st else None)]
        return roots
    root = Path(recipe.data.root) if recipe.data.root else None
    if root is None or not root.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            fp = Path(dirpath) / name
            try:
                st = fp.stat()
            except OSError:
                continue
            out.append((fp.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def _classify_targets(recipe: Recipe) -> list[str]:
    """Which classifiers `run` trains: the recipe's train_on, plus the real-only one that
    domain FID uses when no other domain model is named."""
    targets = [recipe.classify.train_on]
    if recipe.score.domain_model is None and "real" not in targets:
        targets.append("real")
    return targets


def _file_hash(path: Path) -> str | None:
    from .workspace import sha256_file

    return sha256_file(path) if path.is_file() else None


def stage_key(recipe: Recipe, stage: str) -> str:
    """Hash of what ``stage`` depends on *now*: its recipe settings and the files it reads.

    Upstream stages are represented by their outputs (prepare's byte-reproducible manifest,
    the other stages' provenance.json, rewritten only when they really ran), so a skipped
    upstream stage never invalidates a downstream one.
    """
    d = to_dict(recipe)
    wd = recipe.workdir_path
    common = {"seed": d["seed"], "classes": d["classes"]}
    prepared = {"manifest": _file_hash(wd / "manifest.csv"), "classes": _file_hash(wd / "classes.json")}
    if stage == "prepare":
        return sha256_json({**common, "data": d["data"], "files": _data_listing(recipe)})
    if stage == "caption":
        from .caption import caption_family

        return sha256_json({**common, **prepared, "caption": d["caption"], "modality": d["modality"],
                            "visual_features": d["visual_features"], "base": d["model"]["base"],
                            "max_text_tokens": d["model"]["max_text_tokens"], **caption_family(recipe)})
    captions = _file_hash(wd / "captions.jsonl")
    if stage == "finetune":
        return sha256_json({**common, **prepared, "captions": captions, "model": d["model"],
                            "finetune": d["finetune"], "modality": d["modality"]})
    if stage == "synthesize":
        judge = None
        if recipe.synthesize.curate.enabled:  # the curation judge's weights decide which candidates are kept
            from .synthesize.curate import judge_dir

            judge = _file_hash(judge_dir(recipe) / "model.safetensors")
        return sha256_json({**common, **prepared, "captions": captions, "model": d["model"],
                            "synthesize": d["synthesize"], "modality": d["modality"],
                            "finetuned": _file_hash(wd / "finetune" / "provenance.json"),
                            **({"judge": judge} if recipe.synthesize.curate.enabled else {})})
    if stage == "classify":
        return sha256_json({**common, **prepared, "classify": d["classify"], "targets": _classify_targets(recipe),
                            "synthetic": _file_hash(wd / "synthetic" / "provenance.json")})
    if stage == "score":
        return sha256_json({**common, **prepared, "score": d["score"],
                            "synthetic": _file_hash(wd / "synthetic" / "provenance.json"),
                            "classifiers": [_file_hash(wd / "classify" / t / "provenance.json")
                                            for t in _classify_targets(recipe)]})
    raise ValueError(stage)


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "skipped"
    seconds: float
    output: str


def _outputs_complete(recipe: Recipe, stage: str) -> bool:
    wd = recipe.workdir_path
    dirs = {
        "prepare": [wd / "prepare"],
        "caption": [wd / "caption"],
        "finetune": [wd / "finetune"],
        "synthesize": [wd / "synthetic"],
        "classify": [wd / "classify" / t for t in _classify_targets(recipe)],
        "score": [wd / "score"],
    }[stage]
    for d in dirs:
        prov = read_provenance(d)
        if not prov or not prov.get("complete"):
            return False
    return True


def _ensure_judge(recipe: Recipe) -> None:
    """With curation judged by 'real', train classify/real (real train split only) when it is missing."""
    c = recipe.synthesize.curate
    if c.enabled and c.judge == "real" and not (recipe.workdir_path / "classify" / "real" / "model.safetensors").is_file():
        from .synthesize.curate import ensure_judge

        ensure_judge(recipe)


def _run_stage(recipe: Recipe, stage: str, resumable: bool = False) -> Path:
    if stage == "prepare":
        from . import data

        return data.run(recipe)
    if stage == "caption":
        from . import caption

        return caption.run(recipe)
    if stage == "finetune":
        from . import finetune

        # Resume only an interrupted run of exactly this stage key: checkpoints of a run with
        # other settings or other captions must not be continued.
        ckpts = recipe.workdir_path / "finetune" / "checkpoints"
        resume = resumable and ckpts.is_dir() and any(ckpts.iterdir())
        if resume:
            console.info("finetune: resuming the interrupted run from its last checkpoint")
        return finetune.run(recipe, resume=resume)
    if stage == "synthesize":
        from . import synthesize

        return synthesize.run(recipe)
    if stage == "classify":
        from . import classify

        out = None
        for target in _classify_targets(recipe):
            out = classify.run(recipe, train_on=target)
        assert out is not None
        return out
    if stage == "score":
        from . import score

        return score.run(recipe)
    raise ValueError(stage)


def run(recipe: Recipe, *, from_stage: str | None = None, only: str | None = None,
        force: bool = False, on_stage: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """Run the stages in order; returns what ran and what was skipped."""
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise UserError(f"{name} {value!r}: not a stage; choose one of {', '.join(STAGES)}")
    from .workspace import check_workdir

    # Before stages.json is written: a refused workdir (the data folder, a foreign folder) stays untouched.
    wd = check_workdir(recipe)
    state_path = wd / "stages.json"
    try:
        done = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except (OSError, ValueError):
        done = {}
    selected = list(STAGES)
    if from_stage:
        selected = selected[selected.index(from_stage):]
    if only:
        selected = [only]
    results = []
    for stage in STAGES:
        if stage not in selected:
            continue
        t0 = time.perf_counter()
        if stage == "synthesize":
            _ensure_judge(recipe)  # before the key: the key holds the judge's weights hash
        key = stage_key(recipe, stage)
        unchanged = done.get(stage) == key and _outputs_complete(recipe, stage)
        if unchanged and not force and not (only or (from_stage == stage)):
            console.info(f"{stage}: up to date (inputs and settings unchanged), skipped")
            res = StageResult(stage, "skipped", 0.0, str(wd))
        else:
            console.info(f"== {stage}")
            resumable = done.get(f"{stage}:started") == key
            done[f"{stage}:started"] = key
            done.pop(stage, None)
            atomic_write_json(state_path, done)
            out = _run_stage(recipe, stage, resumable=resumable)
            done[stage] = key
            atomic_write_json(state_path, done)
            res = StageResult(stage, "ran", time.perf_counter() - t0, str(out))
        results.append(res)
        if on_stage:
            on_stage(res)
    return results
