"""docs/paper.md promises one command per row of the paper's Tables 2-4: each must still parse.

Every `medsynth run|classify RECIPE --set k=v ...` line in the page's code blocks is loaded with
the same recipe machinery the CLI uses (unknown or mistyped keys are errors) and its family must
exist in this version; nothing is run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from medsynth.models import backbone
from medsynth.recipe import load_recipe

PAGE = Path(__file__).resolve().parents[1] / "docs" / "paper.md"


def _commands() -> list[list[str]]:
    text = PAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] in (["medsynth", "run"], ["medsynth", "classify"]):
                out.append(words)
    return out


def test_every_paper_command_is_a_valid_recipe_of_an_existing_family():
    cmds = _commands()
    assert len(cmds) >= 30, f"docs/paper.md lists {len(cmds)} commands; Tables 2-4 have more rows"
    families = set()
    for words in cmds:
        recipe_name = words[2]
        sets = [w2 for w1, w2 in zip(words, words[1:]) if w1 == "--set"]
        r = load_recipe(recipe_name, sets)
        fam = r.model.family or "pixart"
        backbone.get(fam)  # raises "not available in this version" for a family this version lacks
        families.add(fam)
    # The comparison covers every system of the paper.
    assert families == {"pixart", "sd", "sdxl", "hunyuan-dit", "dit"}
