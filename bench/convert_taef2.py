"""Make medsynth/models/weights/taef2.safetensors from the upstream TAEF2 .pth files.

    python bench/convert_taef2.py [--src ../shared/weights/taef2] [--out medsynth/models/weights/taef2.safetensors]

The inputs are ``taef2_encoder.pth`` / ``taef2_decoder.pth`` of github.com/madebyollin/taesd
(commit 5cccb12, MIT, Copyright (c) 2023 Ollin Boer Bohan), checked against the sha256 sums in
../shared/weights/taef2/SOURCE.md before anything is read with torch.load(weights_only=True).
Their tensors go unchanged (fp16, as stored) into one safetensors file, prefixed ``encoder.`` /
``decoder.`` to match ``medsynth.models.taef2.AutoencoderTAEF2``, which must load it strictly.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {  # file -> sha256, from SOURCE.md
    "taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
# One key only: safetensors writes metadata from a hash map in arbitrary order, so more keys
# would make the file's bytes (and its sha256) differ from run to run. Provenance is in README.md.
METADATA = {"format": "pt"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert(src: Path, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    state = {}
    for name, want in INPUTS.items():
        got = sha256(src / name)
        if got != want:
            raise SystemExit(f"{src / name}: sha256 {got} != {want} (SOURCE.md); refusing to convert")
        prefix = name.split("_")[1].split(".")[0]  # encoder / decoder
        sd = torch.load(src / name, map_location="cpu", weights_only=True)
        state.update({f"{prefix}.{k}": v.contiguous() for k, v in sd.items()})

    sys.path.insert(0, str(ROOT))
    from medsynth.models.taef2 import AutoencoderTAEF2

    AutoencoderTAEF2().load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=METADATA)
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; it is a package data file
    os.replace(tmp, out)
    return {"tensors": len(state), "bytes": out.stat().st_size, "sha256": sha256(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "weights" / "taef2")
    ap.add_argument("--out", type=Path, default=ROOT / "medsynth" / "models" / "weights" / "taef2.safetensors")
    a = ap.parse_args()
    print(convert(a.src, a.out))


if __name__ == "__main__":
    main()
