"""GPU: step time and peak memory of a LoRA step with and without HLDF at PixArt-XL-2-512 scale.

Builds the PixArt-XL-2-512x512 architecture (DiT-XL/2, 28 blocks, 1152 wide), a T5-XXL v1.1
encoder (24 layers, 4096 wide) and the SD VAE from their configs with random weights in bf16
(no download), puts LoRA (rank 8, `paper` DiT targets, T5 `full`) on both, and times

  - a plain step: T5 encode (LoRA, grad) + DiT forward/backward + AdamW step
  - an HLDF step: the same + an M-step differentiable DPM-Solver++ sample with CFG, VAE decode
    with grad and the colour loss

at batch 1, 512 px, 120 T5 tokens, gradient checkpointing on. Random weights make the numbers
a cost measurement only. Needs a CUDA GPU (~40 GB for the full-grad HLDF step).

    python bench/bench_gpu_finetune.py [--m 20] [--grad-last-k 0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(device):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    dit = PixArtTransformer2DModel(
        sample_size=64, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
        cross_attention_dim=1152, caption_channels=4096, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False,
        norm_eps=1e-6, use_additional_conditions=False)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=0.18215)
    sched = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                        num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2)
    return dit.to(device, torch.bfloat16), t5.to(device, torch.bfloat16), vae.to(device, torch.float32), sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=20)
    ap.add_argument("--grad-last-k", type=int, default=0, help="0 = gradient through all M steps")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_finetune.py needs a CUDA GPU")

    from diffusers import DDPMScheduler

    from medsynth.models import pixart
    from medsynth.finetune import hldf, lora
    from medsynth.recipe import HldfConfig, LoraConfig

    dev = torch.device("cuda")
    torch.manual_seed(0)
    dit, t5, vae, sched = build(dev)
    vae.requires_grad_(False)
    lc = LoraConfig(rank=8, alpha=8.0)
    lora.add_lora(dit, lc, pixart.DIT_TARGETS["paper"], "dit")
    lora.add_lora(t5, lc, pixart.T5_TARGETS["full"], "t5")
    dit.enable_gradient_checkpointing()
    t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vae.enable_gradient_checkpointing()
    dit.train()
    t5.train()
    params = lora.trainable_parameters(dit, t5)
    opt = torch.optim.AdamW(params, lr=1e-4)
    train_sched = DDPMScheduler.from_config(sched.config)
    hc = HldfConfig(steps=args.m, guidance=4.5, grad_last_k=args.grad_last_k or None)
    ids = torch.randint(0, 32128, (1, 120), device=dev)
    mask = torch.ones_like(ids)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 64, 64, device=dev)

    def step(with_hldf: bool) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            emb = t5(ids, attention_mask=mask)[0]
            noise = torch.randn_like(z0)
            t = torch.randint(0, 1000, (1,), device=dev)
            pred = pixart.predict_noise(dit, train_sched.add_noise(z0, noise, t).to(torch.bfloat16), t, emb, mask)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        if with_hldf:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                emb = t5(ids, attention_mask=mask)[0]
                neg = t5(torch.zeros_like(ids), attention_mask=mask)[0]
                r = hldf.hldf_step(dit, vae, sched.config, hc, emb, mask, neg, mask,
                                   torch.zeros(1, 3, device=dev), torch.full((1, 3), 0.5, device=dev), gen,
                                   (1, 4, 64, 64), checkpoint=True, pixel_size=(512, 512))
            r.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    print(f"device: {torch.cuda.get_device_name(0)}; PixArt-XL-2-512 + T5-XXL architecture, random init, bf16, "
          f"LoRA r=8 on DiT (paper) and T5 (full), batch 1, 512 px, grad checkpointing; "
          f"M={args.m}, grad_last_k={args.grad_last_k or 'all'}")
    res = {}
    for with_hldf in (False, True):
        step(with_hldf)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step(with_hldf)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res[with_hldf] = statistics.median(times)
        print(f"{'HLDF step ' if with_hldf else 'plain step'}: {res[with_hldf] * 1000:9.1f} ms   peak memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:6.1f} GiB")
    for n in (500, 1500):
        print(f"implied HLDF overhead at N={n}: {(res[True] - res[False]) / (n * res[False]) * 100:+.1f}%")


if __name__ == "__main__":
    main()
