"""`medsynth compare SPEC`: several variants of one base recipe, side by side (docs/compare.md).

A spec names a base recipe and variants (dotted-key overrides). Every variant is a normal
`medsynth run` in its own workspace ``<out>/<name>/``. Stages whose inputs are identical are
done once in ``<out>/_shared/`` and their outputs copied into each variant together with the
stage key the pipeline would compute, so the variant's own run skips them as up to date:

- prepare, keyed by ``pipeline.stage_key(recipe, "prepare")`` (data, split settings, seed, classes);
- caption, keyed by the variant's caption stage key (manifest + caption settings + base model).

Per-variant status (stage times, peak memory, error) lives in ``<out>/_shared/status/<name>.json``,
so the report can be assembled from whatever has finished, by any worker.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import resource
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import console
from .errors import UserError
from .recipe import Recipe, build_recipe, find_recipe_file
from .workspace import atomic_path, atomic_write_json, atomic_write_text, ensure_dir

SPEC_DIRS = (
    Path(__file__).resolve().parent / "recipes" / "compare",  # installed wheel (recipes/ is force-included)
    Path(__file__).resolve().parent.parent / "recipes" / "compare",  # source checkout / editable install
)
SPEC_KEYS = ("base", "set", "variants", "description")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
SHARED = "_shared"
STAGE_NAMES = ("prepare", "caption", "finetune", "synthesize", "classify", "score")

# samples.png geometry: a label column, a header row, then one square cell per (class, column).
CELL = 96
LABEL_W = 150
HEADER_H = 24


@dataclass
class Variant:
    name: str
    recipe: Recipe


@dataclass
class Spec:
    path: Path
    base: str
    variants: list[Variant] = field(default_factory=list)
    demo_data: Path | None = None  # toy data to generate first (base `demo` without a data.root)


# ----------------------------------------------------------------------------- spec


def spec_names() -> list[str]:
    names: set[str] = set()
    for d in SPEC_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_spec(ref: str) -> Path:
    """A YAML path, or the name of a built-in spec in recipes/compare/."""
    p = Path(ref)
    if p.is_file():
        return p
    if not p.suffix and "/" not in ref:
        for d in SPEC_DIRS:
            if (d / f"{ref}.yaml").is_file():
                return d / f"{ref}.yaml"
    raise UserError(f"compare spec '{ref}' not found: it is neither a file nor a built-in spec "
                    f"({', '.join(spec_names()) or 'none installed'}). Give a path to a YAML spec or a built-in name.")


def _override(key: str, value: Any) -> str:
    # JSON is YAML: parse_set reads the value back exactly (strings, numbers, lists, null).
    return f"{key}={json.dumps(value)}"


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping of dotted recipe keys to values "
                        f"(e.g. {{finetune.hldf.enabled: false}}), not {type(value).__name__} {value!r}")
    return value


def load_spec(ref: str, out: Path, cli_set: list[str] | None = None) -> Spec:
    """Read and validate the spec; every variant's recipe is built now, so all errors come before any work."""
    path = find_spec(ref)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read compare spec {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}. Fix the syntax.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a compare spec is a mapping with base:, variants: and optional set:")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; a spec has {', '.join(SPEC_KEYS)}")
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: base: must name a recipe (a built-in name such as kvasir, or a path), got {base!r}")
    if "/" in base and not Path(base).is_absolute() and not Path(base).is_file():
        base = str((path.parent / base))  # a relative base path is relative to the spec file
    base_path = find_recipe_file(base)
    base_raw = yaml.safe_load(base_path.read_text(encoding="utf-8"))
    common = [_override(k, v) for k, v in _mapping(raw.get("set"), f"{path}: set").items()]
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise UserError(f"{path}: variants: must map variant names to overrides, e.g. variants: {{baseline: {{}}}}")
    out = Path(out)
    spec = Spec(path=path, base=base)
    problems = []
    for name, ov in variants_raw.items():
        name = str(name)
        if not NAME_RE.match(name):
            problems.append(f"variant name {name!r}: use letters, digits, '-' and '_' (not starting with '-' or '_'); "
                            f"it becomes the folder {out}/<name>/")
            continue
        try:
            own = [_override(k, v) for k, v in _mapping(ov, f"{path}: variants.{name}").items()]
        except UserError as e:
            problems.append(str(e))
            continue
        overrides = common + list(cli_set or []) + own + [f"workdir={(out / name).resolve()}"]
        try:
            r = build_recipe(base_raw, f"{path} (variant {name})", overrides, default_name=f"{base_path.stem}-{name}")
        except UserError as e:
            problems.append(str(e))
            continue
        spec.variants.append(Variant(name, r))
    if problems:
        raise UserError(f"{path}: invalid compare spec:\n" + "\n".join(problems))
    if base_path.stem == "demo" and all(v.recipe.data.root is None and v.recipe.data.manifest is None for v in spec.variants):
        # Like `medsynth demo`: the demo recipe leaves data.root empty and the toy data is generated.
        spec.demo_data = (out / SHARED / "demo-data").resolve()
        for v in spec.variants:
            v.recipe.data.root = str(spec.demo_data)
    return spec


