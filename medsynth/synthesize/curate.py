"""Curation: generate more candidates than planned, keep the ones a judge classifier likes best.

For every class with a target of ``t`` images, candidates ``0..ceil(oversample * t) - 1`` are
generated with exactly the seeds and prompts the plan gives samples of those indices (so
candidate ``j`` is the image an uncurated run would make as sample ``j``). Each candidate is
scored by the judge (a `medsynth classify` model): its softmax probability for the intended
class, and the cosine distance, in the judge's penultimate features centred on the real-train
mean (as `medsynth score`'s memorization check), to its nearest REAL TRAIN image. Candidates
with probability < min_score, or with distance < min_distance (near-copies; 0 disables), are
dropped; of the rest the ``t`` most probable are kept (ties: lower candidate index first) and
written as samples ``0..t-1`` in candidate order. Too few passing: further rounds generate more
candidates (at most MAX_ROUNDS rounds in all), then a UserError says which class and what to relax.

Resume: candidates are generated in fixed per-class batches; each batch's images and then its
record (``.curate/<class>/batch-<first>.json``, the commit mark) are written atomically, so a
rerun scores nothing twice and regenerates only batches without a record.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import console
from ..errors import UserError
from ..workspace import atomic_write_bytes, atomic_write_json, sha256_file
from .plan import Plan, Sample, sample_key, sample_seed

CURATE_DIR = ".curate"
MAX_ROUNDS = 4  # the first round plus up to 3 top-up rounds
# A top-up round assumes at least this acceptance rate, so one bad round cannot ask for millions.
MIN_RATE = 0.1


# ----------------------------------------------------------------------------- the judge


def judge_dir(recipe) -> Path:
    j = recipe.synthesize.curate.judge
    return recipe.workdir_path / "classify" / "real" if j == "real" else Path(j).expanduser()


def ensure_judge(recipe) -> dict:
    """{path, sha256, trained}: the judge's weights, training classify/real first when it is the judge and missing."""
    j = recipe.synthesize.curate.judge
    d = judge_dir(recipe)
    weights = d / "model.safetensors"
    trained = False
    if not weights.is_file():
        if j != "real":
            raise UserError(f"synthesize.curate.judge: {d} holds no model.safetensors; give the output directory of "
                            "`medsynth classify` (e.g. <workdir>/classify/real) or 'real' for the workspace's "
                            "real-only classifier")
        console.info(f"synthesize: curation judge {weights} is missing; training it first "
                     "(medsynth classify --real-only, real train split only)")
        from .. import classify

        classify.run(recipe, train_on="real")
        trained = True
    return {"path": str(weights), "sha256": sha256_file(weights), "trained_by_synthesize": trained}


class Judge:
    """A `medsynth classify` model: (class probabilities, penultimate features) of PIL images, float64."""

    def __init__(self, weights: str | Path, device):
        from ..features import eval_transform, load_classifier

        self.model, self.info = load_classifier(Path(weights))
        self.model = self.model.to(device).eval()
        self.device = device
        self.classes = list(self.info["classes"])
        self.tf = eval_transform(int(self.info["image_size"]), self.info["mean"], self.info["std"], self.info["geometry"])

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.stack([self.tf(im) for im in images]).to(self.device)
            f = self.model.forward_features(x)
            feats = self.model.forward_head(f, pre_logits=True).flatten(1)
            probs = torch.softmax(self.model.forward_head(f).float(), dim=1)
        return probs.double().cpu().numpy(), feats.double().cpu().numpy()


def nearest_real_distance(feats: np.ndarray, real: np.ndarray, center: np.ndarray) -> np.ndarray:
    """1 - cosine similarity to the nearest real train image, both centred on the real-train mean."""
    from ..metrics import nearest_cosine

    sims, _ = nearest_cosine(feats, real, center=center)
    return 1.0 - sims


# ----------------------------------------------------------------------------- candidates on disk


@dataclass
class Candidate:
    label: str
    cls: int
    index: int  # candidate index within the class
    seed: int
    prompt: str
    score: float
    distance: float

    @property
    def key(self) -> str:
        return sample_key(self.label, self.index)


def _class_dir(out: Path, label: str) -> Path:
    return out / CURATE_DIR / label


def _batch_record(out: Path, label: str, first: int) -> Path:
    return _class_dir(out, label) / f"batch-{first:06d}.json"


def candidate_image(out: Path, label: str, index: int, ext: str) -> Path:
    return _class_dir(out, label) / f"{sample_key(label, index)}.{ext}"


