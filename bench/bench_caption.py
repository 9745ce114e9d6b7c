"""Batched vs one-image-at-a-time VLM captioning on the tiny LLaVA-Next (offline, CPU or GPU).

    python bench/bench_caption.py [--images 16] [--batch 8] [--new-tokens 48] [--threads 1]

Builds the tiny LLaVA-Next of the tests, then captions the same real HAM10000 images with the
caption stage's own ``VLMCaptioner.generate`` twice: in batches of ``--batch`` (left padding, one
generate() call per batch) and one image per call. Both runs force exactly ``--new-tokens``
tokens per caption (min = max) so that they do the same amount of decoding. Prints the images
per second of each and the speed ratio.

On a CPU shared with other jobs, keep ``--threads 1``: OpenMP spin-waiting otherwise dominates
the timings of a model this small.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tiny_vlm import build_tiny_llava_next

    from medsynth.caption.vlm import VLMCaptioner
    from medsynth.images import read_image
    from medsynth.prompts import fill_template
    from medsynth.recipe import CAPTION_PROMPT, build_recipe

    files = sorted(Path(args.data).rglob("*.jpg"))[:: 7][: args.images]
    if len(files) < args.images:
        sys.exit(f"need {args.images} images under {args.data}, found {len(files)}")
    images = [read_image(f) for f in files]
    prompts = [fill_template(CAPTION_PROMPT, "dermoscopic", f.parent.name.replace("-", " "), "colour, shape and texture")
               for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llava_next(Path(tmp) / "vlm")
        recipe = build_recipe({"caption": {"model": str(Path(tmp) / "vlm"), "dtype": "fp32", "device": args.device,
                                           "max_new_tokens": args.new_tokens}})
        cap = VLMCaptioner(recipe)
        cap._gen_kwargs["min_new_tokens"] = args.new_tokens  # same decoding work in both modes
        cap.generate(images[:2], prompts[:2], seed=0)  # warm-up (allocations, lazy inits)

        t0 = time.perf_counter()
        for i in range(0, len(images), args.batch):
            cap.generate(images[i:i + args.batch], prompts[i:i + args.batch], seed=i)
        batched = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i in range(len(images)):
            cap.generate(images[i:i + 1], prompts[i:i + 1], seed=i)
        single = time.perf_counter() - t0

    n = len(images)
    print(f"tiny LLaVA-Next on {args.device} ({torch.get_num_threads()} thread(s)), {n} images, "
          f"{args.new_tokens} new tokens each")
    print(f"batched (batch {args.batch}): {batched:7.2f} s  {n / batched:6.2f} img/s")
    print(f"one at a time:      {single:7.2f} s  {n / single:6.2f} img/s")
    print(f"speed ratio batched / single: {single / batched:.2f}x")


if __name__ == "__main__":
    main()
