"""The tiny base's two autoencoders side by side: the fitted KL VAE (default) vs the pretrained TAEF2.

    OMP_NUM_THREADS=1 python bench/bench_tiny_autoencoder.py [DATA_ROOT ...] [--threads 1] [--set key=value ...]

For each data set (default: ../shared/data/hyperkvasir and ../shared/data/ham10000) one demo-recipe
workspace (64 px) is prepared and the tiny base is built twice, exactly as `model.base: tiny`
does it, once per ``model.tiny.autoencoder``; then the encode -> decode PSNR (posterior mean,
peak = full range) is measured on the **test** split. Prints one JSON line per data set and
autoencoder, then the ratios taef2 / fitted measured in this same invocation (the machine may be
shared, so only same-invocation ratios compare).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(data_root: str, autoencoder: str, work: Path, sets: list[str]) -> dict:
    from medsynth import data
    from medsynth.data import read_manifest
    from medsynth.models import loading, tiny
    from medsynth.recipe import load_recipe

    r = load_recipe("demo", [f"data.root={data_root}", f"workdir={work}", f"model.tiny.autoencoder={autoencoder}", *sets])
    data.run(r)
    load0 = os.getloadavg()[0]
    t0, c0 = time.time(), time.process_time()
    base = Path(loading.resolve_base(r))
    build_s, build_cpu = time.time() - t0, time.process_time() - c0
    info = json.loads((base / tiny.INFO_FILE).read_text())
    vae = loading.load_components(r, parts=("vae",), device="cpu", dtype="fp32").vae
    test = tiny.load_images([row.path for row in read_manifest(r.workdir_path, "test")], r.model.resolution)
    t1 = time.time()
    vals = tiny.psnr(vae, test)
    psnr_s = time.time() - t1
    return {
        "data": Path(data_root).name, "autoencoder": autoencoder, "resolution": r.model.resolution,
        "n_train": info["n_train_images"], "n_test": len(vals),
        "latent": [tiny.latent_channels(r.model.tiny), r.model.resolution // tiny.vae_factor(r.model.tiny)],
        "vae_parameters": info["parameters"]["vae"], "scaling_factor": info["vae"]["scaling_factor"],
        "build_seconds": round(build_s, 1), "build_cpu_seconds": round(build_cpu, 1),
        "test_psnr_db": round(sum(vals) / len(vals), 2), "test_psnr_min_db": round(min(vals), 2),
        "train_psnr_db": info["vae"]["train_psnr_db"], "test_roundtrip_seconds": round(psnr_s, 2),
        "loadavg_start": round(load0, 1), "loadavg_end": round(os.getloadavg()[0], 1),
        "torch_threads": __import__("torch").get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_roots", nargs="*",
                    default=[str(ROOT.parent / "shared" / "data" / n) for n in ("hyperkvasir", "ham10000")])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU times that mean something on a busy machine)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-tiny-ae-"))
    ratios = []
    for root in a.data_roots:
        res = {}
        for ae in ("fitted", "taef2"):
            res[ae] = measure(root, ae, work / Path(root).name, a.sets)
            print(json.dumps(res[ae]), flush=True)
        f, t = res["fitted"], res["taef2"]
        ratios.append({
            "data": f["data"],
            "test_psnr_gain_db": round(t["test_psnr_db"] - f["test_psnr_db"], 2),
            "build_seconds_ratio_taef2_over_fitted": round(t["build_seconds"] / max(f["build_seconds"], 1e-6), 3),
            "build_cpu_ratio_taef2_over_fitted": round(t["build_cpu_seconds"] / max(f["build_cpu_seconds"], 1e-6), 3),
            "roundtrip_seconds_ratio_taef2_over_fitted": round(t["test_roundtrip_seconds"] / max(f["test_roundtrip_seconds"], 1e-6), 3),
        })
    for r in ratios:
        print(json.dumps({"ratios": r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
