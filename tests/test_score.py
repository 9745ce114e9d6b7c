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
    # Empty model caches: FD_DINOv2's weights are absent whatever this machine has cached.
    caches = {"HF_HUB_CACHE": str(root / "hub"), "TORCH_HOME": str(root / "torch")}
    res = run_cli("score", str(recipe), "--json", "-q", env={**ONE_THREAD, **caches})
    assert res.returncode == 0, res.stderr
    return recipe, json.loads(res.stdout)


def test_score_writes_scores_json_with_every_key(scored):
    recipe, out = scored
    wd = recipe.parent / "ws"
    s = json.loads((wd / "score" / "scores.json").read_text())
    for key in ("fid", "kid_domain_mean", "kid_domain_std", "domain_fid", "colour", "memorization_fraction", "n_real",
                "n_synthetic", "extractors", "features"):
        assert key in s, key
    assert s["fid"] is None and "score.fid: false" in s["fid_note"]
    assert s["n_real"] == 30 and s["n_synthetic"] == 36 and s["n_real_train"] == 45
    assert s["domain_fid"] > 0 and np.isfinite(s["kid_domain_mean"]) and s["kid_domain_std"] >= 0
    assert s["kid_subset_size"] == 30  # min(kid_subset_size=50, 30 real, 36 synthetic)
    from medsynth.workspace import sha256_file

    dom = s["extractors"]["domain"]
    assert dom["sha256"] == sha256_file(wd / "classify" / "real" / "model.safetensors")
    assert "resnet10t" in dom["id"] and s["extractors"]["fid_inception"] is None
    assert out["domain_fid"] == pytest.approx(s["domain_fid"])
    assert "fid" in out  # --json: whatever the CLI picks, it comes from scores.json
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
    # prdc_k=1: the only k below the 2 real test images, so PRDC runs on the Inception features too.
    r = load_recipe(str(recipe), ["score.fid=true", f"score.fid_weights={weights}", "score.prdc_k=1"])
    classify.run(r, train_on="real")
    s = json.loads(score.run(r).read_text())
    assert isinstance(s["fid"], float) and np.isfinite(s["fid"]) and s["fid"] >= 0
    inc = s["extractors"]["fid_inception"]
    assert inc["sha256"] == sha256_file(weights) and inc["weights"] == str(weights)
    assert "fid-inception" in s["kid_features"] and "fid-inception" in s["memorization"]["features"]
    # Named by their feature space: Inception KID here, and no domain-KID entry.
    assert s["fid_inception"] == s["fid"] and np.isfinite(s["kid_inception_mean"]) and s["kid_inception_std"] >= 0
    assert not [k for k in s if k.startswith("kid_domain") or k in ("kid_mean", "kid_std")]
    assert s["features"]["fid_inception"] == s["features"]["kid_inception"] == inc["id"]
    assert s["memorization"]["feature_space"] == "inception"
    for m in ("precision", "recall", "density", "coverage"):
        assert s[f"{m}_inception"] is not None and s["features"][f"{m}_inception"] == inc["id"]
        assert s[f"{m}_domain"] is not None and s["features"][f"{m}_domain"] == s["extractors"]["domain"]["id"]
    report = (tmp_path / "ws" / "score" / "report.md").read_text()
    assert "| FID (Inception-v3) |" in report and "| KID on Inception-v3 features (`kid_inception`" in report
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
    assert not (tmp_path / "ws" / "score").exists()  # every extractor is resolved before score/ is touched


