"""The synthesize stage: a class-balanced, labelled synthetic data set in WebDataset shards.

``run(recipe)`` plans the images per class, picks a prompt for every sample, generates them in
batches with the (fine-tuned) base model's stock diffusers pipeline (through its backbone,
``medsynth.models.backbone``) and writes ``<workdir>/synthetic/``
(docs/output-format.md). Properties the rest of the project relies on:

- Determinism: sample ``<class>-<index>`` gets its prompt and initial noise from
  (recipe seed, class, index) alone; batches are fixed chunks of fixed shards, so the same
  settings give byte-identical shards whatever the number of processes.
- Resume: a shard is written under a temporary name and renamed when complete; a rerun skips
  complete shards and regenerates the rest, so it ends with exactly the plan.
- Scale: shards are dealt round-robin to ``--worker I/N`` jobs and ``accelerate launch`` /
  ``torchrun`` ranks (both at once multiply); whoever completes the last shard writes index.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import __version__, console
from ..errors import UserError
from ..workspace import atomic_write_json, ensure_dir, sha256_file, sha256_json, write_provenance
from .plan import DEFAULT_PER_CLASS, Plan, make_plan, parse_worker, sample_key, shards_of  # noqa: F401
from .prompts import build_prompts
from . import writer as W
from .card import write_card

FORMATS = ("webdataset", "imagefolder")
SCHEDULER = "DPMSolverMultistepScheduler(dpmsolver++)"

# Statistics of the last run() in this process (images generated, seconds); the CLI adds them to --json.
last_stats: dict = {}


def default_out(recipe) -> Path:
    return recipe.workdir_path / "synthetic"


def _adapter_dir(recipe, lora, base_only: bool) -> Path | None:
    """Which fine-tuned weights to apply: --lora DIR, the finetune stage's output, or none (--base-only)."""
    if base_only and lora:
        raise UserError("--lora and --base-only exclude each other: --lora applies fine-tuned adapters, "
                        "--base-only samples the base model without any; give one")
    if base_only:
        return None
    if lora:
        d = Path(lora).expanduser()
        if not d.is_dir():
            raise UserError(f"--lora {d}: not a directory; give a finetune output directory such as "
                            f"{recipe.workdir_path / 'finetune' / 'final'} (with transformer/ and adapter.json)")
        return d
    try:
        from ..finetune.adapters import final_dir
        d = Path(final_dir(recipe))
    except ImportError:
        d = recipe.workdir_path / "finetune" / "final"
    if not d.is_dir():
        raise UserError(f"no fine-tuned model at {d}: run `medsynth finetune` with this recipe first, "
                        "pass --lora DIR to use adapters from another directory, or --base-only to sample "
                        "the base model on purpose")
    return d


def _same_base(trained: str, recipe) -> tuple[bool, str]:
    """(does ``trained``, the base in adapter.json, name the recipe's model.base?, what the recipe's base resolves to).

    adapter.json records the resolved base (``models.loading.resolve_base``): a Hub id as given,
    a local directory as an absolute path, ``tiny`` as its directory in the workspace. So a local
    directory given through another path (relative, ``~``, a symlink) is the same base.
    """
    from ..models.loading import _is_local

    want = (recipe.model.base or "").strip()
    if trained == want:
        return True, want
    if want == "tiny":
        from ..models.backbone import for_recipe

        mine = for_recipe(recipe).tiny_dir(recipe).resolve()
        t = Path(trained)
        # The directory name is the hash of everything the tiny base is built from, so it
        # identifies the base even when the workspace was moved or reached through another path.
        return (t.name == mine.name and t.parent.name == "tiny-base"), str(mine)
    if _is_local(want):
        mine = Path(want).expanduser().resolve()
        t = Path(trained).expanduser()
        if not _is_local(trained):
            return False, str(mine)
        if mine.exists() and t.exists():
            return os.path.samefile(mine, t), str(mine)
        return t.resolve() == mine, str(mine)
    return False, want