def _read_batch(path: Path) -> list[Candidate] | None:
    try:
        rows = json.loads(path.read_text())["candidates"]
        return [Candidate(**r) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: the batch is regenerated


def _batches(start: int, stop: int, bs: int) -> list[tuple[int, int]]:
    return [(b, min(stop, b + bs)) for b in range(start, stop, bs)]


def round_sizes(target: int, oversample: float, passing: int, generated: int, rnd: int) -> int:
    """Candidates to add for one class in round ``rnd`` (0 = the first)."""
    if rnd == 0:
        return math.ceil(oversample * target) if target else 0
    need = target - passing
    if need <= 0:
        return 0
    rate = max(passing / generated if generated else 0.0, MIN_RATE)
    return max(math.ceil(need / rate), math.ceil(oversample * need))


class Curator:
    """Rounds of candidate generation + judging for one synthesize run, resumable from ``<out>/.curate/``."""

    def __init__(self, recipe, plan: Plan, out: Path, ext: str, bs: int, judge_info: dict, make_engine, meta_prompt):
        self.recipe, self.plan, self.out, self.ext, self.bs = recipe, plan, out, ext, bs
        self.cfg = recipe.synthesize.curate
        self.judge_info = judge_info
        self._make_engine = make_engine  # () -> Engine, built only when a batch must be generated
        self._prompt = meta_prompt  # (label, index) -> prompt of sample/candidate `index`
        self._engine = None
        self._judge = None
        self._real = None
        self.generated_now = 0
        self.seconds = 0.0

    # -- lazy heavy parts
    def _models(self):
        if self._engine is None:
            self._engine = self._make_engine()
            from ..features import resolve_device

            self._judge = Judge(self.judge_info["path"], resolve_device(self.recipe.classify.device, "classify.device"))
            names = [c["name"] for c in self.plan.classes]
            if self._judge.classes != names:
                raise UserError(f"synthesize.curate.judge: {self.judge_info['path']} was trained on classes "
                                f"{self._judge.classes}, but this workspace's classes are {names}; retrain it "
                                "(`medsynth classify --real-only`) or name another judge")
            self._real = self._real_features()
        return self._engine, self._judge

    def _real_features(self) -> tuple[np.ndarray, np.ndarray]:
        from ..data import read_manifest
        from ..images import read_image

        rows = read_manifest(self.recipe.workdir_path, "train")
        if not rows:
            raise UserError("synthesize.curate: the real train split is empty; near-copy distances need real train images")
        parts = []
        for s in range(0, len(rows), 32):
            parts.append(self._judge([read_image(r.path) for r in rows[s:s + 32]])[1])
        feats = np.concatenate(parts)
        return feats, feats.mean(axis=0)

    # -- one batch
    def _run_batch(self, c: dict, first: int, stop: int) -> list[Candidate]:
        from PIL import Image

        from . import writer as W

        engine, judge = self._models()
        label = c["name"]
        samples = [Sample(j, c["index"], label, j, sample_key(label, j), sample_seed(self.plan.seed, label, j))
                   for j in range(first, stop)]
        prompts = {x.key: self._prompt(label, x.index) for x in samples}
        t1 = time.time()
        arrays = engine.generate(samples, prompts)
        self.seconds += time.time() - t1
        datas = [W.encode_image(a, self.ext, self.recipe.synthesize.jpg_quality) for a in arrays]
        # Judged on the encoded bytes: exactly the image a reader of the shards gets (JPEG is lossy).
        pil = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas]
        probs, feats = judge(pil)
        real, center = self._real
        dist = nearest_real_distance(feats, real, center)
        for x, d in zip(samples, datas):
            atomic_write_bytes(candidate_image(self.out, label, x.index, self.ext), d)
        cands = [Candidate(label, c["index"], x.index, x.seed, prompts[x.key], float(probs[i, c["index"]]),
                           float(dist[i])) for i, x in enumerate(samples)]
        atomic_write_json(_batch_record(self.out, label, first),
                          {"candidates": [vars(k) for k in cands]})  # written last: the batch's commit mark
        self.generated_now += len(samples)
        return cands

    def _passes(self, k: Candidate) -> bool:
        return k.score >= self.cfg.min_score and (self.cfg.min_distance <= 0 or k.distance >= self.cfg.min_distance)

    def run(self) -> tuple[dict[str, list[Candidate]], dict]:
        """(kept candidates per class in candidate order, curation summary for index.json)."""
        cfg = self.cfg
        cur = self.out / CURATE_DIR
        if cur.is_dir():  # temporary files of writes a kill interrupted; their batches have no record
            for p in cur.rglob(".*.tmp"):
                p.unlink(missing_ok=True)
        have: dict[str, list[Candidate]] = {c["name"]: [] for c in self.plan.classes}
        generated = {n: 0 for n in have}
        rounds = 0
        delay = float(os.environ.get("MEDSYNTH_SYNTH_BATCH_DELAY", "0") or 0)  # testing aid: kill mid-run
        bar = None
        for rnd in range(MAX_ROUNDS):
            work = []
            for c in self.plan.classes:
                n, t = c["name"], self.plan.counts[c["name"]]
                passing = sum(1 for k in have[n] if self._passes(k))
                add = round_sizes(t, cfg.oversample, passing, generated[n], rnd)
                if add > 0:
                    work.append((c, generated[n], generated[n] + add))
            if not work:
                break
            rounds = rnd + 1
            todo = []
            for c, start, stop in work:
                for first, last in _batches(start, stop, self.bs):
                    got = _read_batch(_batch_record(self.out, c["name"], first))
                    if got is not None and len(got) == last - first:
                        have[c["name"]] += got
                    else:
                        todo.append((c, first, last))
                generated[c["name"]] = stop
            if todo:
                bar = console.progress(total=sum(b - a for _, a, b in todo), desc=f"curate round {rnd + 1}", unit="img")
                for c, first, last in todo:
                    have[c["name"]] += self._run_batch(c, first, last)
                    bar.update(last - first)
                    if delay:
                        time.sleep(delay)
                bar.close()
            for n in have:
                have[n].sort(key=lambda k: k.index)
        kept, per_class, short = {}, {}, []
        for c in self.plan.classes:
            n, t = c["name"], self.plan.counts[c["name"]]
            cands = have[n]
            low = [k for k in cands if k.score < cfg.min_score]
            near = [k for k in cands if k.score >= cfg.min_score and not self._passes(k)]
            ok = sorted((k for k in cands if self._passes(k)), key=lambda k: (-k.score, k.index))
            if len(ok) < t:
                short.append((n, t, len(ok), len(cands), len(low), len(near)))
            kept[n] = sorted(ok[:t], key=lambda k: k.index)
            per_class[n] = {"target": t, "candidates": len(cands), "dropped_low_score": len(low),
                            "dropped_near_copy": len(near), "kept": len(kept[n]),
                            "acceptance_rate": round(len(kept[n]) / len(cands), 6) if cands else None}
        if short:
            lines = [f"class {n!r}: {got} of the {t} images it needs passed after {rounds} rounds ({m} candidates: "
                     f"{lo} with judge probability below synthesize.curate.min_score {cfg.min_score}, {ne} near-copies "
                     f"under synthesize.curate.min_distance {cfg.min_distance})" for n, t, got, m, lo, ne in short]
            raise UserError("synthesize.curate: too few candidates pass the judge;\n  " + "\n  ".join(lines) +
                            "\nRelax synthesize.curate.min_score and/or synthesize.curate.min_distance, raise "
                            "synthesize.curate.oversample, or plan fewer images for that class. The scored candidates "
                            f"stay in {self.out / CURATE_DIR} until the settings change.")
        summary = {
            "judge": {"path": self.judge_info["path"], "sha256": self.judge_info["sha256"],
                      "trained_by_synthesize": self.judge_info.get("trained_by_synthesize", False)},
            "oversample": cfg.oversample, "min_score": cfg.min_score, "min_distance": cfg.min_distance,
            "score": "judge softmax probability of the intended class",
            "distance": "1 - cosine similarity to the nearest real train image, judge penultimate features "
                        "centred on the real-train mean",
            "rounds": rounds, "per_class": per_class,
        }
        return kept, summary


def table(summary: dict) -> str:
    rows = summary["per_class"]
    w = max([5] + [len(n) for n in rows])
    lines = [f"curation (judge {summary['judge']['path']}):",
             f"  {'class':<{w}s} {'candidates':>10s} {'low score':>9s} {'near-copy':>9s} {'kept':>6s} {'accept':>7s}"]
    for n, r in rows.items():
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1%}"
        lines.append(f"  {n:<{w}s} {r['candidates']:10d} {r['dropped_low_score']:9d} {r['dropped_near_copy']:9d} "
                     f"{r['kept']:6d} {rate:>7s}")
    return "\n".join(lines)