def _tiny_vit(out: Path) -> Path:
    """A tiny random transformers ViT image classifier (3 classes, 32 px) saved with save_pretrained."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_hf_image_classifier_as_domain_model(tmp_path):
    """A tiny transformers ViT classifier saved locally: features = the input of its classifier head."""
    import torch
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    from medsynth.features import HFFeatures

    _tiny_vit(tmp_path / "vit")
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


def test_without_inception_no_score_is_labelled_inception(scored):
    """Issue 13.6: with FID off, KID moves to the domain features and must say so in every output."""
    from medsynth import score

    recipe, _ = scored
    wd = recipe.parent / "ws"
    s = json.loads((wd / "score" / "scores.json").read_text())
    dom = s["extractors"]["domain"]["id"]

    def keys(d):
        for k, v in d.items():
            if k != "extractors":
                yield k
                if isinstance(v, dict):
                    yield from keys(v)

    assert not [k for k in keys(s) if "inception" in k.lower()]
    assert "kid_mean" not in s and "kid_std" not in s  # the old, ambiguous name is gone
    prdc = {f"{m}_domain": dom for m in ("precision", "recall", "density", "coverage")}
    assert s["kid_features"] == dom and s["features"] == {"kid_domain": dom, "domain_fid": dom, "memorization": dom, **prdc}
    assert s["memorization"]["feature_space"] == "domain"
    assert all("kid_domain_mean" in pc and "fid_inception" not in pc for pc in s["per_class"].values())
    summary = score.summary(s)
    assert summary["kid_domain_mean"] == s["kid_domain_mean"] and "fid_inception" not in summary
    assert summary["features"]["kid_domain"] == dom
    report = (wd / "score" / "report.md").read_text()
    assert "| KID on domain features (not comparable with Inception KID) (`kid_domain`" in report
    assert not [line for line in report.splitlines() if line.startswith("|") and "Inception" in line
                and "not comparable" not in line]


def _fake_hub_cache(cache: Path, repo_id: str, build) -> Path:
    """A Hugging Face hub cache entry for ``repo_id`` (refs/main -> snapshot) filled by ``build(dir)``."""
    commit = "0" * 39 + "1"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    build(repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_domain_presets_load_offline_from_the_cache_only(tmp_path, monkeypatch):
    """score.domain_model: kvasir-vit / ham10000-vit name the paper's public ViTs; absent -> UserError."""
    import huggingface_hub.constants
    import torch
    from PIL import Image

    from medsynth.features import DOMAIN_PRESETS, HFFeatures, domain_extractor

    assert DOMAIN_PRESETS["kvasir-vit"]["hf_id"] == "mmuratarat/kvasir-v2-classifier"
    assert DOMAIN_PRESETS["ham10000-vit"]["hf_id"] == "Anwarkh1/Skin_Cancer-Image_Classification"
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    class Cfg:
        domain_model = "ham10000-vit"
        domain_pretrained_path = None

    with pytest.raises(UserError) as e:
        domain_extractor(Cfg, tmp_path, torch.device("cpu"))
    msg = str(e.value)
    assert "'ham10000-vit'" in msg and "hf download Anwarkh1/Skin_Cancer-Image_Classification" in msg
    assert str(cache) in msg and "score.domain_model" in msg

    snap = _fake_hub_cache(cache, "Anwarkh1/Skin_Cancer-Image_Classification", _tiny_vit)
    ex = domain_extractor(Cfg, tmp_path, torch.device("cpu"))
    assert isinstance(ex, HFFeatures)
    assert ex.id.startswith("ham10000-vit = hf Anwarkh1/Skin_Cancer-Image_Classification")
    assert Path(ex.weights) == snap / "model.safetensors" and ex.sha256
    rng = np.random.default_rng(0)
    f = ex([Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(2)])
    assert f.shape == (2, 32) and np.isfinite(f).all()


def test_missing_preset_fails_before_score_is_touched(tmp_path, shared_data, monkeypatch):
    import huggingface_hub.constants

    from medsynth import score
    from medsynth.recipe import load_recipe

    recipe = make_workspace(tmp_path, shared_data, n_real=4, n_synth=2)
    (tmp_path / "hub").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="preset 'kvasir-vit' is the Hugging Face model 'mmuratarat/kvasir-v2-classifier'"):
        score.run(load_recipe(str(recipe), ["score.domain_model=kvasir-vit"]))
    assert not (tmp_path / "ws" / "score").exists()