def check_adapter_matches(recipe, adapter: Path) -> None:
    """Refuse adapters trained on another base model or at another resolution than the recipe's.

    Applied to another base, LoRA deltas (or a full DiT) produce noise or fail to load halfway;
    at another resolution the DiT's position embeddings and what it learned do not match.
    """
    from ..finetune.adapters import read_adapter_info

    root = adapter / "final" if (adapter / "final").is_dir() else adapter
    path = root / "adapter.json"
    info = read_adapter_info(root)
    problems = []
    trained = info.get("base")
    if trained:
        same, resolved = _same_base(str(trained), recipe)
        if not same:
            want = recipe.model.base
            where = f" (which resolves to {resolved})" if resolved != want else ""
            if want == "tiny" and Path(str(trained)).parent.name == "tiny-base":
                fix = ("'tiny' is built from this workspace's train images and the model.tiny, model.resolution and "
                       "seed settings, and one of them changed since finetuning. Rerun `medsynth finetune` with this "
                       "recipe, or set those keys back to the values the adapters were trained with "
                       f"({root.parent / 'config.yaml'} has them)")
            else:
                fix = (f"Rerun `medsynth finetune` with this recipe, or set model.base back to the base the adapters "
                       f"were trained on (--set model.base={trained})")
            problems.append(f"the adapters were trained on model.base {trained!r}, but the recipe's model.base is "
                            f"{want!r}{where}. {fix}")
    res = info.get("resolution")
    if res is not None and int(res) != recipe.model.resolution:
        problems.append(f"the adapters were trained at model.resolution {res}, but the recipe asks for "
                        f"{recipe.model.resolution}. Rerun `medsynth finetune` with this recipe, or set "
                        f"model.resolution back (--set model.resolution={res})")
    if problems:
        raise UserError(f"{path}: " + "; and ".join(problems) + ".")


def load_model(recipe, adapter: Path | None, device, dtype):
    """The base components on ``device`` in ``dtype`` with the fine-tuned weights of ``adapter`` (None: base only).

    A LoRA is merged in float32 into the base weights as the base's files store them, read one
    layer at a time (``apply_finetuned(..., base=...)``), and each sum is cast once to the weight's
    loaded dtype: merged into weights already rounded to bf16, an update below half a weight's bf16
    spacing would be rounded away and larger ones rounded twice. Every weight keeps the dtype
    ``from_pretrained`` gave it (transformers keeps T5's ``wo`` in float32 under fp16). No part is
    loaded a second time in float32 (that was ~19 GB of CPU memory for T5-XXL).
    """
    from ..models.loading import load_components

    comps = load_components(recipe, device=device, dtype=dtype)
    if adapter is None:
        return comps
    from ..finetune.adapters import apply_finetuned

    return apply_finetuned(comps, adapter, base=comps.base, revision=recipe.model.revision)


def _process_split(worker: str | None, device_spec: str):
    """(global rank, world size, accelerate state or None): --worker I/N combined with launcher ranks.

    Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1) accelerate's PartialState gives this
    process's rank; on a machine without CUDA it must be told it is a multi-CPU run (cpu=True),
    or it reports a single process.
    """
    wi, wn = parse_worker(worker)
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        from ..models.loading import resolve_device

        state = PartialState(cpu=resolve_device(device_spec).type != "cuda")
    p, n = (state.process_index, state.num_processes) if state is not None else (0, 1)
    return wi * n + p, wn * n, state