# ----------------------------------------------------------------------------- shared stages


@contextmanager
def _lock(path: Path):
    """Two workers may need the same shared stage: one computes it, the other waits and reuses it."""
    import fcntl

    ensure_dir(path.parent)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _copy_into(src_wd: Path, dst_wd: Path, names: tuple[str, ...]) -> None:
    """Copy files/folders of one workspace into another, each replaced as a whole (temporary name, rename)."""
    for n in names:
        s, d = src_wd / n, dst_wd / n
        tmp = dst_wd / f".{n}.compare-tmp"
        if tmp.is_dir():
            shutil.rmtree(tmp)
        if s.is_dir():
            shutil.copytree(s, tmp)
            if d.is_dir():
                shutil.rmtree(d)
            os.replace(tmp, d)
        else:
            shutil.copy2(s, tmp)
            os.replace(tmp, d)


def _at(recipe: Recipe, workdir: Path) -> Recipe:
    r = copy.deepcopy(recipe)
    r.workdir = str(workdir)
    return r


_OUTPUTS = {"prepare": ("manifest.csv", "classes.json", "prepare"), "caption": ("captions.jsonl", "caption")}


def _ensure_shared(recipe: Recipe, stage: str, shared_wd: Path, times: dict) -> str:
    """Run ``stage`` in ``shared_wd`` unless it is up to date there; returns its stage key."""
    from . import pipeline
    from .workspace import claim

    sr = _at(recipe, shared_wd)
    with _lock(shared_wd.parent / f"{shared_wd.name}.lock"):
        state = _read_json(shared_wd / "stages.json") or {}
        key = pipeline.stage_key(sr, stage)
        if state.get(stage) == key and pipeline._outputs_complete(sr, stage):
            console.info(f"compare: shared {stage} in {shared_wd} is up to date, reused")
        else:
            claim(sr)
            res = pipeline.run(sr, only=stage)
            times_doc = _read_json(shared_wd / "times.json") or {}
            atomic_write_json(shared_wd / "times.json", {**times_doc, stage: round(res[0].seconds, 2)})
        times[stage] = (_read_json(shared_wd / "times.json") or {}).get(stage)
        return key


def _install(recipe: Recipe, stage: str, shared_wd: Path, key: str) -> None:
    """Copy the shared outputs of ``stage`` into the variant and record ``key`` in its stages.json."""
    from . import pipeline

    wd = recipe.workdir_path
    state_path = wd / "stages.json"
    state = _read_json(state_path) or {}
    if state.get(stage) == key and pipeline._outputs_complete(recipe, stage):
        return
    _copy_into(shared_wd, wd, _OUTPUTS[stage])
    state[stage] = key
    atomic_write_json(state_path, state)


