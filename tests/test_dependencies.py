"""pyproject.toml's dependency ranges: the bounds the code needs, and the installed versions inside them."""

from __future__ import annotations

import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    reqs = [Requirement(d) for d in deps]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def _lower_bound(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", ">")]
    return max(lows) if lows else None


def test_bounds_the_code_relies_on():
    reqs = _requirements()
    # from_pretrained(dtype=...) is transformers 4.56+; older versions ignore it and load T5-XXL in fp32.
    assert _lower_bound(reqs["transformers"]) >= Version("4.56")
    # A hub T5 tokenizer folder with only spiece.model needs protobuf to become a fast tokenizer.
    assert "protobuf" in reqs and _lower_bound(reqs["protobuf"]) is not None
    assert _lower_bound(reqs["timm"]) >= Version("1.0.16")  # `local-dir:` model names
    assert _lower_bound(reqs["diffusers"]) >= Version("0.33")  # _gradient_checkpointing_func (TAEF2)
    assert _lower_bound(reqs["pillow"]) >= Version("10.1")  # ImageFont.load_default(size=)
    assert "huggingface-hub" in reqs  # imported directly, not only through transformers
    assert all(_lower_bound(r) is not None for r in reqs.values()), "every dependency needs a lower bound"


@pytest.mark.parametrize("extra", [None, "test"])
def test_installed_versions_satisfy_the_declared_ranges(extra):
    bad, missing = [], []
    for name, req in _requirements(extra).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if not req.specifier.contains(installed, prereleases=True):
            bad.append(f"{name} {installed} is outside {req.specifier}")
    assert not bad, bad
    assert not missing, f"declared but not installed: {missing}"