def _settings(recipe, plan: Plan, fmt: str, adapter_hash: str | None, prompts: dict[str, str],
              prompts_info: dict, judge: dict | None = None) -> dict:
    """Everything the images and records depend on (not batch size or device: they must not matter)."""
    s, m = recipe.synthesize, recipe.model
    # Only present with curation on, so enabling this feature left the fingerprints of existing syntheses unchanged.
    curate = {} if judge is None else {"curate": {"oversample": s.curate.oversample, "min_score": s.curate.min_score,
                                                  "min_distance": s.curate.min_distance, "judge": judge["path"],
                                                  "judge_sha256": judge["sha256"]}}
    return {**curate,
        "format": fmt, "image_format": s.image_format,
        "jpg_quality": s.jpg_quality if s.image_format == "jpg" else None,
        "shard_size": s.shard_size, "resolution": m.resolution, "steps": s.steps, "guidance": s.guidance,
        "negative_prompt": s.negative_prompt, "scheduler": SCHEDULER, "seed": recipe.seed,
        "base_model": m.base, "revision": m.revision, "adapter_hash": adapter_hash, "dtype": m.dtype,
        "max_text_tokens": m.max_text_tokens,
        "tiny": recipe.to_dict()["model"]["tiny"] if m.base == "tiny" else None,
        "classes": [[c["index"], c["name"]] for c in plan.classes], "plan": plan.to_dict(),
        "prompt_source": prompts_info.get("used"),
        "prompts_sha256": sha256_json([[k, prompts[k]] for k in sorted(prompts)]),
    }


def run(recipe, per_class: int | None = None, out: str | os.PathLike | None = None, lora: str | os.PathLike | None = None,
        base_only: bool = False, fmt: str | None = None, worker: str | None = None,
        batch_size: int | None = None) -> Path:
    """Generate this process's share of the plan into ``out``; returns the output directory.

    ``batch_size`` overrides synthesize.batch_size (images do not depend on it; tests use it).
    """
    from ..workspace import require  # a workdir that is not a workspace is refused before any write
    require(recipe)
    from ..data import read_classes

    t0 = time.time()
    last_stats.clear()
    workdir = recipe.workdir_path
    classes = read_classes(workdir)
    fmt = fmt or recipe.synthesize.format
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    ext = recipe.synthesize.image_format
    bs = batch_size or recipe.synthesize.batch_size
    if bs < 1:
        raise UserError(f"batch size {bs}: must be at least 1")
    rank, world, state = _process_split(worker, recipe.model.device)
    plan = make_plan(recipe, classes, per_class)
    if rank == 0:
        console.info(plan.describe())
    out = Path(out).expanduser() if out else default_out(recipe)

    adapter = _adapter_dir(recipe, lora, base_only)
    if adapter is not None:
        check_adapter_matches(recipe, adapter)
    # Fail on missing base weights before touching the output directory: a typo in
    # model.base must never cost the user an existing synthesis.
    from ..models.loading import check_base

    check_base(recipe)
    adapter_hash = None
    if adapter is not None:
        from ..finetune.adapters import adapter_hash as _adapter_hash

        adapter_hash = _adapter_hash(adapter)
    judge = None
    if recipe.synthesize.curate.enabled:
        if world > 1:
            raise UserError("synthesize.curate.enabled: curation picks the best candidates of a whole class, so it runs "
                            "in one process; drop --worker and the launcher (accelerate/torchrun), or set "
                            "synthesize.curate.enabled=false")
        from .curate import ensure_judge

        judge = ensure_judge(recipe)
    prompts, prompts_info = build_prompts(recipe, plan, workdir)
    settings = _settings(recipe, plan, fmt, adapter_hash, prompts, prompts_info, judge)
    fingerprint = sha256_json(settings)

    # Output directory: new, ours with the same settings (resume), or ours with other settings.
    # Under a launcher one process prepares it while the others wait, so no rank deletes what
    # another has just written.
    status = W.check_out_dir(out, fingerprint)  # every rank: a refused directory fails everywhere
    if state is None or state.is_main_process:
        _prepare_out(out, settings, fingerprint, plan, status)
    if state is not None:
        state.wait_for_everyone()
        if not state.is_main_process and W.check_out_dir(out, fingerprint) != "same":
            raise UserError(f"{out}: another process changed plan.json while this rank started; run the command again")

    mine = shards_of(rank, world, plan.n_shards)
    if world > 1:
        console.info(f"synthesize: worker {rank}/{world} owns {len(mine)} of {plan.n_shards} shard(s)")
    names = [W.shard_name(s) for s in mine]
    if fmt == "webdataset":
        W.remove_stale_temps(out, names)
        todo = [s for s in mine if not W.shard_complete(out, s, plan.shard(s), ext)]
    else:
        W.remove_stale_image_temps(out, [x for s in mine for x in plan.shard(s)])
        todo = [s for s in mine if not W.chunk_complete_imagefolder(out, plan.shard(s), ext)]
    done_before = len(mine) - len(todo)
    if done_before:
        console.info(f"synthesize: {done_before} shard(s) already complete in {out}; {len(todo)} to generate")

    n_images, gen_seconds = 0, 0.0
    curation = None
    if judge is not None:
        if todo or not _index_done(out, fingerprint):
            n_images, gen_seconds, curation = _curate(recipe, plan, out, todo, fmt, ext, bs, adapter, adapter_hash,
                                                      fingerprint, judge)
    elif todo:
        n_images, gen_seconds = _generate(recipe, plan, out, todo, prompts, fmt, ext, bs, adapter,
                                          adapter_hash, fingerprint, state)
    last_stats.update({"generated": n_images, "seconds": round(gen_seconds, 3),
                       "images_per_s": round(n_images / gen_seconds, 4) if gen_seconds > 0 else None,
                       "worker": f"{rank}/{world}", "shards_written": len(todo), "shards_skipped": done_before})

    if _all_complete(out, plan, fmt, ext):
        _finalize(recipe, out, plan, fmt, ext, settings, prompts_info, fingerprint, adapter, curation)
        console.info(f"synthesize: {plan.total} images in {out} ({time.time() - t0:.1f} s)")
    else:
        missing = sum(1 for s in range(plan.n_shards) if not (out / W.shard_name(s)).is_file()) \
            if fmt == "webdataset" else None
        console.info(f"synthesize: worker {rank}/{world} finished its shards; index.json is written when all "
                     f"shards exist{f' ({missing} missing)' if missing is not None else ''}: by the last worker "
                     "to finish, or by running `medsynth synthesize` again without --worker")
    return out


