"""Tiny REAL caption-stage models for offline tests and the caption benchmark.

Everything is built from small configs in code, seeded, and saved with ``save_pretrained`` so
that the stage loads it through the same ``from_pretrained`` path as a real model:

- :func:`build_tiny_llava_next`: CLIP vision tower + Llama text model (LLaVA-Next), a BPE
  tokenizer trained with the ``tokenizers`` library, ``LlavaNextImageProcessor`` and a chat
  template. Loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
- :func:`build_tiny_t5_simplifier`: a tiny ``T5ForConditionalGeneration`` + tokenizer.
- :func:`build_t5_like_tokenizer`: a small real tokenizer that appends ``</s>`` like T5, for
  token counting (stands in for the base model's T5 tokenizer).

The weights are random, so generated text is gibberish; that is what the tests want: it
exercises the prefix, retry, simplification and truncation logic on real generate() calls.
"""

from __future__ import annotations

from pathlib import Path

# Vocabulary source for the tiny tokenizers: plain descriptive English of the kind captions use.
CORPUS = [
    "A dermoscopic image of melanocytic nevus. The lesion is brown and round with a regular border.",
    "A dermoscopic image of vascular lesion. Red and purple lobules on pink skin, sharply demarcated.",
    "A dermoscopic image of melanoma. An asymmetric lesion with dark brown, black and blue-grey areas.",
    "An endoscopic image of polyps. A raised pink mass with a smooth surface and visible vessels.",
    "The image shows a small oval region with a smooth, homogeneous texture and light brown colour.",
    "Please describe the image using the following visual features: specific color, shape and texture.",
    "Start with the class name and ensure the description does not exceed one hundred words.",
    "irregular border, blurred edges, white scar-like area, globules, dots, streaks, network pattern",
    "bright, dark, moderate contrast, large, medium-sized, elongated, symmetric, asymmetric, mottled",
]

SPECIALS_VLM = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)


def _train_bpe(vocab_size: int, specials: list[str], corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def build_t5_like_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 400):
    """A small real fast tokenizer that appends '</s>' to every text, as T5's does.

    Returned as a ``PreTrainedTokenizerFast``; saved to ``out_dir`` when given (so AutoTokenizer
    can load it, e.g. as ``<base>/tokenizer`` of a diffusers-layout directory).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(vocab_size, ["<pad>", "</s>", "<unk>"], CORPUS)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_t5_simplifier(out_dir: str | Path, seed: int = 0) -> Path:
    """Tiny random T5ForConditionalGeneration + tokenizer saved to ``out_dir``."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    out_dir = Path(out_dir)
    tok = build_t5_like_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, feed_forward_proj="gated-gelu")
    model = T5ForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(out_dir))
    return out_dir


def build_tiny_llava_next(out_dir: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                          hidden: int = 32, layers: int = 2) -> Path:
    """Tiny random LLaVA-Next (CLIP + Llama) with tokenizer, image processor and chat template."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast)

    out_dir = Path(out_dir)
    tok = _train_bpe(600, SPECIALS_VLM, CORPUS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    fast.padding_side = "left"  # decoder-only batched generation pads on the left
    image_token_id = tok.token_to_id("<image>")
    pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
    improc = LlavaNextImageProcessor(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size},
                                     image_grid_pinpoints=pinpoints)
    # With strategy "default" the CLS feature is dropped, so the processor must count it as the
    # one additional token it then subtracts, or image tokens and image features disagree.
    processor = LlavaNextProcessor(image_processor=improc, tokenizer=fast, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                       pad_token_id=fast.pad_token_id)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                          vision_feature_select_strategy="default", vision_feature_layer=-1,
                          image_grid_pinpoints=pinpoints, image_seq_length=(image_size // patch_size) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return out_dir
