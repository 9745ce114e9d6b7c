"""Command line. Parses arguments and calls each stage's ``run(recipe)``; nothing else.

Heavy libraries (torch, diffusers, transformers) are imported inside the commands so that
``medsynth --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__, console
from .errors import UserError

app = typer.Typer(
    name="medsynth",
    help=(
        "Class-labelled synthetic 2D medical images with Med-Art: VLM captions, LoRA fine-tuning of "
        "PixArt-alpha (DiT + T5) with the HLDF colour loss, balanced synthesis into WebDataset shards, "
        "downstream classification and scoring.\n\n"
        "RECIPE is a YAML path or a built-in name (skin, kvasir, demo). When omitted: $MEDSYNTH_RECIPE, "
        "else ./medsynth.yaml, else the recipe last used from this directory."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

# Global options may be given before the command (medsynth --json prepare) or after it.
_global: dict = {"set": [], "json": False, "quiet": False}

RecipeArg = Annotated[Optional[str], typer.Argument(help="recipe path or built-in name (optional, see `medsynth --help`)", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a recipe key, e.g. --set finetune.max_steps=100 (repeatable)", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON result object on stdout")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or info messages on stderr")]


def _version(value: bool):
    if value:
        print(f"medsynth {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    set_: SetOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
):
    _global["set"] = list(set_ or [])
    _global["json"] = json_
    _global["quiet"] = quiet
    console.set_quiet(quiet)


def _common(set_: list[str] | None, json_: bool, quiet: bool) -> tuple[list[str], bool]:
    if quiet:
        console.set_quiet(True)
    return _global["set"] + list(set_ or []), bool(json_ or _global["json"])


def _load(recipe: str | None, overrides: list[str]):
    from .recipe import resolve_recipe

    return resolve_recipe(recipe, overrides, say=console.info)


def _emit(as_json: bool, result: dict, human: str | None = None) -> None:
    if as_json:
        print(json.dumps(result, indent=None, sort_keys=True, default=str))
    elif human:
        print(human)


# ----------------------------------------------------------------------------- stages


@app.command()
def prepare(recipe: RecipeArg = None, set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False):
    """Scan the image folder (or CSV manifest), verify every image, split 80/20 per class, write manifest.csv."""
    overrides, as_json = _common(set_, json_, quiet)
    r = _load(recipe, overrides)
    from . import data
    from .recipe import remember_recipe

    manifest = data.run(r)
    remember_recipe(r)
    s = data.summary(r.workdir_path)
    _emit(as_json, {"stage": "prepare", "workdir": str(r.workdir_path), **s}, str(manifest))


@app.command("run")
def run_all(
    recipe: RecipeArg = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="start at this stage (prepare, caption, finetune, synthesize, classify, score)", show_default=False)] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="run just this stage", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="re-run stages even when nothing changed")] = False,
    set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
):
    """Run every stage in order; a stage whose inputs and settings are unchanged is skipped."""
    overrides, as_json = _common(set_, json_, quiet)
    r = _load(recipe, overrides)
    from . import pipeline
    from .recipe import remember_recipe

    remember_recipe(r)
    results = pipeline.run(r, from_stage=from_, only=only, force=force)
    out = {"stage": "run", "workdir": str(r.workdir_path),
           "stages": {x.stage: {"status": x.status, "seconds": round(x.seconds, 2), "output": x.output} for x in results}}
    _emit(as_json, out, "\n".join(f"{x.stage:11s} {x.status:8s} {x.seconds:7.1f} s  {x.output}" for x in results))


@app.command()
def compare(
    spec: Annotated[str, typer.Argument(help="compare spec: a YAML path or a built-in name (demo-compare, paper-table2, paper-table3)", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="compare directory (default: runs/compare-<spec name>)", show_default=False)] = None,
    worker: Annotated[Optional[str], typer.Option("--worker", help="run only variants k with k % N == I, e.g. --worker 0/4 (one per GPU or Slurm array task)", show_default=False)] = None,
    set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
):
    """Run the variants of a compare spec (base recipe + overrides), sharing identical stages; write report.md, table.csv, samples.png."""
    overrides, as_json = _common(set_, json_, quiet)
    from . import compare as compare_mod

    report = compare_mod.run(spec, out, overrides, worker)
    _emit(as_json, report, compare_mod.table_text(report))
    return 1 if report["failed"] else 0


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="workspace for the demo (toy data, models, outputs)")] = Path("medsynth-demo"),
    set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
):
    """Run the whole pipeline on generated toy dermoscopy images, on the CPU, with no downloads."""
    overrides, as_json = _common(set_, json_, quiet)
    from . import demo as demo_mod

    result = demo_mod.run(out, overrides)
    _emit(as_json, result, result.get("summary"))


@app.command()
def classify(
    recipe: RecipeArg = None,
    synthetic_only: Annotated[bool, typer.Option("--synthetic-only", help="train on the synthetic shards only (classify.train_on=synthetic)")] = False,
    real_only: Annotated[bool, typer.Option("--real-only", help="train on the real train split only (classify.train_on=real)")] = False,
    mixed: Annotated[bool, typer.Option("--mixed", help="train on synthetic + real train images (classify.train_on=mixed)")] = False,
    set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
):
    """Train a timm classifier on synthetic / real / mixed images; evaluate on the real test split."""
    chosen = [n for n, on in (("synthetic", synthetic_only), ("real", real_only), ("mixed", mixed)) if on]
    if len(chosen) > 1:
        raise typer.BadParameter("give at most one of --synthetic-only, --real-only, --mixed")
    overrides, as_json = _common(set_, json_, quiet)
    if chosen:
        overrides = overrides + [f"classify.train_on={chosen[0]}"]
    r = _load(recipe, overrides)
    from . import classify as classify_mod
    from .recipe import remember_recipe

    path = classify_mod.run(r)
    remember_recipe(r)
    m = json.loads(path.read_text())
    _emit(as_json, {"stage": "classify", "workdir": str(r.workdir_path), "metrics": str(path),
                    **{k: m.get(k) for k in ("train_on", "f1_macro", "balanced_accuracy", "auc_macro_ovr", "accuracy",
                                             "n_train", "n_test")}}, str(path))


@app.command()
def score(recipe: RecipeArg = None, set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False):
    """FID / KID / domain FID, colour fidelity and memorization of the synthetic set vs the real images."""
    overrides, as_json = _common(set_, json_, quiet)
    r = _load(recipe, overrides)
    from . import score as score_mod
    from .recipe import remember_recipe

    path = score_mod.run(r)
    remember_recipe(r)
    s = json.loads(path.read_text())
    _emit(as_json, {"stage": "score", "workdir": str(r.workdir_path), "scores": str(path), **score_mod.summary(s)},
          str(path))


@app.command()
def synthesize(
    recipe: RecipeArg = None,
    per_class: Annotated[Optional[int], typer.Option("--per-class", help="images per class; overrides the recipe's balance rule (per_class, counts, match_real, topup)", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="output directory (default: <workdir>/synthetic)", show_default=False)] = None,
    lora: Annotated[Optional[Path], typer.Option("--lora", help="finetune output to apply (default: <workdir>/finetune/final)", show_default=False)] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="sample the base model on purpose, without fine-tuned weights")] = False,
    format_: Annotated[Optional[str], typer.Option("--format", help="webdataset (shards) or imagefolder (one folder per class); default: synthesize.format", show_default=False)] = None,
    worker: Annotated[Optional[str], typer.Option("--worker", help="I/N: generate the I-th (0-based) of N shares of the shards, for independent jobs (Slurm array, several machines)", show_default=False)] = None,
    set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
):
    """Generate a class-balanced synthetic data set (WebDataset shards + index.json); resumable, deterministic."""
    overrides, as_json = _common(set_, json_, quiet)
    r = _load(recipe, overrides)
    from . import synthesize as synth_mod
    from .recipe import remember_recipe

    out_dir = synth_mod.run(r, per_class=per_class, out=out, lora=lora, base_only=base_only, fmt=format_, worker=worker)
    remember_recipe(r)
    s = synth_mod.summary(out_dir)
    _emit(as_json, {"stage": "synthesize", "workdir": str(r.workdir_path), **s}, str(out_dir))


@app.command()
def caption(
    recipe: RecipeArg = None,
    source: Annotated[Optional[str], typer.Option("--source", help="vlm | simple | empty | file | stats (overrides caption.source)", show_default=False)] = None,
    all_splits: Annotated[bool, typer.Option("--all-splits", help="caption every image, not only the train split (caption.splits=all)")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="caption everything again (the old captions.jsonl is kept in caption/previous/)")] = False,
    set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
):
    """Describe every training image in plain visual language (VLM, template, file or image statistics) -> captions.jsonl; resumable."""
    overrides, as_json = _common(set_, json_, quiet)
    if source is not None:
        overrides = overrides + [f"caption.source={source}"]
    if all_splits:
        overrides = overrides + ["caption.splits=all"]
    r = _load(recipe, overrides)
    from . import caption as caption_mod
    from .recipe import remember_recipe

    out_path = caption_mod.run(r, fresh=fresh)
    remember_recipe(r)
    s = caption_mod.summary(out_path)
    _emit(as_json, {"stage": "caption", "workdir": str(r.workdir_path), **s}, str(out_path))


@app.command()
def finetune(
    recipe: RecipeArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in <workdir>/finetune/checkpoints (adapters, optimizer, LR schedule, RNG, data position)")] = False,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="stop after N optimizer steps in total (overrides finetune.max_steps / epochs)", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print trainable / frozen parameters per module, the estimated peak GPU memory (and whether it fits 24 / 40 / 80 GB), steps and time per epoch; loads no weights, writes nothing")] = False,
    step_seconds: Annotated[Optional[float], typer.Option("--step-seconds", min=0.0, help="with --dry-run: seconds per optimizer step measured on the target GPU, for the time per epoch", show_default=False)] = None,
    processes: Annotated[int, typer.Option("--processes", min=1, help="with --dry-run: data-parallel processes the run will use (steps per epoch)")] = 1,
    set_: SetOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
):
    """LoRA fine-tune PixArt-alpha (DiT + T5) with the HLDF colour loss -> <workdir>/finetune/final; resumable, multi-GPU via `accelerate launch`."""
    overrides, as_json = _common(set_, json_, quiet)
    if dry_run and max_steps is not None:
        overrides = overrides + [f"finetune.max_steps={max_steps}"]  # so the plan's total steps honour it
    r = _load(recipe, overrides)
    if dry_run:
        from .finetune import estimate

        plan = estimate.estimate(r, step_seconds=step_seconds, processes=processes)
        if as_json:
            _emit(True, {"workdir": str(r.workdir_path), **estimate.to_json(plan)})
        else:
            print(estimate.table(plan))
        return
    from . import finetune as finetune_mod
    from .recipe import remember_recipe

    out_dir = finetune_mod.run(r, resume=resume, max_steps=max_steps)
    remember_recipe(r)
    s = finetune_mod.summary(out_dir)
    _emit(as_json, {"stage": "finetune", "workdir": str(r.workdir_path), **s}, str(out_dir / "final"))


# ----------------------------------------------------------------------------- recipes


@recipes_app.command("list")
def recipes_list(json_: JsonOpt = False):
    """List the built-in recipes."""
    from .recipe import builtin_names, builtin_path

    names = builtin_names()
    if json_ or _global["json"]:
        _emit(True, {"recipes": {n: str(builtin_path(n)) for n in names}})
        return
    for n in names:
        first = builtin_path(n).read_text().splitlines()[:3]
        desc = next((ln.lstrip("# ").strip() for ln in first if ln.startswith("#") and "medsynth" not in ln), "")
        print(f"{n:10s} {desc}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="built-in name or path")],
                 set_: SetOpt = None, json_: JsonOpt = False,
                 resolved: Annotated[bool, typer.Option("--resolved", help="print the fully resolved recipe (every default filled in)")] = False):
    """Print a recipe (as written, or --resolved with every default)."""
    overrides, as_json = _common(set_, json_, False)
    from .recipe import find_recipe_file, load_recipe, recipe_yaml

    if resolved or overrides or as_json:
        r = load_recipe(name, overrides)
        if as_json:
            _emit(True, r.to_dict())
        else:
            sys.stdout.write(recipe_yaml(r))
    else:
        sys.stdout.write(find_recipe_file(name).read_text())


@recipes_app.command("validate")
def recipes_validate(files: Annotated[list[str], typer.Argument(help="recipe paths or built-in names")],
                     set_: SetOpt = None, json_: JsonOpt = False):
    """Check recipes; every problem of every file is listed, exit 1 if any."""
    overrides, as_json = _common(set_, json_, False)
    from .errors import RecipeError
    from .recipe import load_recipe

    results, failed = {}, []
    for f in files:
        try:
            load_recipe(f, overrides)
            results[f] = []
        except RecipeError as e:
            results[f] = e.problems
            failed.append(str(e))
        except UserError as e:
            results[f] = [str(e)]
            failed.append(str(e))
    if as_json:
        _emit(True, {"valid": not failed, "problems": results})
    else:
        for f, probs in results.items():
            if not probs:
                print(f"{f}: ok")
    if failed:
        raise UserError("\n".join(failed))


# ----------------------------------------------------------------------------- entry point


def _click_exception_types() -> tuple[tuple, tuple]:
    """(UsageError types, ClickException types): newer Typer vendors click as typer._click."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(__import__(name, fromlist=["UsageError"]))
        except ImportError:
            pass
    return tuple(m.UsageError for m in mods), tuple(m.ClickException for m in mods)


def main(argv: list[str] | None = None) -> int:
    usage_errors, click_errors = _click_exception_types()
    try:
        rv = app(args=argv, prog_name="medsynth", standalone_mode=False)
        return int(rv) if isinstance(rv, int) else 0
    except usage_errors as e:
        e.show(file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except click_errors as e:
        e.show(file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