def _prepare_out(out: Path, settings: dict, fingerprint: str, plan: Plan, status: str) -> None:
    if status == "other":
        try:
            old = json.loads((out / "plan.json").read_text())
        except (OSError, ValueError):
            old = {}
        changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                         if settings.get(k) != old.get("settings", {}).get(k))
        n = W.discard_previous(out, old)
        console.warn(f"synthesize: {out} held a synthesis with other settings ({', '.join(changed) or 'unknown'}); "
                     f"removed its {n} file(s) and starting over")
    ensure_dir(out)
    if status != "same":
        atomic_write_json(out / "plan.json", {"fingerprint": fingerprint, "settings": settings,
                                              "classes": [c["name"] for c in plan.classes]})


def _make_engine(recipe, adapter, adapter_hash, state):
    import torch

    from ..models.loading import check_base, resolve_device, resolve_dtype

    check_base(recipe)
    device = resolve_device(recipe.model.device)
    if state is not None and state.num_processes > 1 and torch.device(device).type == "cuda":
        device = state.device  # one GPU per rank
    dtype = resolve_dtype(recipe.model.dtype)
    comps = load_model(recipe, adapter, device, dtype)
    if adapter is not None:
        console.info(f"synthesize: fine-tuned weights from {adapter} (adapter {adapter_hash[:12]})")
    else:
        console.info("synthesize: base model only (--base-only)")
    from ..models.backbone import get

    bb = get(comps.family)
    for m in (bb.denoiser(comps), *bb.text_encoders(comps).values(), comps.vae):
        m.eval().requires_grad_(False)

    from .engine import Engine

    s = recipe.synthesize
    return Engine(comps, bb, resolution=recipe.model.resolution, steps=s.steps, guidance=s.guidance,
                  negative_prompt=s.negative_prompt, max_text_tokens=recipe.model.max_text_tokens,
                  device=device, dtype=dtype)


