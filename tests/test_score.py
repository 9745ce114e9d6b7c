"""The score stage on a tiny real workspace: HAM10000 subsets + synthetic shards written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ONE_THREAD

from medsynth.errors import UserError

CLASSES = ("dermatofibroma", "melanoma", "vascular-lesion")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_workspace(root: Path, shared: Path, n_real: int, n_synth: int, size: int = 48,
                   classes: tuple[str, ...] = CLASSES) -> Path:
    """Prepared workspace (3 HAM10000 classes, n_real each, 40 % test) + synthetic shards.

    Half of each class's synthetic images are resized copies of real train images (recorded
    as json 'source'), so memorization has something to find. Returns the recipe path.
    (Duplicated from test_classify.py on purpose: test modules stay independent.)
    """
    import webdataset as wds
    from PIL import Image

    from medsynth import data
    from medsynth.recipe import load_recipe

    src = shared / "ham10000"
    data_root = root / "data"
    for c in classes:
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
    w = wds.TarWriter(str(syn / "synth-000000.tar"))
    counts = {}
    for label, c in enumerate(classes):
        copies = [Path(x.path) for x in train if x.label == c][: n_synth // 2]
        others = sorted((src / c).glob("*.jpg"))[n_real: n_real + n_synth - len(copies)]
        for i, p in enumerate(copies + others):
            img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
            w.write({"__key__": f"{c}-{i:06d}", "png": img, "cls": label,
                     "json": {"label": c, "prompt": f"a dermoscopic image of {c}", "seed": i, "source": str(p)}})
        counts[c] = len(copies) + len(others)
    w.close()
    (syn / "index.json").write_text(json.dumps({"classes": [{"index": i, "name": c} for i, c in enumerate(classes)],
                                               "counts": counts}))
    return recipe


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A workspace with a real-only classifier, scored through the CLI (score.fid: false)."""
    from conftest import SHARED_DATA, run_cli

    from medsynth import classify
    from medsynth.recipe import load_recipe

    root = tmp_path_factory.mktemp("score")
    recipe = make_workspace(root, SHARED_DATA, n_real=25, n_synth=12)
    classify.run(load_recipe(str(recipe)), train_on="real")
    res = run_cli("score", str(recipe), "--json", "-q", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    return recipe, json.loads(res.stdout)


def test_score_writes_scores_json_with_every_key(scored):
    recipe, out = scored
    wd = recipe.parent / "ws"
    s = json.loads((wd / "score" / "scores.json").read_text())
    for key in ("fid", "kid_mean", "kid_std", "domain_fid", "colour", "memorization_fraction", "n_real",
                "n_synthetic", "extractors"):
        assert key in s, key
    assert s["fid"] is None and "score.fid: false" in s["fid_note"]
    assert s["n_real"] == 30 and s["n_synthetic"] == 36 and s["n_real_train"] == 45
    assert s["domain_fid"] > 0 and np.isfinite(s["kid_mean"]) and s["kid_std"] >= 0
    assert s["kid_subset_size"] == 30  # min(kid_subset_size=50, 30 real, 36 synthetic)
    from medsynth.workspace import sha256_file

    dom = s["extractors"]["domain"]
    assert dom["sha256"] == sha256_file(wd / "classify" / "real" / "model.safetensors")
    assert "resnet10t" in dom["id"] and s["extractors"]["fid_inception"] is None
    assert out["domain_fid"] == pytest.approx(s["domain_fid"])
    # 10 real test + 12 synthetic images per class: every class gets a per-class breakdown
    assert set(s["per_class"]) == set(CLASSES) and not s["per_class_skipped"]
    for c in CLASSES:
        assert s["per_class"][c]["n_real"] == 10 and s["per_class"][c]["domain_fid"] > 0
    for name in ("report.md", "samples.png", "closest_pairs.png", "saturation.png", "provenance.json"):
        assert (wd / "score" / name).stat().st_size > 0, name
    report = (wd / "score" / "report.md").read_text()
    assert "| domain FID |" in report and "![closest pairs](closest_pairs.png)" in report


def test_domain_fid_is_the_frechet_distance_of_classifier_features(scored):
    """Recompute domain FID from the saved classifier's features: the stage must agree."""
    from medsynth import metrics, synthdata
    from medsynth.data import read_manifest
    from medsynth.features import classifier_extractor
    from medsynth.images import read_image

    recipe, _ = scored
    wd = recipe.parent / "ws"
    ex = classifier_extractor(wd / "classify" / "real" / "model.safetensors", "cpu")
    real = ex([read_image(r.path) for r in read_manifest(wd, "test")])
    syn = ex([synthdata.read_image(x) for x in synthdata.index_samples(wd, list(CLASSES))])
    s = json.loads((wd / "score" / "scores.json").read_text())
    assert s["domain_fid"] == pytest.approx(metrics.frechet_distance_features(syn, real), rel=1e-6)


def test_memorization_finds_the_copied_training_images(scored):
    from medsynth import synthdata

    recipe, _ = scored
    wd = recipe.parent / "ws"
    s = json.loads((wd / "score" / "scores.json").read_text())
    source = {x.key: x.meta["source"] for x in synthdata.index_samples(wd, list(CLASSES))}
    closest = s["memorization"]["closest"]
    assert len(closest) == 8
    # Half the synthetic images are resized copies of training images; the closest pairs are those.
    hits = [p for p in closest if source[p["synthetic"]] == p["real"]]
    assert len(hits) == len(closest), closest
    assert closest[0]["similarity"] >= closest[-1]["similarity"]
    frac = s["memorization_fraction"]
    assert frac == s["memorization"]["n_above"] / 36
    n_copies_above = sum(1 for p in closest if p["similarity"] > s["memorization"]["threshold"])
    assert s["memorization"]["n_above"] >= n_copies_above


def test_colour_statistics_known_answer():
    from PIL import Image

    from medsynth.score import _Colour, _colour_compare

    real, syn = _Colour(), _Colour()
    for _ in range(2):
        real.add(Image.new("RGB", (20, 10), (255, 0, 0)))  # pure red: saturation 1
        syn.add(Image.new("RGB", (20, 10), (51, 51, 51)))  # grey: saturation 0
    c = _colour_compare(real, syn)
    assert c["real"]["mean_rgb"] == pytest.approx([1.0, 0.0, 0.0])
    assert c["synthetic"]["mean_rgb"] == pytest.approx([0.2, 0.2, 0.2])
    assert c["real"]["std_rgb"] == pytest.approx([0, 0, 0], abs=1e-6)
    assert c["w1_rgb"] == pytest.approx([0.8, 0.2, 0.2])  # point masses: W1 = |difference|
    assert c["w1_saturation"] == pytest.approx(1.0)
    assert c["real"]["saturation_mean"] == pytest.approx(1.0) and c["synthetic"]["saturation_mean"] == 0.0


def _random_fid_inception(path: Path) -> Path:
    """A randomly initialised Inception-v3 in the FID weights' key layout (NOT the real FID weights)."""
    import torch
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    m = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)
    return path


