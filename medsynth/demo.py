"""`medsynth demo`: the embedded default — toy dermoscopy data, then every stage, on the CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import console, demo_data, pipeline
from .recipe import load_recipe, remember_recipe


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(out: Path, overrides: list[str] | None = None) -> dict:
    """Generate the toy data under ``out/data`` and run the demo recipe with workdir ``out/work``."""
    t0 = time.perf_counter()
    out = Path(out)
    data_dir = demo_data.generate(out / "data")
    recipe = load_recipe("demo", [f"data.root={data_dir.resolve()}", f"workdir={(out / 'work').resolve()}"] + list(overrides or []))
    results = pipeline.run(recipe)
    remember_recipe(recipe)
    wd = recipe.workdir_path
    result: dict = {
        "stage": "demo",
        "workdir": str(wd),
        "seconds": round(time.perf_counter() - t0, 1),
        "stages": {r.stage: {"status": r.status, "seconds": round(r.seconds, 1)} for r in results},
    }
    lines = [f"demo finished in {result['seconds']:.0f} s; workspace {wd}"]
    report = wd / "score" / "report.md"
    if report.is_file():
        result["report"] = str(report)
        lines.append(f"report: {report}")
    n_classes = len(json.loads((wd / "classes.json").read_text())["classes"])
    result["chance"] = 1.0 / n_classes
    for target in ("synthetic", "real"):
        m = _read_json(wd / "classify" / target / "metrics.json")
        if m:
            result[f"classify_{target}"] = {k: m.get(k) for k in ("balanced_accuracy", "f1_macro", "auc_macro_ovr")}
            lines.append(
                f"{target}-only classifier on the real test split: balanced accuracy {m.get('balanced_accuracy', float('nan')):.3f} "
                f"(chance {1.0 / n_classes:.3f}), macro F1 {m.get('f1_macro', float('nan')):.3f}, AUC {m.get('auc_macro_ovr') or float('nan'):.3f}"
            )
    s = _read_json(wd / "score" / "scores.json")
    if s:
        from .score import summary

        result["scores"] = {k: v for k, v in summary(s).items() if k not in ("n_real", "n_synthetic")}
        lines.append("scores: " + ", ".join(f"{k} {v:.4g}" for k, v in result["scores"].items() if isinstance(v, (int, float))))
    result["summary"] = "\n".join(lines)
    console.info("")
    return result
