"""Set-up shared by the test modules: tiny real-data folders, manifests, tiny-base recipes, --set lists,
and killing a CLI run mid-way.

Plain functions (not fixtures), so that module-scoped fixtures can call them with tmp_path_factory and
keep building their workspace once per module.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import pytest
import yaml

from conftest import SHARED_DATA


def shared_data_dir() -> Path:
    """../shared/data, failing the test when it is absent (the ``shared_data`` fixture is function-scoped)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests expect ../shared/data beside the project (CI provides it)")
    return SHARED_DATA


def first_images(class_dir: Path, n: int) -> list[Path]:
    """The first n files of a class folder, by name, so every run uses the same images."""
    return sorted(class_dir.iterdir())[:n]


def link_subset(src: Path, dst: Path, classes: Iterable[str], per_class: int, copy: bool = False) -> Path:
    """A class-folder data root under dst with the first per_class images of each class of src.

    Links by default; ``copy=True`` where the test must not depend on the images' real location.
    """
    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in first_images(src / c, per_class):
            if copy:
                shutil.copy(f, dst / c / f.name)
            else:
                (dst / c / f.name).symlink_to(f.resolve())
    return dst


def write_manifest(path: Path, classes: Iterable[str], per_class: int, dataset: str = "hyperkvasir") -> Path:
    """A path,label manifest of the first per_class images of each class of a ../shared/data data set."""
    root = shared_data_dir() / dataset
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for c in classes:
            for p in first_images(root / c, per_class):
                w.writerow([str(p), c])
    return path


def tiny_manifest_recipe(name: str, workdir: Path, manifest: Path, synthesize: dict, layers: int = 1,
                         **sections: dict) -> str:
    """Recipe YAML for a 32 px tiny base (fitted VAE, 2 fit steps) over a manifest, on the CPU in fp32.

    The modules differ only in the name, the transformer depth, the synthesize block and extra sections.
    """
    doc = {
        "name": name, "workdir": str(workdir), "seed": 0, "modality": "endoscopic",
        "data": {"manifest": str(manifest)},
        "model": {"base": "tiny", "resolution": 32, "dtype": "fp32", "device": "cpu", "max_text_tokens": 16,
                  "tiny": {"layers": layers, "heads": 2, "head_dim": 8, "text_layers": 1, "text_dim": 32,
                           "vae_channels": [16, 32], "vocab_size": 200, "vae_fit_steps": 2, "vae_fit_batch": 4}},
        "synthesize": synthesize,
        **sections,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def prepare_manifest_workspace(tmp: Path, recipe_text: Callable[[Path, Path], str], classes: Iterable[str],
                               per_class: int, sets: Iterable[str] = (), recipe_name: str = "recipe.yaml") -> dict:
    """Write tmp/manifest.csv and the recipe, load it with sets and run the prepare stage.

    Returns {"tmp", "manifest", "recipe_path", "recipe"}; the caller goes on to finetune or synthesize.
    """
    from medsynth import data
    from medsynth.recipe import load_recipe

    manifest = write_manifest(tmp / "manifest.csv", classes, per_class)
    recipe_path = tmp / recipe_name
    recipe_path.write_text(recipe_text(tmp, manifest))
    r = load_recipe(recipe_path, list(sets))
    data.run(r)
    return {"tmp": tmp, "manifest": manifest, "recipe_path": recipe_path, "recipe": r}


# The tiny base the fine-tune CLI tests share: smaller than the demo's, VAE not fitted (they test training
# mechanics, not image quality). Each module adds its own finetune/synthesize values on top.
TINY_FT_MODEL = {"model.resolution": 32, "model.tiny.vae_fit_steps": 0, "model.tiny.layers": 2, "model.tiny.heads": 2,
                 "model.tiny.head_dim": 8, "model.tiny.text_layers": 1, "model.tiny.text_dim": 32,
                 "model.tiny.vae_channels": "[8,16]", "model.max_text_tokens": 24}


def set_args(tmp: Path, data: Path, *layers: dict) -> list[str]:
    """``--set key=value`` arguments for the demo recipe on data (a class-folder root), workdir tmp/ws.

    Later dicts override earlier ones, so a module passes its defaults and then a test's extras.
    """
    kv = {"data.root": str(data), "workdir": str(tmp / "ws")}
    for layer in layers:
        kv.update(layer)
    return [x for k, v in kv.items() for x in ("--set", f"{k}={v}")]


def kill_medsynth_when(args: Iterable[str], ready: Callable[[], bool], env: dict | None = None,
                       timeout: float = 300, poll: float = 0.05) -> None:
    """Run ``python -m medsynth *args`` and kill -9 it as soon as ready() holds: a crash at a chosen point.

    Fails the test when the run ends first (then nothing was interrupted) or ready() never holds.
    """
    # stderr goes to a file, not a pipe: a pipe nobody reads fills up (library warnings, progress
    # bars) and blocks the child, which then never reaches the point ready() waits for.
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "medsynth", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=err)

    def tail() -> str:
        err.seek(0)
        return err.read().decode(errors="replace")[-3000:]

    try:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed: " + tail())
            if time.time() > deadline:
                pytest.fail(f"not ready to be killed after {timeout} s: " + tail())
            time.sleep(poll)
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed: " + tail())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        err.close()