def test_fid_path_with_a_random_inception(tmp_path, shared_data):
    """FID end to end through torch-fidelity's module; random weights, so only the plumbing is checked."""
    from medsynth import classify, score
    from medsynth.recipe import load_recipe
    from medsynth.workspace import sha256_file

    two = CLASSES[:2]  # every image costs a 299-px Inception pass: keep the set minimal (2 test, 4 train, 4 synthetic)
    recipe = make_workspace(tmp_path, shared_data, n_real=3, n_synth=2, classes=two)
    weights = _random_fid_inception(tmp_path / "pt_inception-random.pth")
    r = load_recipe(str(recipe), ["score.fid=true", f"score.fid_weights={weights}"])
    classify.run(r, train_on="real")
    s = json.loads(score.run(r).read_text())
    assert isinstance(s["fid"], float) and np.isfinite(s["fid"]) and s["fid"] >= 0
    inc = s["extractors"]["fid_inception"]
    assert inc["sha256"] == sha256_file(weights) and inc["weights"] == str(weights)
    assert "fid-inception" in s["kid_features"] and "fid-inception" in s["memorization"]["features"]
    assert (s["n_real"], s["n_real_train"], s["n_synthetic"]) == (2, 4, 4)
    assert set(s["per_class_skipped"]) == set(two)  # 1 test / 2 synthetic images per class
    assert "at least 10" in s["per_class_skipped"]["melanoma"]


