"""The dataset card synthesize writes beside its output (synthetic/README.md, Hugging Face YAML header).

One tiny workspace (2 HyperKvasir classes, 32 px tiny model, 3 images per class) is synthesized
once as shards and once as class folders; the card's header must parse, agree with index.json
and describe the columns Hugging Face ``datasets`` really yields for these files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _helpers import prepare_manifest_workspace, tiny_manifest_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("impacted-stool", "polyps")
PER_CLASS = 3


def _recipe_text(tmp: Path, manifest: Path) -> str:
    return tiny_manifest_recipe("card-test", tmp / "ws", manifest,
                                synthesize={"steps": 2, "batch_size": 3, "shard_size": 4, "grid_per_class": 1,
                                            "prompt_source": "simple"})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from medsynth import synthesize

    prep = prepare_manifest_workspace(tmp_path_factory.mktemp("card"), _recipe_text, CLASSES, per_class=3)
    tmp, path, r = prep["tmp"], prep["recipe_path"], prep["recipe"]
    out = synthesize.run(r, per_class=PER_CLASS, base_only=True)
    return {"recipe": path, "out": out, "tmp": tmp, "workdir": r.workdir_path}


def _card(out: Path) -> tuple[dict, str]:
    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_card_header_parses_and_matches_index(ws):
    out = ws["out"]
    index = json.loads((out / "index.json").read_text())
    meta, body = _card(out)
    assert meta["license"] == "other" and meta["license_name"] == "inherited-from-training-data"
    assert "licence and terms of use of that real training data apply" in body
    assert meta["task_categories"] == ["image-classification"]
    assert meta["size_categories"] == ["n<1K"]
    assert {"synthetic", "medical", "endoscopic"} <= set(meta["tags"])
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": ["synth-*.tar"]}]}]
    feats = {f["name"]: f for f in meta["dataset_info"]["features"]}
    assert list(feats) == ["__key__", "__url__", "png", "cls", "json"]
    assert feats["png"]["dtype"] == "image"
    # ClassLabel names in label order = index.json's classes
    names = feats["cls"]["dtype"]["class_label"]["names"]
    assert names == {str(c["index"]): c["name"] for c in index["classes"]}
    assert [names[str(i)] for i in range(len(names))] == list(CLASSES)
    # The body's class table agrees with index.json's counts; the generator is named.
    for c in index["classes"]:
        assert f"| {c['index']} | {c['name']} | {c['category']} | {index['counts'][c['name']]} |" in body
    assert sum(index["counts"].values()) == index["total"] == PER_CLASS * len(CLASSES)
    assert f"`{index['fingerprint']}`" in body and "guidance 4.5" in body and "2 steps" in body
    assert "base model only" in body and "Not scored yet" in body
    assert "README.md" not in [p.name for p in out.glob(".*.tmp")]


def test_card_features_are_what_hf_datasets_yields(ws, tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (optional: pip install datasets)")
    out = ws["out"]
    meta, _ = _card(out)
    declared = datasets.Features._from_yaml_list(meta["dataset_info"]["features"])
    plain = datasets.load_dataset("webdataset", data_files={"train": str(out / "synth-*.tar")}, split="train",
                                  cache_dir=str(tmp_path / "c1"))
    # The loader without the card: the same columns, cls a plain int, json the same record fields.
    assert set(plain.features) == set(declared)
    assert isinstance(plain.features["png"], datasets.Image)
    assert plain.features["cls"].dtype == "int64"
    assert list(plain.features["json"]) == list(declared["json"])
    # The folder with the card: exactly the declared features, labels as class names.
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c2"))
    assert ds.features == declared
    assert ds.features["cls"].names == list(CLASSES)
    assert len(ds) == PER_CLASS * len(CLASSES)
    row = ds[0]
    assert ds.features["cls"].int2str(row["cls"]) == row["json"]["label"]


def test_imagefolder_card(ws, tmp_path):
    from medsynth import synthesize
    from medsynth.recipe import load_recipe

    r = load_recipe(ws["recipe"], ["synthesize.license=CC BY-NC 4.0"])
    out = ws["tmp"] / "folders"
    synthesize.run(r, per_class=PER_CLASS, base_only=True, out=out, fmt="imagefolder")
    meta, body = _card(out)
    assert meta["license"] == "cc-by-nc-4.0" and "Licence: CC BY-NC 4.0" in body
    assert meta["configs"][0]["data_files"][0]["path"] == ["*/*.png", "metadata.jsonl"]
    assert [f["name"] for f in meta["dataset_info"]["features"]] == ["image", "label", "cls", "key"]
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (optional: pip install datasets)")
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c"))
    assert ds.features == datasets.Features._from_yaml_list(meta["dataset_info"]["features"])
    assert len(ds) == PER_CLASS * len(CLASSES)


def test_card_quotes_scores_of_this_set_only(ws):
    """score refreshes the card; scores of another (older) synthetic set are never quoted."""
    from medsynth.recipe import load_recipe
    from medsynth.synthesize import card
    from medsynth.workspace import sha256_file

    r = load_recipe(ws["recipe"])
    out, sdir = ws["out"], ws["workdir"] / "score"
    sdir.mkdir(exist_ok=True)
    (sdir / "scores.json").write_text(json.dumps({"fid": 123.25, "kid_domain_mean": 0.5, "kid_domain_std": 0.1,
                                                  "domain_fid": 7.5, "memorization_fraction": 0.0,
                                                  "memorization": {"threshold": 0.95}}))
    (sdir / "provenance.json").write_text(json.dumps({"inputs": {"synthetic/index.json": "0" * 64}}))
    card.refresh(r)
    assert "Not scored yet" in _card(out)[1]
    (sdir / "provenance.json").write_text(json.dumps({"inputs": {"synthetic/index.json": sha256_file(out / "index.json")}}))
    card.refresh(r)
    body = _card(out)[1]
    assert "FID (Inception): 123.2" in body and "domain FID: 7.5" in body and "Not scored yet" not in body
    for p in (sdir / "scores.json", sdir / "provenance.json"):
        p.unlink()
