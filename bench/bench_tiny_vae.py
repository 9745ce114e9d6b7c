"""Fit the tiny base's VAE on a real data set and measure reconstruction PSNR on its test split.

    python bench/bench_tiny_vae.py ../shared/data/hyperkvasir [--set model.tiny.vae_fit_steps=600 ...]

Builds the tiny base exactly as `model.base: tiny` does (demo recipe, 64 px), so the numbers in
docs/models.md come from the shipped code path. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_root")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default); 1 gives CPU times that mean something on a busy machine")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from medsynth import data
    from medsynth.data import read_manifest
    from medsynth.models import loading, tiny
    from medsynth.recipe import load_recipe

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    work = a.workdir or tempfile.mkdtemp(prefix="bench-tiny-vae-")
    r = load_recipe("demo", [f"data.root={a.data_root}", f"workdir={work}", *a.sets])
    data.run(r)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    base = Path(loading.resolve_base(r))
    build_s = time.time() - t0
    info = json.loads((base / tiny.INFO_FILE).read_text())
    vae = loading.load_components(r, parts=("vae",), device="cpu", dtype="fp32").vae
    test = tiny.load_images([row.path for row in read_manifest(r.workdir_path, "test")], r.model.resolution)
    vals = tiny.psnr(vae, test)
    out = {
        "data": str(a.data_root), "resolution": r.model.resolution, "n_train": info["n_train_images"], "n_test": len(vals),
        "vae_channels": r.model.tiny.vae_channels, "latent_channels": r.model.tiny.latent_channels,
        "fit": info["vae"], "build_seconds": round(build_s, 1),
        "test_psnr_db": round(sum(vals) / len(vals), 2), "test_psnr_min_db": round(min(vals), 2),
        "parameters": info["parameters"], "tokenizer_vocab": info["tokenizer_vocab"],
        "loadavg_start": round(load0, 1), "loadavg_end": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
