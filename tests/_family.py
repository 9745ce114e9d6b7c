"""Set-up shared by the per-family tests (test_family_*.py): a prepared 3-class HyperKvasir subset
and the family's tiny base, built once per module, driven through the real CLI."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import ONE_THREAD, SHARED_DATA, run_cli
from test_finetune_cli import _sets, _subset


def cli_env(tmp: Path) -> dict:
    # Module-scoped fixtures run outside conftest's per-test state isolation: give the CLI its own.
    return {**ONE_THREAD, "MEDSYNTH_STATE_DIR": str(tmp / "state")}


def family_recipe(tmp: Path, data: Path, settings: dict, **extra):
    """The demo recipe with the tiny fine-tune settings, the family's ``settings`` and ``extra`` on top."""
    from medsynth.recipe import load_recipe

    return load_recipe("demo", [x for x in _sets(tmp, data, **{**settings, **extra}) if x != "--set"])


def prepare_family_base(tmp_path_factory, name: str, settings: dict):
    """(tmp, data, recipe, base dir): ``medsynth prepare`` on the subset, the tiny base resolved (built)."""
    from medsynth.models.loading import resolve_base

    tmp = tmp_path_factory.mktemp(name)
    data = _subset(SHARED_DATA / "hyperkvasir", tmp / "data")
    r = run_cli("prepare", "demo", *_sets(tmp, data, **settings), env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    recipe = family_recipe(tmp, data, settings)
    return tmp, data, recipe, Path(resolve_base(recipe))


def load_comps(recipe):
    from medsynth.models.loading import load_components

    return load_components(recipe, device="cpu", dtype=torch.float32)


def synthesized(recipe, ws: Path, final: Path, per_class: int):
    """What ``medsynth synthesize`` makes from the finetune output ``final`` (fp32, CPU), for a
    stock-pipeline comparison: (samples, prompts by sample key, float images, initial noise).
    The engine is dropped before returning: one copy of the base in memory at a time."""
    import gc

    from medsynth.data import read_classes
    from medsynth.synthesize import load_model, make_plan
    from medsynth.synthesize.engine import Engine
    from medsynth.synthesize.prompts import build_prompts

    s, m = recipe.synthesize, recipe.model
    plan = make_plan(recipe, read_classes(ws), per_class)
    samples = [plan.shard(i)[j] for i in range(plan.n_shards) for j in range(len(plan.shard(i)))]
    prompts, _ = build_prompts(recipe, plan, ws)
    eng = Engine(load_model(recipe, final, "cpu", torch.float32), resolution=m.resolution, steps=s.steps,
                 guidance=s.guidance, negative_prompt=s.negative_prompt, max_text_tokens=m.max_text_tokens,
                 device="cpu", dtype=torch.float32)
    ours, noise = eng.generate_float(samples, prompts), eng.noise(samples)
    del eng
    gc.collect()
    return samples, prompts, ours, noise


def assert_stock_parity(pipe, args: dict, load, ours, label: str, min_change: float):
    """``pipe(**args)`` after ``load(pipe)`` (the finetune output loaded the stock way) gives medsynth's
    images ``ours`` (<= 1e-4, fp32), and ``load`` changed them by more than ``min_change`` (the check
    is not vacuous). Returns the stock pipeline's images."""
    import numpy as np

    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        plain = pipe(**args).images
        load(pipe)
        theirs = pipe(**args).images
    diff = float(np.abs(ours - theirs).max())
    print(f"max |synthesize - {label}| = {diff:.3g}")
    assert diff <= 1e-4, diff
    assert float(np.abs(theirs - plain).max()) > min_change
    return theirs


# What `medsynth -q` must not print: weight-loading / shard-writing progress bars, library log lines
# and library Future/Deprecation warnings.
LIBRARY_CHATTER = ("Loading weights", "Writing model shards", "FutureWarning", "DeprecationWarning",
                   "should be kept in float32", "it/s]")


def assert_quiet(stderr: str) -> None:
    for noise in LIBRARY_CHATTER:
        assert noise not in stderr, (noise, stderr[-2000:])
