"""Recipes: built-ins, validation messages, --set parsing, RECIPE resolution (issue 2)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from medsynth import docgen
from medsynth.errors import RecipeError, UserError
from medsynth.recipe import builtin_names, builtin_path, build_recipe, iter_schema, load_recipe, parse_set

ROOT = Path(__file__).resolve().parents[1]

SKIN_CLASSES = ["common-nevus", "melanoma", "seborrheic-keratosis", "carcinoma", "lentigo-solaris",
                "dermatofibroma", "vascular-lesion", "actinic-keratosis"]
KVASIR_CLASSES = ["dyed-lifted-polyps", "dyed-resection-margins", "esophagitis", "normal-cecum",
                  "normal-pylorus", "normal-z-line", "polyps", "ulcerative-colitis"]

# DESIGN.md, "Key names that are part of the contract", with a valid value for each.
CONTRACT = {
    "workdir": ("runs/elsewhere", "runs/elsewhere"),
    "seed": ("7", 7),
    "data.root": ("/data/images", "/data/images"),
    "data.test_fraction": ("0.25", 0.25),
    "classes": ("[melanoma, nevus]", [{"name": "melanoma", "category": None, "folder": None},
                                     {"name": "nevus", "category": None, "folder": None}]),
    "modality": ("endoscopic", "endoscopic"),
    "model.base": ("/models/pixart", "/models/pixart"),
    "caption.source": ("simple", "simple"),
    "caption.model": ("org/some-vlm", "org/some-vlm"),
    "finetune.max_steps": ("123", 123),
    "finetune.hldf.enabled": ("false", False),
    "finetune.hldf.every_n_steps": ("250", 250),
    "finetune.hldf.steps": ("10", 10),
    "finetune.hldf.weight": ("0.5", 0.5),
    "synthesize.per_class": ("11", 11),
    "synthesize.batch_size": ("3", 3),
    "classify.model": ("resnet50", "resnet50"),
    "classify.epochs": ("2", 2),
}


def _problems(raw=None, overrides=(), source="r.yaml") -> list[str]:
    with pytest.raises(RecipeError) as e:
        build_recipe(raw if raw is not None else {}, source, list(overrides))
    return e.value.problems


# ----------------------------------------------------------------------------- built-ins


def test_builtins_validate_through_the_cli(cli):
    r = cli("recipes", "validate", "skin", "kvasir", "demo")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["skin:", "ok", "kvasir:", "ok", "demo:", "ok"]
    assert set(builtin_names()) >= {"skin", "kvasir", "demo"}


@pytest.mark.parametrize("name", ["skin", "kvasir", "demo"])
def test_builtin_starts_with_the_command_that_runs_it(name):
    first = builtin_path(name).read_text().splitlines()[0]
    assert first.startswith("# medsynth ") and name in first, first


@pytest.mark.parametrize("name,classes,every,epochs", [
    ("skin", SKIN_CLASSES, 1500, 10),
    ("kvasir", KVASIR_CLASSES, 500, 15),
])
def test_paper_settings(name, classes, every, epochs):
    r = load_recipe(name)
    assert [c.name for c in r.classes] == classes
    want = [c.replace("-", " ") for c in classes]
    want = [w.replace("normal z line", "normal z-line") for w in want]  # the class is named "Z-line"
    assert [c.resolved_category() for c in r.classes] == want
    f = r.finetune
    assert (f.hldf.enabled, f.hldf.every_n_steps, f.epochs, f.max_steps) == (True, every, epochs, None)
    assert r.model.base == "PixArt-alpha/PixArt-XL-2-512x512"
    assert r.model.resolution == 512
    assert (f.lora.rank, f.lora.alpha, f.learning_rate, f.lr_scheduler, f.batch_size) == (8, 8.0, 1e-4, "constant", 1)
    assert f.mixed_precision == "bf16" and f.grad_clip == 1.0 and f.adapter == "lora"
    assert f.lora.text_encoder is True
    assert f.hldf.steps == 20 and f.hldf.guidance == 4.5 and f.hldf.weight is None  # null = 1/M
    assert f.hldf.start == "noise"
    assert r.synthesize.guidance == 4.5 and r.synthesize.steps == 20
    assert r.model.max_text_tokens == 120
    assert r.caption.source == "vlm"
    assert (r.classify.model, r.classify.epochs, r.classify.learning_rate) == ("vit_base_patch16_224", 5, 2e-5)


def test_demo_lists_no_classes_and_is_tiny():
    r = load_recipe("demo")
    assert r.classes is None
    assert r.data.root is None
    assert r.model.base == "tiny" and r.model.device == "cpu"


# ----------------------------------------------------------------------------- validation


def test_unknown_key_names_file_and_key_with_suggestion(tmp_path, cli):
    p = tmp_path / "mine.yaml"
    p.write_text("name: x\nfinetune:\n  learning_rat: 0.001\n")
    r = cli("recipes", "validate", str(p))
    assert r.returncode == 1
    assert str(p) in r.stderr and "finetune.learning_rat" in r.stderr
    assert "did you mean 'finetune.learning_rate'" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_problem_reported_at_once(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(textwrap.dedent("""\
        sed: 3
        data: {test_fraction: 1.5}
        finetune:
          epochs: "10"
          max_steps: true
          lora: {rank: 0}
          optimizer: adamw9
        synthesize: {per_class: -3}
        classify: {learning_rate: yes}
    """))
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["finetune.hldf.stepz=3"])
    probs = e.value.problems
    text = str(e.value)
    assert len(probs) == 9, probs
    assert text.startswith(f"{p}: 9 problems")
    expect = [
        ("sed", "did you mean 'seed'"),
        ("data.test_fraction", "1.5 is out of range; it must be at most 0.5"),
        ("finetune.epochs", "'10' is not an integer"),
        ("finetune.max_steps", "true is not an integer"),
        ("finetune.lora.rank", "0 is out of range; it must be at least 1"),
        ("finetune.optimizer", "'adamw9' is not one of auto, adamw, adamw8bit (did you mean 'adamw'?)"),
        ("synthesize.per_class", "-3 is out of range; it must be at least 0"),
        ("classify.learning_rate", "true is not a number"),
        ("--set finetune.hldf.stepz", "did you mean 'finetune.hldf.steps'"),
    ]
    for key, msg in expect:
        assert any(key in pr and msg in pr for pr in probs), (key, msg, probs)
    # Problems in the file name the file; the --set problem names the --set.
    assert all(pr.startswith(f"{p}: ") for pr in probs if "--set" not in pr)


@pytest.mark.parametrize("overrides,needle", [
    (["seed=1.5"], "--set seed: 1.5 is not an integer"),
    (["seed=true"], "--set seed: true is not an integer"),
    (["finetune.lora.rank=0"], "--set finetune.lora.rank: 0 is out of range"),
    (["data.test_fraction=1.5"], "--set data.test_fraction: 1.5 is out of range"),
    (["data.test_fraction=0"], "must be greater than 0.0"),
    (["data.test_fraction=abc"], "'abc' is not a number"),
    (["synthesize.per_class=-1"], "-1 is out of range"),
    (["synthesize.per_class=null", "synthesize.counts={a: -2}"], "--set synthesize.counts.a: -2 is negative"),
    (["finetune.hldf.every_n_steps=0"], "at least 1"),
    (["finetune.mixed_precision=fp8"], "'fp8' is not one of bf16, fp16, no"),
    (["caption.source=vml"], "did you mean 'vlm'"),
    (["finetune.hldf.enabled=1"], "1 is not a true/false"),
    (["model.base=null"], "--set model.base: must not be null"),
    (["classes=[bad name]"], "may only use letters, digits"),
    (["classes=[a, a]"], "listed twice"),
    (["synthesize.counts={a: 1}"], "conflicts with synthesize.per_class"),
    (["finetune.hldf.grad_last_k=50"], "exceeds finetune.hldf.steps"),
    (["data.manifest=m.csv", "data.root=r"], "both set"),
    (["finetune.hldf=3"], "expected a mapping"),
])
def test_bad_values_are_rejected(overrides, needle):
    probs = _problems(load_recipe("demo").to_dict(), overrides)
    assert any(needle in p for p in probs), probs


def test_set_parsing_values():
    pairs = dict(parse_set(["a=[x, y]", "b={m: 1, n: 2.5}", "c=1e-4", "d=null", "e=", "f=3", "g=a=b", "h=1.0e-4"]))
    assert pairs["a"] == ["x", "y"]
    assert pairs["b"] == {"m": 1, "n": 2.5}
    assert pairs["d"] is None and pairs["e"] == "" and pairs["f"] == 3 and pairs["g"] == "a=b"
    r = load_recipe("demo", ["finetune.learning_rate=1e-4", "classify.learning_rate=2.5E-5",
                             "finetune.hldf.weight=null", "finetune.max_steps=null",
                             "synthesize.per_class=null", "synthesize.counts={toy-nevus: 3, toy-melanoma: 4}",
                             "data.extensions=[.png, .jpg]"])
    assert r.finetune.learning_rate == 1e-4 and isinstance(r.finetune.learning_rate, float)
    assert r.classify.learning_rate == 2.5e-5
    assert r.finetune.hldf.weight is None and r.finetune.max_steps is None
    assert r.synthesize.counts == {"toy-nevus": 3, "toy-melanoma": 4}
    assert r.data.extensions == [".png", ".jpg"]
    assert r.overrides[0] == "finetune.learning_rate=1e-4"
    # An integer field does not take the YAML-1.1 string '1e3'.
    assert any("'1e3' is not an integer" in p for p in _problems({}, ["seed=1e3"]))
    with pytest.raises(UserError, match="expected key=value"):
        parse_set(["finetune.max_steps"])
    with pytest.raises(UserError, match="not valid YAML"):
        parse_set(["classes=[a, b"])


def test_every_contract_key_is_settable_through_the_cli(cli):
    args = []
    for key, (text, _) in CONTRACT.items():
        args += ["--set", f"{key}={text}"]
    r = cli("recipes", "show", "demo", "--json", *args)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for key, (_, want) in CONTRACT.items():
        node = got
        for part in key.split("."):
            node = node[part]
        assert node == want, key
    assert set(CONTRACT) == set(docgen.CONTRACT_KEYS)
    schema_keys = {k for k, *_ in iter_schema()}
    assert set(CONTRACT) <= schema_keys


def test_global_set_before_the_command(cli):
    r = cli("--set", "seed=9", "recipes", "show", "demo", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["seed"] == 9


def test_yaml_errors_and_missing_files(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\ndata: [1, 2\n")
    with pytest.raises(UserError, match=r"broken.yaml: not valid YAML at line \d+"):
        load_recipe(p)
    with pytest.raises(UserError, match="Did you mean 'skin'"):
        load_recipe("skn")
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(p)


def test_resolved_recipe_roundtrips(tmp_path):
    """`recipes show --resolved` output is itself a valid recipe with the same values."""
    r = load_recipe("skin", ["seed=3"])
    text = yaml.safe_dump(r.to_dict(), sort_keys=False)
    p = tmp_path / "resolved.yaml"
    p.write_text(text)
    assert load_recipe(p).to_dict() == r.to_dict()


# ----------------------------------------------------------------------------- RECIPE resolution


def _recipe_file(path: Path, workdir: Path, data_root: Path) -> Path:
    path.write_text(f"name: {path.stem}\nworkdir: {workdir}\ndata: {{root: {data_root}}}\nmodel: {{base: tiny}}\n")
    return path


@pytest.fixture
def toy_root(tmp_path_factory):
    from medsynth import demo_data

    return demo_data.generate(tmp_path_factory.mktemp("toyres") / "data", n_per_class=3, size=32)


def _workdir_of(result) -> str:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["workdir"]


def test_recipe_resolution_order(tmp_path, cli, toy_root):
    here = tmp_path / "project"
    here.mkdir()
    env_recipe = _recipe_file(tmp_path / "from-env.yaml", tmp_path / "ws-env", toy_root)
    _recipe_file(here / "medsynth.yaml", tmp_path / "ws-local", toy_root)

    # 1. $MEDSYNTH_RECIPE wins over ./medsynth.yaml.
    r = cli("prepare", "--json", cwd=here, env={"MEDSYNTH_RECIPE": str(env_recipe)})
    assert _workdir_of(r) == str(tmp_path / "ws-env")
    assert "from $MEDSYNTH_RECIPE" in r.stderr

    # 2. ./medsynth.yaml wins over the remembered recipe.
    r = cli("prepare", "--json", cwd=here)
    assert _workdir_of(r) == str(tmp_path / "ws-local")
    assert "./medsynth.yaml" in r.stderr

    # 3. The last recipe used from this directory, with its --set overrides.
    (here / "medsynth.yaml").unlink()
    r = cli("prepare", "demo", "--set", f"data.root={toy_root}", "--set", f"workdir={tmp_path / 'ws-last'}",
            "--json", cwd=here)
    assert _workdir_of(r) == str(tmp_path / "ws-last")
    r = cli("prepare", "--json", "--set", "seed=5", cwd=here)
    assert _workdir_of(r) == str(tmp_path / "ws-last")
    assert "last used in this directory" in r.stderr and f"data.root={toy_root}" in r.stderr
    prov = json.loads((tmp_path / "ws-last" / "prepare" / "provenance.json").read_text())
    assert prov["seed"] == 5 and prov["recipe"].endswith("demo.yaml")

    # The memory is per directory: elsewhere there is nothing to fall back on.
    other = tmp_path / "other"
    other.mkdir()
    r = cli("prepare", cwd=other)
    assert r.returncode == 1
    assert "no recipe given" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- docs/recipes.md


def test_recipe_reference_is_generated_from_the_schema():
    text = docgen.recipe_reference_markdown()
    doc = ROOT / "docs" / "recipes.md"
    assert doc.is_file(), "docs/recipes.md missing: python -m medsynth.docgen > docs/recipes.md"
    assert doc.read_text(encoding="utf-8") == text, \
        "docs/recipes.md is out of date: run `python -m medsynth.docgen > docs/recipes.md`"
    assert "python -m medsynth.docgen > docs/recipes.md" in text
    for key, _tname, _default, help_, _extra in iter_schema():
        assert f"`{key}`" in text, key
    assert "`finetune.hldf.every_n_steps` | integer | `500` | >= 1 |" in text