def _meta_common(recipe, adapter_hash, fingerprint) -> dict:
    s = recipe.synthesize
    return {"steps": s.steps, "guidance": s.guidance, "negative_prompt": s.negative_prompt,
            "resolution": recipe.model.resolution, "scheduler": SCHEDULER, "base_model": recipe.model.base,
            "adapter_hash": adapter_hash, "recipe_hash": fingerprint, "recipe_seed": recipe.seed,
            "medsynth": __version__}


def _generate(recipe, plan, out, todo, prompts, fmt, ext, bs, adapter, adapter_hash, fingerprint, state):
    engine = _make_engine(recipe, adapter, adapter_hash, state)
    s = recipe.synthesize
    meta_common = _meta_common(recipe, adapter_hash, fingerprint)
    category = {c["name"]: c.get("category") for c in plan.classes}

    def meta(x):
        return {**meta_common, "key": x.key, "label": x.label, "cls": x.cls, "category": category[x.label],
                "index": x.index, "seed": x.seed, "prompt": prompts[x.key]}

    n_total = sum(len(plan.shard(i)) for i in todo)
    n, t_gen = 0, 0.0
    # Testing aid: a pause after every batch, so a test can kill -9 the process mid-shard reliably.
    delay = float(os.environ.get("MEDSYNTH_SYNTH_BATCH_DELAY", "0") or 0)
    bar = console.progress(total=n_total, desc="synthesize", unit="img")
    try:
        for sh in todo:
            samples = plan.shard(sh)
            with W.ShardSink(out, sh, fmt, ext) as sink:
                for b0 in range(0, len(samples), bs):
                    batch = samples[b0:b0 + bs]
                    if all(sink.done(x) for x in batch):
                        bar.update(len(batch))
                        continue  # imagefolder resume: this batch's files all exist
                    t1 = time.time()
                    images = engine.generate(batch, prompts)
                    t_gen += time.time() - t1
                    n += len(batch)
                    for x, arr in zip(batch, images):
                        sink.write(x, W.encode_image(arr, ext, s.jpg_quality), meta(x))
                    bar.update(len(batch))
                    if delay:
                        time.sleep(delay)
    finally:
        bar.close()
    if n:
        console.info(f"synthesize: generated {n} images in {t_gen:.1f} s ({n / max(t_gen, 1e-9):.2f} images/s, "
                     f"batch {bs}, {engine.n_encoded} prompt encodings)")
    return n, t_gen


