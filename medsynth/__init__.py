"""medsynth: class-labelled synthetic 2D medical images with Med-Art (PixArt-alpha + LoRA + HLDF)."""

__version__ = "0.1.0"


def load_finetuned(pipe, finetune_dir, *, merge: bool = True):
    """Apply a ``medsynth finetune`` output to the family's stock diffusers pipeline, in place.

    ``pipe``: ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``, ``HunyuanDiTPipeline``, ``DiTPipeline``
    (SD / SDXL outputs also load with diffusers' own
    ``pipe.load_lora_weights``). ``finetune_dir`` is ``<workdir>/finetune`` (or its ``final/``
    folder). LoRA adapters are loaded with peft and, with ``merge=True`` (default), merged in
    float32 into the weights as the pipeline's base files store them (read one layer at a time),
    then cast once to the pipeline's dtype; a fully fine-tuned denoiser (``adapter.json`` kind
    ``full``) replaces it. Returns ``pipe``. Example (docs/output-format.md)::

        pipe = PixArtAlphaPipeline.from_pretrained(base, torch_dtype=torch.bfloat16)
        medsynth.load_finetuned(pipe, "runs/skin/finetune")
        pipe.to("cuda")
    """
    # Imported here: `medsynth --help` must not pay for torch / peft / diffusers.
    from .finetune.adapters import load_finetuned as _load_finetuned

    return _load_finetuned(pipe, finetune_dir, merge=merge)


__all__ = ["__version__", "load_finetuned"]
