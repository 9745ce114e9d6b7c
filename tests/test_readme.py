"""The README's first two commands are the ones CI runs (issue 2)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M)]


def test_first_two_bash_blocks_are_install_demo_and_tests():
    blocks = _bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    install, tests = blocks[0], blocks[1]
    assert len(install.splitlines()) == 1 and len(tests.splitlines()) == 1, "each is one copy-pasteable line"
    assert "pip install -e ." in install and install.endswith("medsynth demo")
    assert "pip install -e '.[test]'" in tests and re.search(r"pytest\b", tests)
    # The README's fences come first: no other fenced block before them.
    first_fence = (ROOT / "README.md").read_text(encoding="utf-8").index("```")
    assert (ROOT / "README.md").read_text(encoding="utf-8")[first_fence:].startswith("```bash\n" + install)


def test_ci_runs_the_readme_lines_verbatim():
    blocks = _bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for line in blocks[:2]:
        assert line in ci, f".ci/run lacks the README line: {line}"
    # In that order: install + demo first, then the tests.
    assert ci.index(blocks[0]) < ci.index(blocks[1])
    assert ci[0].startswith("#!") and any(ln.startswith("set -e") for ln in ci)