def test_a_timm_preset_loads_through_local_dir_from_the_cache(tmp_path, monkeypatch):
    """The 'timm' loader of DOMAIN_PRESETS: a timm hub repo from the cache, pre-logits features."""
    import huggingface_hub.constants
    import timm
    import torch
    from PIL import Image

    from medsynth import features

    monkeypatch.setitem(features.DOMAIN_PRESETS, "tiny-timm", {"hf_id": "medsynth-test/tiny-resnet", "loader": "timm",
                                                               "about": "test only"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    _fake_hub_cache(tmp_path / "hub", "medsynth-test/tiny-resnet", lambda d: timm.models.save_for_hf(model, d))
    ex = features.preset_extractor("tiny-timm", torch.device("cpu"))
    assert ex.id.startswith("tiny-timm = timm hf-hub:medsynth-test/tiny-resnet") and ex.sha256
    f = ex([Image.new("RGB", (40, 40), (200, 100, 50))])
    assert f.shape == (1, model.num_features)


# ----------------------------------------------------------------------------- PRDC and FD_DINOv2 (issue 14)


def test_prdc_on_the_domain_features_named_by_space(scored):
    """Without Inception and DINOv2 weights: PRDC on the domain features, fd_dinov2 null with a note."""
    from medsynth import metrics, score, synthdata
    from medsynth.data import read_manifest
    from medsynth.features import classifier_extractor
    from medsynth.images import read_image

    recipe, out = scored
    wd = recipe.parent / "ws"
    s = json.loads((wd / "score" / "scores.json").read_text())
    dom = s["extractors"]["domain"]["id"]
    assert s["prdc_k"] == 5
    ex = classifier_extractor(wd / "classify" / "real" / "model.safetensors", "cpu")
    real = ex([read_image(r.path) for r in read_manifest(wd, "test")])
    syn = ex([synthdata.read_image(x) for x in synthdata.index_samples(wd, list(CLASSES))])
    want = metrics.prdc(real, syn, k=5)
    for m in ("precision", "recall", "density", "coverage"):
        assert s[f"{m}_domain"] == pytest.approx(want[m]) and s["features"][f"{m}_domain"] == dom
        assert out[f"{m}_domain"] == s[f"{m}_domain"]  # the --json headline
        assert f"{m}_inception" not in s and f"{m}_dinov2" not in s
    assert 0 <= s["precision_domain"] <= 1 and 0 <= s["coverage_domain"] <= 1
    # Per class (10 real test, 12 synthetic images each, k = 5): the same maths on the class's images.
    y_real = [CLASSES.index(r.label) for r in read_manifest(wd, "test")]
    y_syn = [x.label for x in synthdata.index_samples(wd, list(CLASSES))]
    for i, c in enumerate(CLASSES):
        want_c = metrics.prdc(real[np.asarray(y_real) == i], syn[np.asarray(y_syn) == i], k=5)
        assert {m: s["per_class"][c][f"{m}_domain"] for m in want_c} == pytest.approx(want_c)
    assert s["fd_dinov2"] is None and s["extractors"]["dinov2"] is None and "fd_dinov2" not in s["features"]
    note = s["fd_dinov2_note"]
    assert "vit_base_patch14_dinov2.lvd142m" in note and "hf download timm/vit_base_patch14_dinov2.lvd142m" in note
    assert "score.dinov2_pretrained_path" in note and "never downloaded" in note
    assert score.summary(s)["precision_domain"] == s["precision_domain"]
    report = (wd / "score" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| domain features (`*_domain`) |"))
    assert f"{s['precision_domain']:.4g}" in row and dom in row
    assert "| FD_DINOv2 | – | not computed" in report and "k = 5" in report
    assert "| precision (domain) | recall (domain) | density (domain) | coverage (domain) |" in report


def _tiny_dinov2(out: Path) -> Path:
    """A random 1-block DINOv2-architecture timm ViT-S/14 saved with save_for_hf (weights + config.json)."""
    import timm
    import torch

    torch.manual_seed(0)
    args = {"depth": 1, "img_size": 56}
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, **args)
    timm.models.save_for_hf(model, out, model_args=args, safe_serialization=True)
    return out


def test_dinov2_extractor_from_a_local_file(tmp_path):
    """score.dinov2_pretrained_path: features = the normed [CLS] token at 224 px, ImageNet normalisation."""
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from medsynth.features import dinov2_extractor

    d = _tiny_dinov2(tmp_path / "dino")

    class Cfg:
        dinov2_model = "vit_small_patch14_dinov2.lvd142m"
        dinov2_pretrained_path = str(d / "model.safetensors")

    ex, note = dinov2_extractor(Cfg, torch.device("cpu"))
    assert note is None and ex.weights == str(d / "model.safetensors") and ex.sha256
    assert "dinov2" in ex.id and "vit_small_patch14_dinov2.lvd142m" in ex.id
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)) for _ in range(2)]
    f = ex(imgs)
    assert f.shape == (2, 384) and f.dtype == np.float64
    # dgm-eval's preprocessing, written out: 224 x 224 bicubic, [0, 1], ImageNet mean / std.
    tf = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ref = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, depth=1, img_size=224).eval()
    ref.load_state_dict(ex.model.state_dict())
    with torch.inference_mode():
        tokens = ref.forward_features(torch.stack([tf(im) for im in imgs]))  # final norm applied
    np.testing.assert_allclose(f, tokens[:, 0].double().numpy(), rtol=1e-5, atol=1e-6)

    Cfg.dinov2_pretrained_path = str(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="score.dinov2_pretrained_path: .*missing.safetensors does not exist"):
        dinov2_extractor(Cfg, torch.device("cpu"))
    Cfg.dinov2_pretrained_path, Cfg.dinov2_model = str(d), "resnet10t"
    with pytest.raises(UserError, match="score.dinov2_model: 'resnet10t' is not a timm DINOv2 model"):
        dinov2_extractor(Cfg, torch.device("cpu"))
    Cfg.dinov2_model = "vit_base_patch14_dinov2.lvd142m"  # the small model's config names another architecture
    with pytest.raises(UserError, match="could not be loaded"):
        dinov2_extractor(Cfg, torch.device("cpu"))
    Cfg.dinov2_model = None
    assert dinov2_extractor(Cfg, torch.device("cpu")) == (None, "FD_DINOv2 not computed: score.dinov2_model is null")


