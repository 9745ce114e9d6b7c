"""medsynth: class-labelled synthetic 2D medical images with Med-Art (PixArt-alpha + LoRA + HLDF)."""

__version__ = "0.1.0"


def load_finetuned(pipe, finetune_dir, *, merge: bool = True):
    """Apply a ``medsynth finetune`` output to a stock diffusers ``PixArtAlphaPipeline``, in place.

    ``finetune_dir`` is ``<workdir>/finetune`` (or its ``final/`` folder). LoRA adapters of the DiT
    and T5 are loaded with peft and, with ``merge=True`` (default), merged into the weights in
    float32 and cast back to the pipeline's dtype; a full fine-tuned DiT (``adapter.json`` kind
    ``full``) replaces ``pipe.transformer``. Returns ``pipe``. Example (docs/output-format.md)::

        pipe = PixArtAlphaPipeline.from_pretrained(base, torch_dtype=torch.float32)
        medsynth.load_finetuned(pipe, "runs/skin/finetune")
        pipe.to("cuda", torch.bfloat16)
    """
    # Imported here: `medsynth --help` must not pay for torch / peft / diffusers.
    from .finetune.adapters import load_finetuned as _load_finetuned

    return _load_finetuned(pipe, finetune_dir, merge=merge)


__all__ = ["__version__", "load_finetuned"]
