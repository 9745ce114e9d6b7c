"""Fitting captions to the base model's T5 token limit.

Over the limit, a caption is rewritten by a seq2seq model prompted ``simplify: {text}`` (as in
Med-Art), asking for 75-100 % of the limit (90-120 tokens for PixArt's 120). Each retry asks for
a shorter output. When no attempt fits (or the result lost its content), the *original* caption
is cut at its last sentence boundary under the limit (then a word boundary): the VLM's own
words are worth more than a poor paraphrase.

The caption stage loads the model before it captions anything whenever the run might call it
(every VLM run with ``simplify_retries > 0``; a simple/empty/file run only when one of its known
captions is over the limit; never for 'stats'), so a missing simplifier fails before any work
instead of after the first batch.
"""

from __future__ import annotations

from .. import console
from ..errors import UserError
from . import hf
from .text import TokenCounter, clean, cut_to_fit, ensure_prefix, has_prefix


class Simplifier:
    """Seq2seq rewriter (AutoModelForSeq2SeqLM + AutoTokenizer); ``load()`` is idempotent."""

    def __init__(self, recipe):
        self.ref = recipe.caption.simplify_model
        self.recipe = recipe
        self.model = None
        self.tokenizer = None
        self.device = None

    def load(self) -> None:
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        c = self.recipe.caption
        name, kw = hf.model_ref(self.ref, "caption.simplify_model")
        self.device = hf.resolve_device(c.device)
        dtype = hf.resolve_dtype(c.dtype, self.device)
        if dtype == torch.float16:
            # T5 overflows in fp16 (its activations exceed 65504); bf16/fp32 are safe.
            dtype = torch.float32
        console.info(f"caption: loading simplifier {self.ref}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, **kw)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=dtype, **kw).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise hf.missing_weights(self.ref, "caption.simplify_model", e) from None

    def rewrite(self, texts: list[str], max_new_tokens: int, min_new_tokens: int) -> list[str]:
        """One deterministic (beam search) rewrite of each text."""
        import torch

        self.load()
        enc = self.tokenizer([f"simplify: {t}" for t in texts], return_tensors="pt", padding=True,
                             truncation=True, max_length=512).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens,
                                      min_new_tokens=min(min_new_tokens, max_new_tokens),
                                      num_beams=4, do_sample=False, no_repeat_ngram_size=3)
        return [clean(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def fit(captions: list[str], prefixes: list[str | None], counter: TokenCounter,
        simplifier: Simplifier, retries: int) -> list[tuple[str, str]]:
    """Make every caption fit ``counter.limit``; returns (caption, how) per input.

    ``how`` is 'fits' (unchanged), 'simplified' or 'truncated'. ``prefixes[i]`` (or None) is the
    class prefix that caption ``i`` must keep.
    """
    out: list[tuple[str, str] | None] = [None] * len(captions)
    counts = counter.count(captions)
    todo = []
    for i, (c, n) in enumerate(zip(captions, counts)):
        if n <= counter.limit:
            out[i] = (c, "fits")
        else:
            todo.append(i)
    limit = counter.limit
    for attempt in range(retries):
        if not todo:
            break
        # Ask for 75-100 % of the limit first, then for less each retry (the simplifier's own
        # tokenizer may count a little differently from the base T5's).
        hi = max(4, int(limit * (1.0 - 0.15 * attempt)) - 1)
        lo = int(hi * 0.75)
        rewritten = simplifier.rewrite([captions[i] for i in todo], max_new_tokens=hi, min_new_tokens=lo)
        cand = []
        for i, t in zip(todo, rewritten):
            p = prefixes[i]
            cand.append(ensure_prefix(t, p) if p else t)
        ncand = counter.count(cand)
        left = []
        for i, t, n in zip(todo, cand, ncand):
            body = t
            if prefixes[i] and has_prefix(t, prefixes[i]):
                body = t[len(prefixes[i]):].strip(" .")
            if n <= limit and body:
                out[i] = (t, "simplified")
            else:
                left.append(i)
        todo = left
    for i in todo:
        text, _how = cut_to_fit(captions[i], counter)
        if not text:
            raise UserError(f"model.max_text_tokens={limit} is too small to hold any caption; raise it")
        out[i] = (text, "truncated")
    return [o for o in out if o is not None]