def test_fd_dinov2_from_the_hub_cache_in_score(tmp_path, shared_data, monkeypatch):
    """DINOv2 weights in the local HF cache: fd_dinov2 and *_dinov2 PRDC, named by their extractor."""
    import huggingface_hub.constants

    from medsynth import classify, metrics, score
    from medsynth.recipe import load_recipe
    from medsynth.workspace import sha256_file

    recipe = make_workspace(tmp_path, shared_data, n_real=5, n_synth=4)  # 6 real test, 12 synthetic images
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    snap = _fake_hub_cache(cache, "timm/vit_small_patch14_dinov2.lvd142m", _tiny_dinov2)
    r = load_recipe(str(recipe), ["score.dinov2_model=vit_small_patch14_dinov2.lvd142m", "score.prdc_k=2"])
    classify.run(r, train_on="real")
    s = json.loads(score.run(r).read_text())
    dino = s["extractors"]["dinov2"]
    assert Path(dino["weights"]) == snap / "model.safetensors" and dino["sha256"] == sha256_file(snap / "model.safetensors")
    assert isinstance(s["fd_dinov2"], float) and s["fd_dinov2"] >= 0 and "fd_dinov2_note" not in s
    # Recomputed from the extractor's own features: the stage compares synthetic with real test images.
    from medsynth import synthdata
    from medsynth.data import read_manifest
    from medsynth.features import dinov2_extractor
    from medsynth.images import read_image

    ex, _ = dinov2_extractor(r.score, "cpu")
    wd = tmp_path / "ws"
    real = ex([read_image(x.path) for x in read_manifest(wd, "test")])
    syn = ex([synthdata.read_image(x) for x in synthdata.index_samples(wd, list(CLASSES))])
    assert s["fd_dinov2"] == pytest.approx(metrics.frechet_distance_features(syn, real), rel=1e-6, abs=1e-12)
    assert s["precision_dinov2"] == pytest.approx(metrics.prdc(real, syn, k=2)["precision"])
    assert s["features"]["fd_dinov2"] == dino["id"] and "dinov2" in dino["id"]
    for m in ("precision", "recall", "density", "coverage"):
        assert s["features"][f"{m}_dinov2"] == dino["id"] and s[f"{m}_dinov2"] is not None
        assert s["features"][f"{m}_domain"] == s["extractors"]["domain"]["id"]
    assert score.summary(s)["fd_dinov2"] == s["fd_dinov2"]
    report = (tmp_path / "ws" / "score" / "report.md").read_text()
    assert f"| FD_DINOv2 | {s['fd_dinov2']:.4g} | {dino['id']} |" in report and "| DINOv2 (`*_dinov2`) |" in report

    # Too few images for k: null and a note naming the key, no crash.
    r = load_recipe(str(recipe), ["score.dinov2_model=vit_small_patch14_dinov2.lvd142m", "score.prdc_k=6"])
    s2 = json.loads(score.run(r).read_text())
    assert s2["fd_dinov2"] == pytest.approx(s["fd_dinov2"])
    assert all(s2[f"{m}_{sp}"] is None for m in ("precision", "recall", "density", "coverage") for sp in ("domain", "dinov2"))
    assert "score.prdc_k = 6" in s2["prdc_note"] and "got 6 and 12" in s2["prdc_note"]
    assert s2["prdc_note"] in (tmp_path / "ws" / "score" / "report.md").read_text()
