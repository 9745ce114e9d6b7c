"""The classify stage on a tiny real workspace: HAM10000 subsets + synthetic shards written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ONE_THREAD

from medsynth.errors import UserError

CLASSES = ("dermatofibroma", "melanoma", "vascular-lesion")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_workspace(root: Path, shared: Path, n_real: int = 20, n_synth: int = 12, size: int = 48) -> Path:
    """Prepared workspace (3 HAM10000 classes, n_real each, 40 % test) + synthetic shards.

    Half of each class's synthetic images are resized copies of real *train* images (so the
    memorization check has something to find), half are real images outside the workspace.
    Returns the recipe path.
    """
    import webdataset as wds
    from PIL import Image

    from medsynth import data
    from medsynth.recipe import load_recipe

    src = shared / "ham10000"
    data_root = root / "data"
    for c in CLASSES:
        (data_root / c).mkdir(parents=True)
        for f in sorted((src / c).glob("*.jpg"))[:n_real]:
            (data_root / c / f.name).symlink_to(f)
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
name: tiny
workdir: {root / 'ws'}
seed: 0
data: {{root: {data_root}, test_fraction: 0.4}}
classify: {{model: resnet10t, pretrained: false, epochs: 1, learning_rate: 1.0e-3, batch_size: 16,
            image_size: 32, mixed_precision: "no", device: cpu, num_workers: 0}}
score: {{fid: false, kid_subset_size: 50, kid_subsets: 10, batch_size: 16, device: cpu}}
""")
    r = load_recipe(str(recipe))
    data.run(r)
    wd = r.workdir_path
    train = data.read_manifest(wd, "train")
    syn = wd / "synthetic"
    syn.mkdir()
    counts = {}
    writers = [wds.TarWriter(str(syn / f"synth-{i:06d}.tar")) for i in range(2)]
    k = 0
    for label, c in enumerate(CLASSES):
        copies = [Path(r.path) for r in train if r.label == c][: n_synth // 2]
        others = sorted((src / c).glob("*.jpg"))[n_real: n_real + n_synth - len(copies)]
        for i, p in enumerate(copies + others):
            img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
            writers[k % 2].write({"__key__": f"{c}-{i:06d}", "png": img, "cls": label,
                                  "json": {"label": c, "prompt": f"a dermoscopic image of {c}", "seed": i,
                                           "source": str(p)}})
            k += 1
        counts[c] = len(copies) + len(others)
    for w in writers:
        w.close()
    (syn / "index.json").write_text(json.dumps({"classes": [{"index": i, "name": c} for i, c in enumerate(CLASSES)],
                                               "counts": counts}))
    return recipe


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing")
    return make_workspace(tmp_path_factory.mktemp("classify"), SHARED_DATA)


@pytest.mark.parametrize("flag,target", [("--synthetic-only", "synthetic"), ("--real-only", "real")])
def test_classify_cli_writes_metrics_on_real_test_split(cli, workspace, flag, target):
    res = cli("classify", str(workspace), flag, "--json", "-q", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["train_on"] == target
    d = workspace.parent / "ws" / "classify" / target
    m = json.loads((d / "metrics.json").read_text())
    for key in ("f1_macro", "balanced_accuracy", "auc_macro_ovr", "accuracy"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["evaluated_on"] == "real test split"
    assert m["n_test"] == 24  # 8 real test images per class (40 % of 20)
    assert m["n_train"] == 36  # 12 synthetic or 12 real train images per class
    assert sum(sum(r) for r in m["confusion_matrix"]) == 24
    assert set(m["per_class"]) == set(CLASSES)
    assert m["chance"]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert (d / "confusion.png").stat().st_size > 0 and (d / "model.safetensors").is_file()
    assert json.loads((d / "provenance.json").read_text())["complete"] is True
    assert not (d / "checkpoint.pt").exists()

    # The saved model reloads into the same architecture and reproduces the recorded accuracy.
    from medsynth.features import load_classifier

    model, info = load_classifier(d / "model.safetensors")
    assert info["classes"] == list(CLASSES) and info["train_on"] == target


def test_metrics_match_a_recomputation_from_the_saved_model(workspace):
    """accuracy in metrics.json equals the saved model's accuracy on the real test images."""
    import torch

    from medsynth.data import read_manifest
    from medsynth.features import eval_transform, load_classifier
    from medsynth.images import read_image

    d = workspace.parent / "ws" / "classify" / "real"
    if not d.joinpath("metrics.json").is_file():
        pytest.skip("runs after the CLI test that trains the real-only model")
    model, info = load_classifier(d / "model.safetensors")
    tf = eval_transform(info["image_size"], info["mean"], info["std"])
    rows = read_manifest(workspace.parent / "ws", "test")
    x = torch.stack([tf(read_image(r.path)) for r in rows])
    with torch.inference_mode():
        pred = model(x).argmax(1).numpy()
    y = np.array([list(CLASSES).index(r.label) for r in rows])
    m = json.loads((d / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx(float((pred == y).mean()))


def test_synthetic_only_without_shards_names_the_fix(tmp_path, shared_data):
    from medsynth import classify
    from medsynth.recipe import load_recipe

    recipe = make_workspace(tmp_path, shared_data, n_real=6, n_synth=2)
    syn = tmp_path / "ws" / "synthetic"
    for p in syn.iterdir():
        p.unlink()
    syn.rmdir()
    r = load_recipe(str(recipe))
    with pytest.raises(UserError) as e:
        classify.run(r, train_on="synthetic")
    msg = str(e.value)
    assert str(syn) in msg and "medsynth synthesize" in msg


def _tiny_shard(d: Path, samples: list[tuple[str, int, str]], index: dict) -> None:
    import webdataset as wds
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(d / "synth-000000.tar")) as w:
        for key, cls, label in samples:
            w.write({"__key__": key, "png": Image.new("RGB", (8, 8), (cls * 90, 0, 0)), "cls": cls,
                     "json": {"label": label}})
    (d / "index.json").write_text(json.dumps(index))


def test_synthdata_reads_shards_and_checks_them_against_the_workspace(tmp_path):
    from medsynth import synthdata

    names = ["a", "b"]
    syn = tmp_path / "synthetic"
    good = {"format": "webdataset", "classes": [{"index": 0, "name": "a"}, {"index": 1, "name": "b"}],
            "shards": [{"file": "synth-000000.tar", "count": 3}], "total": 3}
    _tiny_shard(syn, [("a-000000", 0, "a"), ("b-000000", 1, "b"), ("b-000001", 1, "b")], good)
    samples = synthdata.index_samples(tmp_path, names)
    assert [(x.key, x.label) for x in samples] == [("a-000000", 0), ("b-000000", 1), ("b-000001", 1)]
    assert synthdata.read_image(samples[1]).getpixel((0, 0)) == (90, 0, 0)

    with pytest.raises(UserError, match="lists 5 samples but 3"):
        (syn / "index.json").write_text(json.dumps({**good, "total": 5}))
        synthdata.index_samples(tmp_path, names)
    with pytest.raises(UserError, match="another class list"):
        (syn / "index.json").write_text(json.dumps({**good, "classes": [{"index": 0, "name": "b"}]}))
        synthdata.index_samples(tmp_path, names)
    with pytest.raises(UserError, match="outside 0..0"):
        (syn / "index.json").write_text(json.dumps({k: v for k, v in good.items() if k != "classes"}))
        synthdata.index_samples(tmp_path, ["a"])
    _tiny_shard(syn, [("a-000000", 0, "b")], {"classes": ["a", "b"]})
    with pytest.raises(UserError, match="json says label 'b'"):
        synthdata.index_samples(tmp_path, names)


def test_synthdata_reads_the_imagefolder_layout(tmp_path):
    from PIL import Image

    from medsynth import synthdata

    syn = tmp_path / "synthetic"
    (syn / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(syn / "b" / "b-000000.png")
    (syn / "metadata.jsonl").write_text(json.dumps({"file_name": "b/b-000000.png", "label": "b", "cls": 1,
                                                    "key": "b-000000"}) + "\n")
    (syn / "index.json").write_text(json.dumps({"format": "imagefolder", "classes": [{"index": 0, "name": "a"},
                                                                                     {"index": 1, "name": "b"}],
                                                "total": 1}))
    (x,) = synthdata.index_samples(tmp_path, ["a", "b"])
    assert x.label == 1 and synthdata.read_image(x).getpixel((3, 3)) == (1, 2, 3)


def test_resume_after_interruption_gives_the_same_model(tmp_path, shared_data, monkeypatch, capsys):
    import torch

    from medsynth import classify
    from medsynth.recipe import load_recipe

    recipe = make_workspace(tmp_path, shared_data, n_real=8, n_synth=4)
    r = load_recipe(str(recipe), ["classify.epochs=2"])
    out = tmp_path / "ws" / "classify" / "synthetic"
    ref = json.loads(classify.run(r, train_on="synthetic").read_text())
    (out / "metrics.json").unlink()

    class Killed(Exception):
        pass

    real_save = torch.save
    calls = {"n": 0}

    def die_at_second_checkpoint(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 1's checkpoint is on disk; die while saving epoch 2's
            raise Killed()
        return real_save(*a, **kw)

    monkeypatch.setattr(torch, "save", die_at_second_checkpoint)
    with pytest.raises(Killed):
        classify.run(r, train_on="synthetic")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (out / "metrics.json").exists()

    capsys.readouterr()
    resumed = json.loads(classify.run(r, train_on="synthetic").read_text())
    assert "resuming after epoch 1 of 2" in capsys.readouterr().err
    assert [e["epoch"] for e in resumed["train_loss"]] == [2]  # epoch 1 was not trained again
    assert resumed["train_loss"][0]["train_loss"] == pytest.approx(ref["train_loss"][1]["train_loss"], rel=1e-6)
    assert resumed["confusion_matrix"] == ref["confusion_matrix"]
    assert resumed["auc_macro_ovr"] == pytest.approx(ref["auc_macro_ovr"], rel=1e-6)
    assert not (out / "checkpoint.pt").exists()

    # A checkpoint made with other settings is not reused.
    calls["n"] = 0
    monkeypatch.setattr(torch, "save", die_at_second_checkpoint)
    with pytest.raises(Killed):
        classify.run(r, train_on="synthetic")
    monkeypatch.setattr(torch, "save", real_save)
    capsys.readouterr()
    r3 = load_recipe(str(recipe), ["classify.epochs=2", "classify.learning_rate=0.01"])
    classify.run(r3, train_on="synthetic")
    err = capsys.readouterr().err
    assert "resuming" not in err and "belongs to other settings" in err

    # --mixed trains on both sets, still tested on the real test split only.
    mixed = json.loads(classify.run(load_recipe(str(recipe)), train_on="mixed").read_text())
    assert mixed["n_train"] == ref["n_train"] + sum(1 for line in (tmp_path / "ws" / "manifest.csv").read_text()
                                                    .splitlines() if ",train," in line)
    assert mixed["n_test"] == ref["n_test"] and mixed["train_on"] == "mixed"


def test_auc_with_a_class_absent_from_the_test_split():
    from sklearn.metrics import roc_auc_score

    from medsynth.classify import auc_ovr, compute_metrics

    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    p = rng.dirichlet(np.ones(4), size=40)
    y_all = np.arange(40) % 4
    auc, per, note = auc_ovr(y_all, p, names)
    assert note is None
    assert auc == pytest.approx(roc_auc_score(y_all, p, multi_class="ovr", average="macro", labels=[0, 1, 2, 3]))
    assert auc == pytest.approx(np.mean(list(per.values())))

    y = np.where(y_all == 2, 0, y_all)  # class "c" absent
    m = compute_metrics(y, p, names)
    assert "c" in m["note"] and "absent" in m["note"]
    expected = np.mean([roc_auc_score((y == k).astype(int), p[:, k]) for k in (0, 1, 3)])
    assert m["auc_macro_ovr"] == pytest.approx(expected)
    assert m["per_class"]["c"]["auc_ovr"] is None and m["per_class"]["c"]["support"] == 0

    m1 = compute_metrics(np.zeros(10, dtype=int), p[:10], names)
    assert m1["auc_macro_ovr"] is None and "undefined" in m1["note"]


def test_pretrained_weights_missing_offline_is_a_user_error(monkeypatch):
    from medsynth.features import create_timm_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        create_timm_model("resnet10t", pretrained=True, pretrained_path=None, num_classes=3, key="classify")
    msg = str(e.value)
    assert "resnet10t" in msg and "classify.pretrained=false" in msg and "classify.pretrained_path" in msg
    assert "huggingface" in msg.lower()


def test_pretrained_path_loads_local_weights(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from medsynth.features import create_timm_model

    torch.manual_seed(1)
    src = timm.create_model("resnet10t", pretrained=False)  # 1000-class head, like a hub checkpoint
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    m = create_timm_model("resnet10t", pretrained=True, pretrained_path=str(tmp_path / "w.safetensors"),
                          num_classes=3, key="classify")
    assert torch.equal(m.conv1[0].weight, src.conv1[0].weight)
    assert m.fc.out_features == 3  # the 1000-class head was dropped, not forced in
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m2 = create_timm_model("resnet10t", pretrained=True, pretrained_path=str(tmp_path / "w.pth"),
                           num_classes=3, key="classify")
    assert torch.equal(m2.conv1[0].weight, src.conv1[0].weight)
    with pytest.raises(UserError, match="does not exist"):
        create_timm_model("resnet10t", pretrained=True, pretrained_path=str(tmp_path / "nope.pth"),
                          num_classes=3, key="classify")
    with pytest.raises(UserError, match="not a timm model"):
        create_timm_model("resnet_does_not_exist", pretrained=False, pretrained_path=None, num_classes=3,
                          key="classify")


def test_fixed_size_models_are_built_for_the_recipe_image_size(tmp_path):
    """A ViT (fixed input size) at classify.image_size=32 builds, runs, saves and reloads."""
    import torch

    from medsynth.classify import _save_model
    from medsynth.features import create_timm_model, load_classifier

    m = create_timm_model("vit_tiny_patch16_224", pretrained=False, pretrained_path=None, num_classes=3,
                          key="classify", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 3)
    _save_model(m, tmp_path / "model.safetensors", {"model": "vit_tiny_patch16_224", "classes": ["a", "b", "c"],
                                                   "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    m2, info = load_classifier(tmp_path / "model.safetensors")
    with torch.inference_mode():
        assert torch.allclose(m2(x), m.eval()(x))


def test_cli_rejects_two_training_sets(cli):
    res = cli("classify", "demo", "--real-only", "--mixed")
    assert res.returncode == 2
    assert "at most one" in res.stderr


# ----------------------------------------------------------------------------- classify.geometry


def _ham_image(shared: Path):
    from medsynth.images import read_image

    img = read_image(sorted((shared / "ham10000" / "melanoma").glob("*.jpg"))[0])
    assert img.size[0] != img.size[1]  # the test needs a non-square image
    return img


def test_crop_geometry_is_the_generators_resize_center_crop(shared_data):
    """classify.geometry: crop prepares images exactly as fine-tuning does (resize_center_crop), then normalises."""
    import torch
    from torchvision import transforms as T

    from medsynth.classify import _train_transform
    from medsynth.features import eval_transform
    from medsynth.images import resize_center_crop

    img = _ham_image(shared_data)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = T.Normalize(mean, std)(T.ToTensor()(resize_center_crop(img, 32)))
    crop = eval_transform(32, mean, std, "crop")(img)
    assert crop.shape == (3, 32, 32) and torch.equal(crop, expected)
    squash = eval_transform(32, mean, std)(img)  # the default is unchanged: the whole image, squashed
    assert squash.shape == (3, 32, 32) and not torch.allclose(squash, expected, atol=1e-3)
    assert torch.equal(squash, eval_transform(32, mean, std, "squash")(img))
    for seed in range(4):  # training adds only a random flip on top of the same geometry
        torch.manual_seed(seed)
        x = _train_transform(32, mean, std, "crop")(img)
        assert torch.equal(x, expected) or torch.equal(x, expected.flip(-1))
    with pytest.raises(ValueError, match="'fit'"):
        eval_transform(32, mean, std, "fit")


def test_crop_classifier_records_its_geometry_and_its_users_crop(tmp_path, shared_data, monkeypatch):
    """Train with geometry crop: every train / test image is cropped, the weights record it, and
    score's classifier extractor and the curation judge prepare images the same way."""
    import torch

    from medsynth import classify, images
    from medsynth.classify import _save_model, compute_metrics
    from medsynth.data import read_manifest
    from medsynth.features import classifier_extractor, eval_transform, load_classifier
    from medsynth.recipe import load_recipe
    from medsynth.synthesize.curate import Judge

    recipe = make_workspace(tmp_path, shared_data, n_real=8, n_synth=4)
    r = load_recipe(str(recipe), ["classify.geometry=crop"])
    calls = {"n": 0}
    real_crop = images.resize_center_crop

    def counting_crop(img, resolution):
        calls["n"] += 1
        return real_crop(img, resolution)

    monkeypatch.setattr(images, "resize_center_crop", counting_crop)
    m = json.loads(classify.run(r, train_on="mixed").read_text())
    monkeypatch.setattr(images, "resize_center_crop", real_crop)
    assert calls["n"] == m["n_train"] + m["n_test"]  # real train, synthetic and real test images, one epoch

    path = tmp_path / "ws" / "classify" / "mixed" / "model.safetensors"
    model, info = load_classifier(path)
    assert info["geometry"] == "crop"

    # The test transform was the crop one: the recorded AUC is reproduced from cropped inputs only.
    tf = eval_transform(info["image_size"], info["mean"], info["std"], "crop")
    rows = read_manifest(tmp_path / "ws", "test")
    names = list(CLASSES)
    with torch.inference_mode():
        p = torch.softmax(model(torch.stack([tf(images.read_image(x.path)) for x in rows])), 1).double().numpy()
    again = compute_metrics(np.array([names.index(x.label) for x in rows]), p, names)
    assert again["auc_macro_ovr"] == pytest.approx(m["auc_macro_ovr"], abs=1e-9)

    img = _ham_image(shared_data)
    expected = tf(img)
    ext = classifier_extractor(path, torch.device("cpu"))
    assert torch.equal(ext.tf(img), expected) and "crop" in ext.id
    with torch.inference_mode():
        direct = model.forward_head(model.forward_features(expected[None]), pre_logits=True).double().numpy()
    np.testing.assert_allclose(ext([img]), direct, rtol=1e-6, atol=1e-7)
    judge = Judge(path, torch.device("cpu"))
    assert torch.equal(judge.tf(img), expected)
    np.testing.assert_allclose(judge([img])[1], direct, rtol=1e-6, atol=1e-7)

    # A classifier written before classify.geometry existed has no key: it was trained on squashed images.
    old = {k: v for k, v in info.items() if k != "geometry"}
    _save_model(model, tmp_path / "old" / "model.safetensors", old)
    _, old_info = load_classifier(tmp_path / "old" / "model.safetensors")
    assert old_info["geometry"] == "squash"
    squash = eval_transform(info["image_size"], info["mean"], info["std"])(img)
    assert torch.equal(classifier_extractor(tmp_path / "old" / "model.safetensors", torch.device("cpu")).tf(img), squash)
    assert torch.equal(Judge(tmp_path / "old" / "model.safetensors", torch.device("cpu")).tf(img), squash)
    _save_model(model, tmp_path / "bad" / "model.safetensors", {**info, "geometry": "letterbox"})
    with pytest.raises(UserError, match="'letterbox'"):
        load_classifier(tmp_path / "bad" / "model.safetensors")


def test_classify_geometry_is_part_of_the_classify_stage_key(tmp_path, shared_data):
    from medsynth.pipeline import stage_key
    from medsynth.recipe import load_recipe

    recipe = make_workspace(tmp_path, shared_data, n_real=4, n_synth=2)
    squash = load_recipe(str(recipe))
    crop = load_recipe(str(recipe), ["classify.geometry=crop"])
    assert squash.classify.geometry == "squash"
    assert stage_key(squash, "classify") != stage_key(crop, "classify")
    assert stage_key(squash, "classify") == stage_key(load_recipe(str(recipe), ["classify.geometry=squash"]), "classify")
    # Upstream stages do not read the classifier's settings.
    assert stage_key(squash, "synthesize") == stage_key(crop, "synthesize")
