"""Unit tests of the caption text rules with real (small) tokenizers and a tiny real T5 simplifier."""

from __future__ import annotations

import json

import pytest

from medsynth.caption import store
from medsynth.caption.simplify import Simplifier, fit
from medsynth.caption.text import TokenCounter, clean, cut_to_fit, ensure_prefix, has_prefix
from medsynth.errors import UserError
from medsynth.prompts import fill_template, simple_caption
from medsynth.recipe import build_recipe
from tiny_vlm import build_t5_like_tokenizer, build_tiny_t5_simplifier


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return build_t5_like_tokenizer()


def test_prefix_article_and_template():
    assert simple_caption("dermoscopic", "melanoma") == "A dermoscopic image of melanoma"
    assert simple_caption("endoscopic", "polyps") == "An endoscopic image of polyps"
    prompt = fill_template("{Article} {modality} image of {category}. Use {visual_features}.", "endoscopic", "polyps", "colour")
    assert prompt == "An endoscopic image of polyps. Use colour."


def test_has_prefix_is_case_and_whitespace_tolerant_but_word_exact():
    p = "A dermoscopic image of melanocytic nevus"
    assert has_prefix("a  Dermoscopic\nimage of MELANOCYTIC nevus, brown and round.", p)
    assert has_prefix(p, p)
    assert not has_prefix("A dermoscopic image of melanocytic nevuses with dots", p)
    assert not has_prefix("This dermoscopic image of melanocytic nevus", p)
    assert ensure_prefix("Brown lesion.", p) == f"{p}. Brown lesion."
    assert ensure_prefix("a dermoscopic image of melanocytic nevus. Brown.", p) == "a dermoscopic image of melanocytic nevus. Brown."
    assert ensure_prefix("", p) == f"{p}."
    assert clean(" x\t\ny \x00 z ") == "x y z"


def test_token_counter_counts_eos_like_t5(tok):
    c = TokenCounter(tok, limit=10)
    assert c.count1("") == 1  # only '</s>'
    n = c.count1("brown lesion")
    assert n == len(tok("brown lesion", add_special_tokens=False)["input_ids"]) + 1


def test_cut_prefers_sentence_then_word_then_char(tok):
    text = "A dermoscopic image of melanoma. It is brown. It has an irregular border with dots and globules everywhere."
    counter = TokenCounter(tok, limit=tok("A dermoscopic image of melanoma. It is brown.", return_length=True)["length"][0] + 2)
    cut, how = cut_to_fit(text, counter)
    assert how == "sentence" and cut == "A dermoscopic image of melanoma. It is brown."
    # No sentence fits: cut at a word boundary, as long as possible.
    counter = TokenCounter(tok, limit=8)
    cut, how = cut_to_fit("one two three four five six seven eight nine ten eleven twelve", counter)
    assert how == "word" and counter.fits(cut)
    longer = " ".join("one two three four five six seven eight nine ten eleven twelve".split()[: len(cut.split()) + 1])
    assert not counter.fits(longer)
    # No word fits (gibberish without spaces): cut by characters, still within the limit.
    cut, how = cut_to_fit("x" * 400, counter)
    assert how == "char" and 0 < len(cut) < 400 and counter.fits(cut)
    assert cut_to_fit("short.", counter) == ("short.", "none")


def test_fit_with_tiny_t5_simplifier_keeps_prefix_and_limit(tmp_path, tok):
    simp_dir = build_tiny_t5_simplifier(tmp_path / "t5")
    recipe = build_recipe({"caption": {"simplify_model": str(simp_dir), "dtype": "fp32", "device": "cpu"}})
    simplifier = Simplifier(recipe)
    counter = TokenCounter(tok, limit=30)
    prefix = "A dermoscopic image of vascular lesion"
    long = prefix + ". " + " ".join(["Red and purple lobules on pink skin, sharply demarcated."] * 8)
    short = prefix + ". Red."
    out = fit([long, short], [prefix, prefix], counter, simplifier, retries=2)
    assert out[1] == (short, "fits")
    text, how = out[0]
    assert how in ("simplified", "truncated")
    assert has_prefix(text, prefix) and counter.fits(text)
    assert simplifier.model is not None  # loaded because a caption was too long
    lazy = Simplifier(recipe)
    assert fit([short], [prefix], counter, lazy, retries=2) == [(short, "fits")]
    assert lazy.model is None  # never loaded when everything fits


def test_simplifier_missing_weights_is_a_user_error(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = build_recipe({"caption": {"simplify_model": "nobody/no-such-simplifier", "dtype": "fp32", "device": "cpu"}})
    with pytest.raises(UserError, match="nobody/no-such-simplifier"):
        fit(["x " * 100], [None], TokenCounter(tok, limit=10), Simplifier(recipe), retries=1)


def test_store_repairs_torn_last_line_and_rejects_damage(tmp_path):
    p = tmp_path / "captions.jsonl"
    rec = {"path": "/a.png", "label": "x", "sha256": "0" * 64, "caption": "c", "source": "simple", "n_tokens": 2, "how": "generated"}
    with store.Appender(p) as app:
        app.write([rec, {**rec, "path": "/b.png"}])
    good = p.read_bytes()
    p.write_bytes(good + b'{"path": "/c.png", "lab')
    assert [r["path"] for r in store.read(p)] == ["/a.png", "/b.png"]
    assert p.read_bytes() == good  # the torn line is cut off on disk
    # A complete last line that is not a record (no newline yet) is also a torn write.
    p.write_bytes(good + json.dumps(rec).encode())
    assert len(store.read(p)) == 2 and p.read_bytes() == good
    p.write_bytes(b"garbage\n" + good)
    with pytest.raises(UserError, match="captions.jsonl:1"):
        store.read(p)


def test_only_one_caption_run_per_workspace(tmp_path):
    lock = tmp_path / ".lock"
    with store.exclusive(lock):
        with pytest.raises(UserError, match="another `medsynth caption`"):
            with store.exclusive(lock):
                pass
    with store.exclusive(lock):  # released when the holder is done
        pass