def share_stages(recipe: Recipe, out: Path) -> dict:
    """prepare and caption for one variant, each computed once per distinct key under <out>/_shared/."""
    from . import pipeline
    from .workspace import claim

    shared = Path(out) / SHARED
    times: dict = {}
    claim(recipe)  # the variant folder is a marked workspace before anything is copied into it
    from .recipe import recipe_yaml

    # prepare/ and caption/ hold the shared run's config.yaml: keep the variant's own recipe beside them,
    # so `medsynth run <out>/<name>/recipe.yaml` works in the variant folder by hand.
    atomic_write_text(recipe.workdir_path / "recipe.yaml", recipe_yaml(recipe))
    pkey = pipeline.stage_key(recipe, "prepare")  # independent of the workdir
    pwd = shared / f"prepare-{pkey[:16]}"
    key = _ensure_shared(recipe, "prepare", pwd, times)
    assert key == pkey
    _install(recipe, "prepare", pwd, pkey)
    # The caption key reads the manifest, which is now the variant's (byte-identical) copy.
    ckey = pipeline.stage_key(recipe, "caption")
    cwd = shared / f"caption-{ckey[:16]}"
    claim(_at(recipe, cwd))
    _install(_at(recipe, cwd), "prepare", pwd, pkey)
    key = _ensure_shared(recipe, "caption", cwd, times)
    if key != ckey:  # cannot happen unless stage_key starts reading the workdir path: then do not share
        raise RuntimeError(f"shared caption key {key} differs from the variant's {ckey}")
    _install(recipe, "caption", cwd, ckey)
    return times


# ----------------------------------------------------------------------------- running