def test_fid_extractor_matches_torch_fidelity_on_the_same_weights(tmp_path):
    """Our safe loader gives the same features as torch-fidelity loading the file itself."""
    import torch
    from PIL import Image
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from medsynth.features import FIDInception

    weights = _random_fid_inception(tmp_path / "w.pth")
    ours = FIDInception(weights, torch.device("cpu"))
    sd = torch.load(weights, weights_only=True)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))]  # two sizes in one batch
    f = ours(imgs)
    assert f.shape == (2, 2048) and f.dtype == np.float64
    # Reference: torch-fidelity's module given the same tensors (plus the BatchNorm step counters
    # it requires), one image at a time.
    import io

    full = dict(sd)
    for k, v in ours.model.state_dict().items():
        full.setdefault(k, v)
    buf = io.BytesIO()
    torch.save(full, buf)
    buf.seek(0)
    ref_model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    with torch.inference_mode():
        for i, im in enumerate(imgs):
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].contiguous()
            (g,) = ref_model(x)
            np.testing.assert_allclose(f[i], g[0].double().numpy(), rtol=1e-5, atol=1e-12)


def test_missing_fid_weights_fail_before_any_work(tmp_path, shared_data, monkeypatch):
    from medsynth import score
    from medsynth.features import FID_WEIGHTS_NAME
    from medsynth.recipe import load_recipe

    recipe = make_workspace(tmp_path, shared_data, n_real=4, n_synth=2)
    monkeypatch.delenv("MEDSYNTH_FID_WEIGHTS", raising=False)
    with pytest.raises(UserError) as e:
        score.run(load_recipe(str(recipe), ["score.fid=true"]))
    msg = str(e.value)
    assert FID_WEIGHTS_NAME in msg and "score.fid: false" in msg and "MEDSYNTH_FID_WEIGHTS" in msg
    assert not (tmp_path / "ws" / "score").exists()  # nothing was computed or written

    missing = tmp_path / "nope.pth"
    monkeypatch.setenv("MEDSYNTH_FID_WEIGHTS", str(missing))
    with pytest.raises(UserError, match="MEDSYNTH_FID_WEIGHTS: .*nope.pth does not exist"):
        score.run(load_recipe(str(recipe), ["score.fid=true"]))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(UserError, match="could not be read"):  # domain_model set: skip the real-classifier check
        score.run(load_recipe(str(recipe), ["score.fid=true", f"score.fid_weights={garbage}",
                                            "score.domain_model=resnet10t"]))


def test_missing_domain_classifier_names_the_fix(tmp_path, shared_data):
    from medsynth import score
    from medsynth.recipe import load_recipe

    recipe = make_workspace(tmp_path, shared_data, n_real=4, n_synth=2)
    with pytest.raises(UserError, match="medsynth classify --real-only"):
        score.run(load_recipe(str(recipe)))
    with pytest.raises(UserError, match="score.domain_model"):
        score.run(load_recipe(str(recipe), ["score.domain_model=resnet10t"]))  # not in the (offline) cache


def test_hf_image_classifier_as_domain_model(tmp_path):
    """A tiny transformers ViT classifier saved locally: features = the input of its classifier head."""
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from medsynth.features import HFFeatures

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    ex = HFFeatures(str(tmp_path / "vit"), torch.device("cpu"))
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    f = ex(imgs)
    assert f.shape == (3, 32)
    model = ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    px = ViTImageProcessor.from_pretrained(tmp_path / "vit")(images=imgs, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ref = model.vit(px).last_hidden_state[:, 0]
        assert torch.allclose(model.classifier(ref), model(px).logits, atol=1e-5)  # it is the head's input
    np.testing.assert_allclose(f, ref.double().numpy(), rtol=1e-5, atol=1e-6)
    assert ex.sha256 and ex.weights.endswith("model.safetensors")
