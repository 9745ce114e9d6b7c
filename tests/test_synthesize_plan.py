"""Plan (balance rules, order, shards, seeds) and prompt selection of the synthesize stage; no model needed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from medsynth.errors import UserError
from medsynth.recipe import build_recipe
from medsynth.synthesize.plan import (DEFAULT_PER_CLASS, make_plan, parse_worker, sample_key, sample_seed,
                                      shards_of)

CLASSES = [
    {"index": 0, "name": "a", "category": "class a", "n_train": 10},
    {"index": 1, "name": "b", "category": "class b", "n_train": 30},
    {"index": 2, "name": "c", "category": "class c", "n_train": 60},
]


def _recipe(synth: dict | None = None, **top):
    return build_recipe({"synthesize": synth or {}, **top}, "test.yaml")


def test_default_is_100_per_class_and_cli_per_class_wins():
    p = make_plan(_recipe(), CLASSES)
    assert p.rule == "default" and p.counts == {"a": DEFAULT_PER_CLASS, "b": DEFAULT_PER_CLASS, "c": DEFAULT_PER_CLASS}
    p = make_plan(_recipe({"counts": {"a": 1}}), CLASSES, per_class=4)
    assert p.rule == "per_class" and p.counts == {"a": 4, "b": 4, "c": 4}


def test_counts_match_real_topup():
    p = make_plan(_recipe({"counts": {"a": 5, "c": 2}}), CLASSES)
    assert p.counts == {"a": 5, "b": 0, "c": 2} and p.total == 7
    # 10/30/60 of a total of 7 -> 0.7/2.1/4.2 -> 1/2/4 by largest remainder.
    p = make_plan(_recipe({"match_real": 7}), CLASSES)
    assert p.counts == {"a": 1, "b": 2, "c": 4}
    p = make_plan(_recipe({"match_real": 100}), CLASSES)
    assert p.counts == {"a": 10, "b": 30, "c": 60}
    p = make_plan(_recipe({"topup": 40}), CLASSES)
    assert p.counts == {"a": 30, "b": 10, "c": 0}
    assert "real train: 60" in p.describe()


def test_unknown_class_in_counts_names_it():
    with pytest.raises(UserError, match=r"synthesize.counts.bb: unknown class; did you mean 'b'"):
        make_plan(_recipe({"counts": {"bb": 3}}), CLASSES)


def test_order_interleaves_classes_and_shards_are_fixed_chunks():
    p = make_plan(_recipe({"counts": {"a": 1, "b": 3, "c": 2}, "shard_size": 4}), CLASSES)
    keys = [s.key for s in p.samples()]
    assert keys == ["a-000000", "b-000000", "c-000000", "b-000001", "c-000001", "b-000002"]
    assert p.n_shards == 2 and [s.key for s in p.shard(1)] == ["c-000001", "b-000002"]
    assert [s.order for s in p.samples()] == list(range(6))


def test_seeds_depend_on_seed_class_index_only():
    a = make_plan(_recipe({"per_class": 3}), CLASSES)
    b = make_plan(_recipe({"counts": {"b": 3}}), CLASSES)  # other classes absent: b's seeds unchanged
    seeds_a = {s.key: s.seed for s in a.samples()}
    seeds_b = {s.key: s.seed for s in b.samples()}
    assert all(seeds_a[k] == v for k, v in seeds_b.items())
    assert len(set(seeds_a.values())) == 9
    assert sample_seed(0, "a", 1) != sample_seed(1, "a", 1) and 0 <= sample_seed(0, "a", 1) < 2 ** 63
    assert sample_key("a-b", 12) == "a-b-000012"


def test_worker_parsing_and_shard_dealing():
    assert parse_worker(None) == (0, 1) and parse_worker("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1/0", "1", "a/b"):
        with pytest.raises(UserError, match="--worker"):
            parse_worker(bad)
    n = 7
    parts = [shards_of(i, 3, n) for i in range(3)]
    assert sorted(s for p in parts for s in p) == list(range(n))
    assert parts[0] == [0, 3, 6]


# ----------------------------------------------------------------------------- prompts


def _workdir_with_captions(tmp_path: Path) -> Path:
    wd = tmp_path / "ws"
    wd.mkdir()
    rows = ["path,label,split,sha256,width,height"]
    caps = []
    for label, n_train in (("a", 3), ("b", 2)):
        for i in range(n_train + 1):
            split = "test" if i == n_train else "train"
            path = f"/data/{label}/{i}.png"
            rows.append(f"{path},{label},{split},x,1,1")
            caps.append({"path": path, "label": label, "caption": f"{label} caption {i} ({split})"})
    (wd / "manifest.csv").write_text("\n".join(rows) + "\n")
    # Reversed line order: prompts must not depend on the file's order.
    (wd / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in reversed(caps)))
    return wd


def test_captions_are_train_captions_of_the_class_each_used_before_any_repeats(tmp_path):
    from medsynth.synthesize.prompts import build_prompts

    wd = _workdir_with_captions(tmp_path)
    classes = [{"index": 0, "name": "a", "category": "a", "n_train": 3},
               {"index": 1, "name": "b", "category": "b", "n_train": 2}]
    r = _recipe({"per_class": 7}, seed=3, modality="endoscopic")
    plan = make_plan(r, classes)
    prompts, info = build_prompts(r, plan, wd)
    assert info["used"] == "captions" and info["captions_per_class"] == {"a": 3, "b": 2}
    a = [prompts[f"a-{i:06d}"] for i in range(7)]
    assert set(a) == {"a caption 0 (train)", "a caption 1 (train)", "a caption 2 (train)"}
    assert len(set(a[:3])) == 3 and len(set(a[3:6])) == 3  # a full cycle before reuse
    b = [prompts[f"b-{i:06d}"] for i in range(7)]
    assert set(b) == {"b caption 0 (train)", "b caption 1 (train)"}
    assert Counter(b).most_common(1)[0][1] == 4
    again, _ = build_prompts(r, plan, wd)
    assert again == prompts
    other, _ = build_prompts(_recipe({"per_class": 7}, seed=4), plan, wd)
    assert other != prompts


def test_missing_captions_fall_back_to_template_with_a_warning(tmp_path, capsys):
    from medsynth.synthesize.prompts import build_prompts

    wd = _workdir_with_captions(tmp_path)
    (wd / "captions.jsonl").unlink()
    r = _recipe({"per_class": 2}, modality="endoscopic")
    plan = make_plan(r, [{"index": 0, "name": "a", "category": "ulcer", "n_train": 3}])
    prompts, info = build_prompts(r, plan, wd)
    assert info["used"] == "simple"
    assert set(prompts.values()) == {"An endoscopic image of ulcer"}
    assert "captions.jsonl not found" in capsys.readouterr().err


def test_broken_captions_line_names_file_and_line(tmp_path):
    from medsynth.synthesize.prompts import build_prompts

    wd = _workdir_with_captions(tmp_path)
    with open(wd / "captions.jsonl", "a") as fh:
        fh.write("{not json\n")
    r = _recipe({"per_class": 1})
    plan = make_plan(r, [{"index": 0, "name": "a", "category": "a", "n_train": 3}])
    with pytest.raises(UserError, match=r"captions.jsonl:8: not a caption record"):
        build_prompts(r, plan, wd)


def test_prompt_file_cycles_per_class_prompts(tmp_path):
    from medsynth.synthesize.prompts import build_prompts

    f = tmp_path / "p.tsv"
    f.write_text("# class<TAB>prompt\na\tfirst a\na\tsecond a\n\nb\tonly b\n")
    r = _recipe({"per_class": 4, "prompt_source": "file", "prompt_file": str(f)})
    classes = [{"index": 0, "name": "a", "category": "a", "n_train": 1},
               {"index": 1, "name": "b", "category": "b", "n_train": 1}]
    prompts, info = build_prompts(r, make_plan(r, classes), tmp_path)
    assert Counter(prompts[f"a-{i:06d}"] for i in range(4)) == {"first a": 2, "second a": 2}
    assert {prompts[f"b-{i:06d}"] for i in range(4)} == {"only b"}
    assert info["prompts_per_class"] == {"a": 2, "b": 1}
