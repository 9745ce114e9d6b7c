"""What to generate: counts per class, the global sample order, shards and per-sample seeds.

Everything here is a pure function of the recipe, the class list of the prepared workspace
and the command-line overrides, so every process (a resumed run, each `--worker I/N`, each
`accelerate launch` rank) computes the very same plan without talking to the others.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

DEFAULT_PER_CLASS = 100


def sample_seed(seed: int, label: str, index: int) -> int:
    """Seed of one sample, from (recipe seed, class name, index within the class).

    A cryptographic hash rather than Python's hash() (salted per process) or seed+index
    arithmetic (neighbouring seeds of different classes would collide), so that the noise of a
    sample never depends on batch size, process count or which other classes are planned.
    """
    digest = hashlib.sha256(f"medsynth-synth:{seed}:{label}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def sample_key(label: str, index: int) -> str:
    # No dots: webdataset splits member names at the first dot into key and extension.
    return f"{label}-{index:06d}"


@dataclass(frozen=True)
class Sample:
    order: int  # position in the global sample order (decides the shard)
    cls: int  # integer label = class index in classes.json
    label: str  # class name
    index: int  # index of the sample within its class
    key: str
    seed: int


@dataclass
class Plan:
    rule: str  # per_class | counts | match_real | topup | default
    value: Any  # the rule's argument (N, or the counts mapping)
    classes: list[dict]  # index, name, category, n_train (classes.json order)
    counts: dict[str, int]  # planned images per class, in class order
    shard_size: int
    seed: int
    _samples: list[Sample] | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def samples(self) -> list[Sample]:
        """The global order: classes interleaved round-robin (0,1,..,C-1,0,1,..).

        Interleaving (rather than class after class) gives every shard a mix of classes,
        so a classifier reading a few shards with a small shuffle buffer still sees every class.
        """
        if self._samples is None:
            out: list[Sample] = []
            longest = max(self.counts.values(), default=0)
            for i in range(longest):
                for c in self.classes:
                    name = c["name"]
                    if i < self.counts[name]:
                        out.append(Sample(len(out), c["index"], name, i, sample_key(name, i),
                                          sample_seed(self.seed, name, i)))
            self._samples = out
        return self._samples

    @property
    def n_shards(self) -> int:
        return (self.total + self.shard_size - 1) // self.shard_size

    def shard(self, s: int) -> list[Sample]:
        return self.samples()[s * self.shard_size:(s + 1) * self.shard_size]

    def to_dict(self) -> dict:
        return {"rule": self.rule, "value": self.value, "counts": dict(self.counts), "total": self.total,
                "shard_size": self.shard_size, "n_shards": self.n_shards}

    def describe(self) -> str:
        rule = {"default": f"default {DEFAULT_PER_CLASS} per class", "per_class": f"per_class {self.value}",
                "counts": "counts", "match_real": f"match_real total {self.value}",
                "topup": f"topup to {self.value}"}[self.rule]
        width = max((len(n) for n in self.counts), default=5)
        lines = [f"synthesize plan ({rule}): {self.total} images, {len(self.counts)} classes, "
                 f"{self.n_shards} shard(s) of up to {self.shard_size}"]
        for c in self.classes:
            extra = f"  (real train: {c.get('n_train', '?')})" if self.rule in ("match_real", "topup") else ""
            lines.append(f"  {c['name']:<{width}s} {self.counts[c['name']]:7d}{extra}")
        return "\n".join(lines)


def _largest_remainder(total: int, weights: list[int]) -> list[int]:
    """Integer split of ``total`` proportional to ``weights`` (ties go to the earlier class)."""
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights]
    base = [int(x) for x in exact]
    left = total - sum(base)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return base


def make_plan(recipe, classes: list[dict], per_class: int | None = None) -> Plan:
    """Counts per class from ``--per-class`` (wins) or the recipe's balance rule.

    ``classes`` is read_classes(workdir): dicts with index, name, category, n_train.
    """
    s = recipe.synthesize
    names = [c["name"] for c in classes]
    if per_class is not None:
        if per_class < 0:
            raise UserError(f"--per-class {per_class}: a count must be 0 or more")
        rule, value, counts = "per_class", per_class, {n: per_class for n in names}
    elif s.per_class is not None:
        rule, value, counts = "per_class", s.per_class, {n: s.per_class for n in names}
    elif s.counts is not None:
        problems = []
        for k, v in s.counts.items():
            if k not in names:
                guess = difflib.get_close_matches(k, names, n=1)
                hint = f"did you mean '{guess[0]}'?" if guess else f"the classes are: {', '.join(names)}"
                problems.append(f"synthesize.counts.{k}: unknown class; {hint}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"synthesize.counts.{k}: {v!r} is not a count; give an integer >= 0")
        if problems:
            raise UserError(f"{recipe.source}: " + "\n  ".join(problems))
        # A class the mapping does not name gets no images: counts is an explicit list.
        rule, value, counts = "counts", dict(s.counts), {n: int(s.counts.get(n, 0)) for n in names}
    elif s.match_real is not None:
        n_train = [int(c.get("n_train", 0)) for c in classes]
        if sum(n_train) == 0:
            raise UserError("synthesize.match_real: the real train split is empty; run `medsynth prepare` on a data set with images")
        rule, value = "match_real", s.match_real
        counts = dict(zip(names, _largest_remainder(s.match_real, n_train)))
    elif s.topup is not None:
        rule, value = "topup", s.topup
        counts = {c["name"]: max(0, s.topup - int(c.get("n_train", 0))) for c in classes}
    else:
        rule, value, counts = "default", DEFAULT_PER_CLASS, {n: DEFAULT_PER_CLASS for n in names}
    return Plan(rule=rule, value=value, classes=[dict(c) for c in classes], counts=counts,
                shard_size=s.shard_size, seed=recipe.seed)


def parse_worker(spec: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i_text, n_text = spec.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise UserError(f"--worker {spec!r}: expected I/N, e.g. --worker 0/4 for the first of 4 jobs "
                        "(a Slurm array can pass --worker $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--worker {spec!r}: I must be in 0..N-1 and N at least 1")
    return i, n


def shards_of(worker: int, n_workers: int, n_shards: int) -> list[int]:
    """Shards one worker owns: every n-th shard, so workers share the load evenly."""
    return [s for s in range(n_shards) if s % n_workers == worker]
