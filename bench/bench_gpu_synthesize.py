"""Synthesis throughput on a GPU for the PixArt-XL-2-512x512 architecture (random weights).

No weights are downloaded: the DiT (28 blocks, width 1152), the T5-XXL encoder (24 layers,
d_model 4096) and the SD VAE are built from their published configs with random init, in the
chosen dtype, directly on the GPU. Speed does not depend on the weight values, so images/s
here is what real PixArt-alpha weights give (the images are noise, of course).

It runs medsynth's synthesis engine (prompt embeddings cached, one pipeline call per batch)
at several batch sizes, and the plain ``PixArtAlphaPipeline(prompt)`` loop for comparison.

    python bench/bench_gpu_synthesize.py                         # bf16, 20 steps, CFG 4.5
    python bench/bench_gpu_synthesize.py --batch-sizes 1 8 16 32 --images 64 --json out.json
    python bench/bench_gpu_synthesize.py --smoke                 # tiny config on the CPU: checks the script

Report the printed table in docs/benchmarks.md with the device name it prints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

# Published configs (PixArt-alpha/PixArt-XL-2-512x512 on the Hub; SD VAE; T5 v1.1 XXL encoder).
XL_512 = dict(sample_size=64, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
              out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
              norm_type="ada_norm_single", num_embeds_ada_norm=1000, activation_fn="gelu-approximate")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, dropout_rate=0.0)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                 prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)
# --smoke: same code paths, toy sizes, CPU.
SMOKE_DIT = dict(XL_512, sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8,
                 cross_attention_dim=16, caption_channels=32)
SMOKE_T5 = dict(T5_XXL, vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
SMOKE_VAE = dict(SD_VAE, block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1, sample_size=64)

WORDS = ("a", "an", "endoscopic", "dermoscopic", "image", "of", "polyps", "melanoma", "with", "red", "smooth",
         "surface", "irregular", "border", "pink", "lesion", "and", "the", "brown", "dark")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build(device, dtype, smoke: bool):
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate and init directly in the target dtype (T5-XXL: 4.7 B params)
    try:
        with torch.device(device):
            transformer = PixArtTransformer2DModel(**(SMOKE_DIT if smoke else XL_512)).eval()
            text_encoder = T5EncoderModel(T5Config(**(SMOKE_T5 if smoke else T5_XXL))).eval()
            vae = AutoencoderKL(**(SMOKE_VAE if smoke else SD_VAE)).eval()
    finally:
        torch.set_default_dtype(prev)
    return SimpleNamespace(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer(), vae=vae,
                           scheduler=DPMSolverMultistepScheduler(**SCHEDULER), base="random PixArt-XL-2-512 architecture")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images per batch size")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--baseline-images", type=int, default=8, help="images for the plain pipe(prompt) loop")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (cycled)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, to check the script itself")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    import torch

    from medsynth.synthesize.engine import Engine
    from medsynth.synthesize.plan import Sample, sample_key, sample_seed

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.dtype = "fp32"
        args.images, args.batch_sizes, args.baseline_images, args.steps = 4, [1, 2], 2, 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: this benchmark needs a GPU (use --smoke to check the script on the CPU)")
            return 2
        device = torch.device("cuda")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    comps = build(device, dtype, args.smoke)
    build_s = time.perf_counter() - t0
    res = 512 if not args.smoke else 64
    words = [w for w in WORDS if w not in ("a", "an")]
    prompts_list = [f"An endoscopic image of {words[i % len(words)]} {words[(3 * i + 1) % len(words)]} lesion"
                    for i in range(args.prompts)]
    samples = [Sample(i, 0, "bench", i, sample_key("bench", i), sample_seed(0, "bench", i)) for i in range(args.images)]
    prompts = {s.key: prompts_list[i % len(prompts_list)] for i, s in enumerate(samples)}
    engine = Engine(comps, resolution=res, steps=args.steps, guidance=args.guidance, negative_prompt="",
                    max_text_tokens=120, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {"device": name, "dtype": args.dtype, "steps": args.steps, "guidance": args.guidance,
               "resolution": res, "torch": torch.__version__, "build_seconds": round(build_s, 1),
               "dit_params_m": round(sum(p.numel() for p in comps.transformer.parameters()) / 1e6, 1),
               "engine": {}}
    for bs in args.batch_sizes:
        engine.generate(samples[:bs], prompts)  # warm-up at this shape (kernel selection, allocator)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        n = 0
        for b in range(0, len(samples), bs):
            n += len(engine.generate(samples[b:b + bs], prompts))
        sync()
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        results["engine"][bs] = {"images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 3),
                                 "peak_gib": round(peak, 1) if peak else None}
        print(f"medsynth engine, batch {bs:3d}: {n / dt:7.3f} images/s ({n} images, {dt:.1f} s"
              f"{f', peak {peak:.1f} GiB' if peak else ''})", flush=True)

    from diffusers import PixArtAlphaPipeline

    plain = PixArtAlphaPipeline(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
                                transformer=comps.transformer, scheduler=engine.pipe.scheduler)
    plain.set_progress_bar_config(disable=True)
    # clean_caption=False: the default needs beautifulsoup4 + ftfy and only rewrites URLs/markup.
    plain(prompts_list[0], num_inference_steps=args.steps, guidance_scale=args.guidance, height=res, width=res,
          use_resolution_binning=False, clean_caption=False)
    sync()
    times = []
    for s in samples[: args.baseline_images]:
        t = time.perf_counter()
        plain(prompts[s.key], num_inference_steps=args.steps, guidance_scale=args.guidance, height=res, width=res,
              generator=torch.Generator("cpu").manual_seed(s.seed), use_resolution_binning=False, clean_caption=False)
        sync()
        times.append(time.perf_counter() - t)
    ips = 1 / statistics.median(times)
    results["plain_loop"] = {"images": len(times), "images_per_s": round(ips, 3)}
    print(f"plain PixArtAlphaPipeline(prompt) loop: {ips:7.3f} images/s ({len(times)} images)")

    print()
    print(f"Device: {name}; PixArt-XL-2-512 architecture, random init, {args.dtype}, {res} px, "
          f"{args.steps} DPM-Solver++ steps, CFG {args.guidance}; torch {torch.__version__}")
    print("| method | batch | images/s | peak GPU memory |")
    print("|---|---:|---:|---:|")
    print(f"| plain `PixArtAlphaPipeline(prompt)` loop | 1 | {ips:.2f} | |")
    for bs, r in results["engine"].items():
        mem = f"{r['peak_gib']} GiB" if r["peak_gib"] else "-"
        print(f"| medsynth | {bs} | {r['images_per_s']:.2f} | {mem} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
