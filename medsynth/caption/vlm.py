"""The Visual Symptom Generator: an image-text-to-text model (LLaVA-Next by default) describes images.

Batched, seeded generation. A batch's random stream is seeded from the recipe seed and the
sha256 of the images in it, and batches are cut from the full ordered image list (not from what
is left to do), so a resumed run regenerates exactly the captions the killed run would have
written.
"""

from __future__ import annotations

import hashlib

from .. import console
from ..errors import UserError
from . import hf
from .text import clean, ensure_prefix, has_prefix

_LEADING_JUNK = "\"'`*#>- \u201c\u2018"


def batch_seed(seed: int, shas: list[str], attempt: int) -> int:
    h = hashlib.sha256(f"{seed}:{attempt}:{','.join(shas)}".encode()).hexdigest()
    return int(h[:15], 16)


class VLMCaptioner:
    def __init__(self, recipe):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        c = recipe.caption
        self.recipe = recipe
        self.ref = c.model
        name, kw = hf.model_ref(c.model, "caption.model")
        kw = {**kw, "revision": c.revision, "trust_remote_code": c.trust_remote_code}
        self.device = hf.resolve_device(c.device)
        self.dtype = hf.resolve_dtype(c.dtype, self.device)
        console.info(f"caption: loading {c.model} ({str(self.dtype).replace('torch.', '')} on {self.device})")
        try:
            self.processor = AutoProcessor.from_pretrained(name, **kw)
            self.model = AutoModelForImageTextToText.from_pretrained(name, dtype=self.dtype, **kw)
        except (OSError, ValueError, KeyError) as e:
            msg = str(e)
            if "trust_remote_code" in msg and not c.trust_remote_code:
                raise UserError(f"caption.model: {c.model!r} ships its own Python code; if you trust that repository, "
                                "set caption.trust_remote_code: true (it runs that code on this machine)") from None
            raise hf.missing_weights(c.model, "caption.model", e) from None
        self.model.to(self.device).eval()
        tok = getattr(self.processor, "tokenizer", None)
        if tok is None:
            raise UserError(f"caption.model: the processor of {c.model!r} has no tokenizer; it is not an image-text-to-text model")
        # Decoder-only batched generation: pad on the left so every row's last token is real.
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        self._gen_kwargs = {"max_new_tokens": c.max_new_tokens, "do_sample": c.do_sample,
                            "pad_token_id": tok.pad_token_id}
        if c.do_sample:
            self._gen_kwargs.update(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        self._torch = torch

    def _chat(self, prompt: str) -> str:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(conv, add_generation_prompt=True)
        # No template shipped: the plain LLaVA convention (image token on its own line, then the text).
        token = getattr(self.processor, "image_token", None) or "<image>"
        return f"{token}\n{prompt}"

    def generate(self, images: list, prompts: list[str], seed: int) -> list[str]:
        """One batched generate() call; returns the cleaned new text of each row."""
        torch = self._torch
        texts = [self._chat(p) for p in prompts]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        torch.manual_seed(seed)  # seeds the CPU and every CUDA device
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._gen_kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [clean(t).lstrip(_LEADING_JUNK) for t in decoded]

    def caption(self, images: list, prompts: list[str], prefixes: list[str], shas: list[str],
                retries: int) -> list[tuple[str, str, int]]:
        """(caption, how, generations) per image; regenerates rows lacking the prefix, then prefixes them."""
        seed = self.recipe.seed
        texts = self.generate(images, prompts, batch_seed(seed, shas, 0))
        tries = [1] * len(texts)
        for attempt in range(1, retries + 1):
            bad = [i for i, t in enumerate(texts) if not has_prefix(t, prefixes[i])]
            if not bad:
                break
            again = self.generate([images[i] for i in bad], [prompts[i] for i in bad],
                                  batch_seed(seed, [shas[i] for i in bad], attempt))
            for i, t in zip(bad, again):
                texts[i] = t
                tries[i] += 1
        out = []
        for t, p, n in zip(texts, prefixes, tries):
            if has_prefix(t, p):
                out.append((t, "generated", n))
            else:
                out.append((ensure_prefix(t, p), "prefixed", n))
        return out