def _index_done(out: Path, fingerprint: str) -> bool:
    try:
        return json.loads((out / "index.json").read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _curate(recipe, plan, out, todo, fmt, ext, bs, adapter, adapter_hash, fingerprint, judge):
    """Candidates -> judge -> the planned counts; writes the shards (or images) in ``todo``.

    Returns (images generated now, seconds generating, curation summary for index.json).
    """
    from . import curate as C

    prompt_cache: dict[str, str] = {}
    extent = {"n": 0}

    def prompt_of(label: str, index: int) -> str:
        # Candidate j's prompt is the one the plan's rule gives sample j: build_prompts over a plan
        # extended to (at least) j + 1 samples per class, grown by doubling so it is rebuilt rarely.
        key = sample_key(label, index)
        if key not in prompt_cache:
            extent["n"] = max(2 * extent["n"], index + 1, max(plan.counts.values(), default=0))
            ext_plan = Plan(rule=plan.rule, value=plan.value, classes=plan.classes,
                            counts={n: (extent["n"] if plan.counts[n] else 0) for n in plan.counts},
                            shard_size=plan.shard_size, seed=plan.seed)
            prompt_cache.update(build_prompts(recipe, ext_plan, recipe.workdir_path)[0])
        return prompt_cache[key]

    curator = C.Curator(recipe, plan, out, ext, bs, judge, lambda: _make_engine(recipe, adapter, adapter_hash, None),
                        prompt_of)
    kept, summary = curator.run()
    console.info(C.table(summary))
    meta_common = _meta_common(recipe, adapter_hash, fingerprint)
    category = {c["name"]: c.get("category") for c in plan.classes}
    for sh in todo:
        with W.ShardSink(out, sh, fmt, ext) as sink:
            for x in plan.shard(sh):
                if sink.done(x):
                    continue
                k = kept[x.label][x.index]
                meta = {**meta_common, "key": x.key, "label": x.label, "cls": x.cls, "category": category[x.label],
                        "index": x.index, "seed": k.seed, "prompt": k.prompt, "candidate": k.index,
                        "judge": judge["path"], "judge_sha256": judge["sha256"], "judge_score": k.score,
                        "nearest_real_distance": k.distance}
                sink.write(x, C.candidate_image(out, x.label, k.index, ext).read_bytes(), meta)
    return curator.generated_now, curator.seconds, summary


def _all_complete(out: Path, plan: Plan, fmt: str, ext: str) -> bool:
    if fmt == "webdataset":
        if not all((out / W.shard_name(s)).is_file() for s in range(plan.n_shards)):
            return False
        return all(W.shard_complete(out, s, plan.shard(s), ext) for s in range(plan.n_shards))
    return all(W.chunk_complete_imagefolder(out, plan.shard(s), ext) for s in range(plan.n_shards))


def _finalize(recipe, out: Path, plan: Plan, fmt: str, ext: str, settings: dict, prompts_info: dict,
              fingerprint: str, adapter: Path | None, curation: dict | None = None) -> None:
    """index.json, grid.png, provenance: everything follows from the plan, so any worker may do it."""
    index_path = out / "index.json"
    try:
        done = json.loads(index_path.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        done = False
    if not done:
        k = recipe.synthesize.grid_per_class
        if k > 0 and plan.total:
            grid = W.make_grid(W.first_images(out, plan, fmt, ext, k), min(recipe.model.resolution, 256))
            if grid is not None:
                W.write_grid(out / "grid.png", grid)
        W.write_index(out, plan, fmt, ext, settings, prompts_info, fingerprint, curation)
    workdir = recipe.workdir_path
    inputs = {"classes.json": sha256_file(workdir / "classes.json")}
    if prompts_info.get("used") == "captions" and (workdir / "captions.jsonl").is_file():
        inputs["captions.jsonl"] = sha256_file(workdir / "captions.jsonl")
    if prompts_info.get("used") == "file":
        inputs["prompt_file"] = sha256_file(Path(recipe.synthesize.prompt_file).expanduser())
    if adapter is not None:
        inputs["adapter"] = settings["adapter_hash"]
    # The card comes after the shards and index.json are complete and before provenance marks the stage
    # complete; scores are only quoted when score/ scored this very directory (the workspace's own set).
    own = out.resolve() == default_out(recipe).resolve()
    write_card(out, license=recipe.synthesize.license, modality=recipe.modality, name=recipe.name,
               workdir=workdir if own else None)
    from ..models.backbone import family_of

    write_provenance(out, recipe, "synthesize", inputs=inputs, config=settings, complete=True,
                     extra={"family": family_of(recipe), "total": plan.total, "counts": plan.counts, "format": fmt, "out": str(out)})


def summary(out: str | os.PathLike) -> dict:
    """Plan, completeness and counts of an output directory, for --json."""
    out = Path(out)
    res: dict = {"out": str(out), "complete": False}
    plan: dict = {}
    try:
        plan = json.loads((out / "plan.json").read_text())
        res["plan"] = plan["settings"]["plan"]
    except (OSError, ValueError, KeyError):
        pass
    idx = out / "index.json"
    if idx.is_file():
        try:
            index = json.loads(idx.read_text())
            res.update({"complete": index.get("fingerprint") == plan.get("fingerprint"), "index": str(idx),
                        "counts": index.get("counts"), "total": index.get("total"),
                        "shards": [s["file"] for s in index.get("shards", [])]})
            if (out / "grid.png").is_file():
                res["grid"] = str(out / "grid.png")
        except (ValueError, KeyError, TypeError):
            pass
    res.update({k: v for k, v in last_stats.items()})
    return res


__all__ = ["run", "summary", "default_out", "make_plan", "Plan", "DEFAULT_PER_CLASS", "load_model",
           "check_adapter_matches"]