def _status_path(out: Path, name: str) -> Path:
    return Path(out) / SHARED / "status" / f"{name}.json"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_variant(v: Variant, out: Path) -> dict:
    from . import pipeline

    prev = _read_json(_status_path(out, v.name)) or {}
    status: dict = {"name": v.name, "workdir": str(v.recipe.workdir_path), "status": "running",
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": dict(prev.get("seconds") or {}),
                    "runs": {}}
    atomic_write_json(_status_path(out, v.name), status)
    t0 = time.perf_counter()
    try:
        shared_times = share_stages(v.recipe, out)
        for st, s in shared_times.items():
            status["seconds"][st] = s
            status["runs"][st] = "shared"

        def on_stage(res):
            status["runs"][res.stage] = res.status if res.stage not in shared_times else "shared"
            if res.status == "ran":
                status["seconds"][res.stage] = round(res.seconds, 2)
            atomic_write_json(_status_path(out, v.name), status)

        pipeline.run(v.recipe, on_stage=on_stage)
        status["status"] = "done"
        status.pop("error", None)
    except UserError as e:
        status.update(status="failed", error=str(e))
    except Exception as e:  # one broken variant must not stop the others; the text goes into the report
        status.update(status="failed", error=f"{type(e).__name__}: {e}")
        console.warn(traceback.format_exc())
    status["wall_seconds"] = round(time.perf_counter() - t0, 2)
    status["peak_rss_mb"] = round(peak_rss_mb(), 1)
    status["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(_status_path(out, v.name), status)
    if status["status"] == "failed":
        console.warn(f"compare: variant {v.name} failed: {status['error']}")
    return status


def parse_worker(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--worker {text!r}: expected I/N with 0 <= I < N, e.g. --worker 0/4 "
                        "(in a Slurm array: --worker $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m.group(1)), int(m.group(2))


def run(spec_ref: str, out: Path | None = None, cli_set: list[str] | None = None, worker: str | None = None) -> dict:
    """Run this worker's share of the variants, then (re)write the report; returns the report dict."""
    i, n = parse_worker(worker)
    if out is None:
        out = Path("runs") / f"compare-{Path(find_spec(spec_ref)).stem}"
    out = Path(out)
    spec = load_spec(spec_ref, out, cli_set)
    ensure_dir(out / SHARED / "status")
    if spec.demo_data is not None:
        from . import demo_data

        with _lock(out / SHARED / "demo-data.lock"):
            demo_data.generate(spec.demo_data)
    for k, v in enumerate(spec.variants):
        if k % n != i:
            continue
        console.info(f"== compare: variant {v.name} ({k + 1}/{len(spec.variants)})")
        run_variant(v, out)
    return write_report(spec, out)


# ----------------------------------------------------------------------------- report

# Columns where lower is better; every other marked column is higher-is-better.
_LOWER = ("fid", "kid", "fd_", "colour_", "memorization", "seconds", "peak_rss")
_HIGHER = ("balanced_accuracy", "f1_macro", "auc", "precision", "recall", "density", "coverage")
_UNMARKED = ("_std", "n_real", "n_synthetic", "prdc_k")


def direction(col: str) -> str | None:
    if any(u in col for u in _UNMARKED):
        return None
    if any(col.startswith(p) or p in col for p in _LOWER):
        return "min"
    if any(p in col for p in _HIGHER):
        return "max"
    return None


def _mean(x) -> float | None:
    try:
        return float(sum(x) / len(x))
    except (TypeError, ZeroDivisionError):
        return None


def _classify_cols(m: dict | None, prefix: str) -> dict:
    m = m or {}
    return {f"{prefix}balanced_accuracy": m.get("balanced_accuracy"), f"{prefix}f1_macro": m.get("f1_macro"),
            f"{prefix}auc_macro_ovr": m.get("auc_macro_ovr")}


def variant_row(v: Variant, out: Path) -> dict:
    from .score import summary

    wd = v.recipe.workdir_path
    st = _read_json(_status_path(out, v.name)) or {"status": "pending"}
    row: dict = {"variant": v.name, "status": st.get("status", "pending"), "train_on": v.recipe.classify.train_on}
    scores = _read_json(wd / "score" / "scores.json") if st.get("status") == "done" else None
    if scores:
        for k, val in summary(scores).items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                row[k] = val
        col = scores.get("colour") or {}
        col = col.get("overall", col)  # {"overall": ..., "per_class": ...}; the overall numbers go in the table
        for k in ("mean_abs_diff_rgb", "std_abs_diff_rgb", "w1_rgb"):
            if k in col:
                row[f"colour_{k.removesuffix('_rgb')}"] = _mean(col[k])
        if "w1_saturation" in col:
            row["colour_w1_saturation"] = col["w1_saturation"]
        if "memorization_fraction" in scores:
            row["memorization_fraction"] = scores["memorization_fraction"]
    m = _read_json(wd / "classify" / v.recipe.classify.train_on / "metrics.json") if st.get("status") == "done" else None
    row.update(_classify_cols(m, ""))
    for s in STAGE_NAMES:
        row[f"seconds_{s}"] = (st.get("seconds") or {}).get(s)
    # The cost of producing the variant, not of the last compare run (a rerun that skips everything takes ~0 s).
    secs = [row[f"seconds_{s}"] for s in STAGE_NAMES if isinstance(row[f"seconds_{s}"], (int, float))]
    row["seconds_total"] = round(sum(secs), 2) if secs else None
    row["peak_rss_mb"] = st.get("peak_rss_mb")
    row["error"] = st.get("error", "")
    row["_per_class_recall"] = {c: d.get("recall") for c, d in (m or {}).get("per_class", {}).items()}
    return row


def _real_row(spec: Spec) -> dict | None:
    """The real-only classifier (every `run` trains one for domain features) of the first finished variant."""
    for v in spec.variants:
        m = _read_json(v.recipe.workdir_path / "classify" / "real" / "metrics.json")
        if m:
            return {"variant": "real-only (reference)", "status": "reference", "train_on": "real",
                    **_classify_cols(m, ""), "error": "",
                    "_per_class_recall": {c: d.get("recall") for c, d in m.get("per_class", {}).items()}}
    return None


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(spec: Spec, out: Path) -> dict:
    rows = [variant_row(v, out) for v in spec.variants]
    ref = _real_row(spec)
    all_rows = rows + ([ref] if ref else [])
    cols: list[str] = []
    for r in all_rows:
        cols += [k for k in r if k not in cols and not k.startswith("_")]
    # error last: it is long
    cols = [c for c in cols if c != "error"] + ["error"]
    best: dict[str, float] = {}
    for c in cols:
        d = direction(c)
        # Only finished variants compete: a variant that failed in 0.02 s is not the fastest, and the real-only
        # reference is a yardstick, not a candidate.
        vals = [r.get(c) for r in rows if r["status"] == "done"
                and isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)]
        if d and vals:
            best[c] = min(vals) if d == "min" else max(vals)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in all_rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    atomic_write_text(out / "table.csv", buf.getvalue())

    failed = [r for r in rows if r["status"] == "failed"]
    L = [f"# medsynth compare: {spec.path.stem}", "",
         f"Spec: `{spec.path}` (base recipe `{spec.base}`), {len(rows)} variants: "
         f"{sum(r['status'] == 'done' for r in rows)} done, {len(failed)} failed, "
         f"{sum(r['status'] in ('pending', 'running') for r in rows)} pending or running.", "",
         "**Bold** = best value of the column (lower is better for FID, KID, colour errors, memorization, "
         "seconds and memory; higher for balanced accuracy, F1, AUC, precision/recall/density/coverage), among the "
         "finished variants. "
         "Classification metrics are of the classifier trained on each variant's `classify.train_on` data "
         "(synthetic-only by default), evaluated on the real test split; the last row is the real-only reference. "
         "`peak_rss_mb` is the peak resident memory of the compare process up to the end of that variant "
         "(ru_maxrss: variants run in one process, so it never decreases; the first variant's value and any "
         "increase are informative). Shared stages (prepare, caption) show the time of their one shared run.", ""]
    shown = [c for c in cols if c not in ("error", "train_on")]
    L.append("| " + " | ".join(shown) + " |")
    L.append("|" + "---|" * len(shown))
    for r in all_rows:
        cells = []
        for c in shown:
            v = r.get(c)
            s = _fmt(v)
            if c in best and r["status"] == "done" and isinstance(v, (int, float)) and v == best[c]:
                s = f"**{s}**"
            cells.append(s)
        L.append("| " + " | ".join(cells) + " |")
    if failed:
        L += ["", "## Failed variants", ""]
        for r in failed:
            L += [f"- **{r['variant']}** (workspace `{out / r['variant']}`):", "", "  ```",
                  *("  " + x for x in (r["error"].strip() or "(no message)").splitlines()), "  ```"]
    recall_rows = [r for r in all_rows if r.get("_per_class_recall")]
    classes = _class_names(spec)
    if recall_rows and classes:
        L += ["", "## Per-class balanced accuracy (recall of each class on the real test split)", "",
              "![per-class recall](recall.png)", "",
              "| variant | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
        for r in recall_rows:
            L.append(f"| {r['variant']} | " + " | ".join(_fmt(r['_per_class_recall'].get(c)) for c in classes) + " |")
        recall_png(classes, recall_rows, out / "recall.png")
    if classes:
        samples_png(spec, classes, out / "samples.png")
        L += ["", "## Samples", "", "![samples](samples.png)", "",
              "One row per class; the first column is a real image, then one column per variant "
              "(the first synthetic image of that class)."]
    atomic_write_text(out / "report.md", "\n".join(L) + "\n")
    return {"compare": spec.path.stem, "out": str(out), "report": str(out / "report.md"),
            "table": str(out / "table.csv"), "samples": str(out / "samples.png") if classes else None,
            "failed": [r["variant"] for r in failed],
            "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in all_rows]}


def table_text(report: dict) -> str:
    keys = ("variant", "status", "balanced_accuracy", "f1_macro", "auc_macro_ovr", "kid_domain_mean", "fid",
            "domain_fid", "seconds_total")
    rows = report["rows"]
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    lines = ["  ".join(f"{k:>18s}" if k != "variant" else f"{k:24s}" for k in keys)]
    for r in rows:
        lines.append("  ".join(f"{_fmt(r.get(k)):>18s}" if k != "variant" else f"{r['variant']:24s}" for k in keys))
    lines.append(f"report: {report['report']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pictures


def _class_names(spec: Spec) -> list[str]:
    for v in spec.variants:
        c = _read_json(v.recipe.workdir_path / "classes.json")
        if c:
            return [x["name"] for x in c["classes"]]
    return []


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _cell(img, size: int = CELL):
    from PIL import ImageOps

    return ImageOps.fit(img.convert("RGB"), (size, size))


def _real_image(wd: Path, label: str):
    from PIL import Image

    from .data import read_manifest

    try:
        rows = read_manifest(wd)
    except UserError:
        return None
    for split in ("test", "train"):
        for r in rows:
            if r.label == label and r.split == split:
                try:
                    with Image.open(r.path) as im:
                        return im.convert("RGB")
                except OSError:
                    continue
    return None


def _synthetic_images(wd: Path, classes: list[str]) -> dict[int, Any]:
    from . import synthdata

    try:
        samples = synthdata.index_samples(wd, classes)
    except (UserError, OSError, ValueError):
        return {}
    first: dict[int, Any] = {}
    for s in samples:
        if s.label not in first:
            first[s.label] = synthdata.read_image(s)
    return first


def samples_png(spec: Spec, classes: list[str], path: Path) -> Path:
    """The paper's Fig. 2 layout: rows = classes, columns = one real image then one image per variant."""
    from PIL import Image, ImageDraw

    cols = ["real"] + [v.name for v in spec.variants]
    W, H = LABEL_W + CELL * len(cols), HEADER_H + CELL * len(classes)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    real_wd = next((v.recipe.workdir_path for v in spec.variants if (v.recipe.workdir_path / "manifest.csv").is_file()), None)
    for j, name in enumerate(cols):
        draw.text((LABEL_W + j * CELL + 3, 5), name[:15], fill="black", font=font)
    for i, c in enumerate(classes):
        draw.text((4, HEADER_H + i * CELL + CELL // 2 - 6), c[:24], fill="black", font=font)
    for i, c in enumerate(classes):
        img = _real_image(real_wd, c) if real_wd else None
        if img is not None:
            canvas.paste(_cell(img), (LABEL_W, HEADER_H + i * CELL))
    for j, v in enumerate(spec.variants, start=1):
        imgs = _synthetic_images(v.recipe.workdir_path, classes)
        for i in range(len(classes)):
            x, y = LABEL_W + j * CELL, HEADER_H + i * CELL
            if i in imgs:
                canvas.paste(_cell(imgs[i]), (x, y))
            else:  # failed or unfinished variant: an empty, crossed cell
                draw.rectangle([x + 2, y + 2, x + CELL - 3, y + CELL - 3], outline="grey")
                draw.line([x + 2, y + 2, x + CELL - 3, y + CELL - 3], fill="grey")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]


def recall_png(classes: list[str], rows: list[dict], path: Path) -> Path:
    """Grouped bars with PIL (no plotting dependency): per class, one bar per variant, height = recall in [0, 1]."""
    from PIL import Image, ImageDraw

    bar, gap, plot_h, left, top = 12, 16, 200, 40, 10
    group_w = bar * len(rows) + gap
    legend_h = 14 * len(rows) + 8
    W = left + group_w * len(classes) + 10
    H = top + plot_h + 40 + legend_h
    canvas = Image.new("RGB", (max(W, 260), H), "white")
    d = ImageDraw.Draw(canvas)
    font = _font()
    y0 = top + plot_h
    for t in (0.0, 0.5, 1.0):
        y = y0 - int(t * plot_h)
        d.line([left - 4, y, W - 5, y], fill="#dddddd")
        d.text((2, y - 6), f"{t:.1f}", fill="black", font=font)
    for ci, c in enumerate(classes):
        gx = left + ci * group_w
        for ri, r in enumerate(rows):
            v = r["_per_class_recall"].get(c)
            if v is None:
                continue
            x = gx + ri * bar
            d.rectangle([x, y0 - int(v * plot_h), x + bar - 2, y0], fill=_PALETTE[ri % len(_PALETTE)])
        d.text((gx, y0 + 4), c[:max(3, group_w // 6)], fill="black", font=font)
    for ri, r in enumerate(rows):
        y = y0 + 26 + 14 * ri
        d.rectangle([left, y, left + 10, y + 10], fill=_PALETTE[ri % len(_PALETTE)])
        d.text((left + 16, y - 1), r["variant"], fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
