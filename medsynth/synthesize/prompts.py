"""The prompt of every planned sample: captions of real train images, the class template, or a file.

Every choice is a pure function of (seed, class, index), like the noise, so the prompt of a
sample does not depend on which process generates it or on the other classes.
"""

from __future__ import annotations

import difflib
import json
import random
from pathlib import Path

from .. import console
from ..errors import UserError
from ..prompts import simple_caption
from .plan import Plan


class _Cycler:
    """Draws from a list so that every item is used once before any is reused.

    Sample i of a class takes item perm_e[i % n] of the permutation of 'epoch' e = i // n,
    each permutation seeded by (seed, class, e). Compared with independent draws, small
    caption sets are covered evenly (no caption used 5 times while another is never used).
    """

    def __init__(self, items: list[str], seed: int, label: str, what: str):
        self.items, self.seed, self.label, self.what = items, seed, label, what
        self._perms: dict[int, list[int]] = {}

    def __call__(self, index: int) -> str:
        n = len(self.items)
        epoch, pos = divmod(index, n)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = list(range(n))
            random.Random(f"medsynth-{self.what}:{self.seed}:{self.label}:{epoch}").shuffle(perm)
            self._perms[epoch] = perm
        return self.items[perm[pos]]


def _read_captions(workdir: Path) -> dict[str, list[str]] | None:
    """Captions of the real *train* images per class, or None when captions.jsonl is absent."""
    from ..data import read_manifest

    path = workdir / "captions.jsonl"
    if not path.is_file():
        return None
    train = {r.path: r.label for r in read_manifest(workdir, "train")}
    by_class: dict[str, list[tuple[str, str]]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                img, caption = row["path"], row["caption"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: not a caption record (a JSON object with 'path' and 'caption'); "
                                "re-run `medsynth caption` to rewrite the file") from None
            label = train.get(img)
            if label is None:  # a test image (caption.splits: all) or a stale row: not a train caption
                continue
            if not isinstance(caption, str):
                raise UserError(f"{path}:{lineno}: caption {caption!r} is not text; re-run `medsynth caption`")
            by_class.setdefault(label, []).append((img, caption))
    # Sorted by image path: the prompt of a sample must not depend on the file's line order.
    return {k: [c for _, c in sorted(v)] for k, v in by_class.items()}


def _read_prompt_file(path_text: str, names: list[str], planned: list[str]) -> dict[str, list[str]]:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"synthesize.prompt_file: {path} not found; give a text file with one 'class<TAB>prompt' line per prompt")
    out: dict[str, list[str]] = {}
    problems = []
    text = path.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            problems.append(f"{path}:{lineno}: no TAB between class and prompt in {line[:60]!r}")
            continue
        label, prompt = line.split("\t", 1)
        label, prompt = label.strip(), prompt.strip()
        if label not in names:
            guess = difflib.get_close_matches(label, names, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else f"the classes are: {', '.join(names)}"
            problems.append(f"{path}:{lineno}: unknown class {label!r}; {hint}")
            continue
        if not prompt:
            problems.append(f"{path}:{lineno}: class {label!r} has an empty prompt")
            continue
        out.setdefault(label, []).append(prompt)
    if not out and not problems:
        raise UserError(f"synthesize.prompt_file: {path} holds no prompts; write one 'class<TAB>prompt' line per prompt")
    missing = [n for n in planned if n not in out]
    if missing:
        problems.append(f"{path}: no prompt for class(es) {', '.join(missing)}; add a '<class><TAB><prompt>' line for each")
    if problems:
        raise UserError("synthesize.prompt_file has problems:\n  - " + "\n  - ".join(problems))
    return out


def build_prompts(recipe, plan: Plan, workdir: Path) -> tuple[dict[str, str], dict]:
    """Prompt per sample key, and a description of where the prompts came from (for index.json)."""
    source = recipe.synthesize.prompt_source
    names = [c["name"] for c in plan.classes]
    planned = [n for n in names if plan.counts[n] > 0]
    category = {c["name"]: c.get("category") or c["name"] for c in plan.classes}
    info: dict = {"requested": source}
    pick: dict[str, _Cycler] = {}

    if source == "captions":
        captions = _read_captions(workdir)
        if captions is None:
            console.warn(f"synthesize: {workdir / 'captions.jsonl'} not found, so prompts fall back to the class "
                         "template ('A <modality> image of <category>'); run `medsynth caption` first for the "
                         "paper's protocol, or set synthesize.prompt_source: simple to silence this")
            source = "simple"
        else:
            fallback = [n for n in planned if not captions.get(n)]
            if fallback:
                console.warn(f"synthesize: no captions of train images for class(es) {', '.join(fallback)} in "
                             f"{workdir / 'captions.jsonl'}; those use the class template. Re-run `medsynth caption`.")
            for n in planned:
                items = captions.get(n) or [simple_caption(recipe.modality, category[n])]
                pick[n] = _Cycler(items, recipe.seed, n, "captions")
            info["captions_per_class"] = {n: len(captions.get(n, [])) for n in names}
            info["template_fallback"] = fallback
    if source == "file":
        prompts = _read_prompt_file(recipe.synthesize.prompt_file or "", names, planned)
        for n in planned:
            pick[n] = _Cycler(prompts[n], recipe.seed, n, "prompt-file")
        info["file"] = str(recipe.synthesize.prompt_file)
        info["prompts_per_class"] = {n: len(prompts.get(n, [])) for n in names}
    if source == "simple":
        for n in planned:
            pick[n] = _Cycler([simple_caption(recipe.modality, category[n])], recipe.seed, n, "simple")
    info["used"] = source
    return {s.key: pick[s.label](s.index) for s in plan.samples()}, info
