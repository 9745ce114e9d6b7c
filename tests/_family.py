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
