"""Reliability suite: what a user's bad day looks like, and that medsynth fails clearly and loses nothing.

Every case asserts the exit code (or the UserError the CLI turns into exit 1), the message (what,
where, how to fix), and that nothing was lost or left half-written. Cases an existing test already
covers exactly are referenced here instead of being run twice (the whole default suite must stay fast):

| case                                              | where                                                                  |
|---------------------------------------------------|------------------------------------------------------------------------|
| corrupt / truncated / empty file listed at once   | test_prepare.py::test_bad_images_all_listed_then_skipped (+ below)     |
| empty class folder -> exit 1 naming the class     | test_prepare.py::test_class_too_small_and_empty_class                  |
| grayscale, RGBA, 16-bit, huge: pixel conversions  | test_images.py (exact values); prepare on a mixed root: below          |
| recipe: every problem at once, did-you-mean       | test_recipe.py::test_every_problem_reported_at_once (+ CLI case below) |
| model.base: local dir without transformer/        | test_tiny_backbone.py::test_check_base_local_dir_missing_transformer   |
| model.base: hub id not cached, HF_HUB_OFFLINE=1   | test_tiny_backbone.py::test_hub_id_not_cached_offline (+ stages below) |
| caption.model (vlm) missing, before any work      | test_caption.py::test_missing_vlm_weights_fail_before_work             |
| caption.simplify_model missing (checked up front | test_caption_text.py::test_simplifier_missing_weights_is_a_user_error  |
|   whenever a caption may need it)                 |                                                                        |
| classify pretrained timm weights offline          | test_classify.py::test_pretrained_weights_missing_offline_is_a_user_error (+ stage below) |
| score.fid_weights missing, before any work        | test_score.py::test_missing_fid_weights_fail_before_any_work           |
| score.domain_model: timm name not cached          | test_score.py::test_missing_domain_classifier_names_the_fix            |
| missing real-only classifier for domain FID       | test_score.py::test_missing_domain_classifier_names_the_fix            |
| killed caption resumed to the same captions       | test_caption.py::test_kill_9_then_resume_gives_the_same_captions       |
| killed finetune resumed to the same weights       | test_finetune_cli.py::test_resume_after_kill_matches_uninterrupted_run |
| killed synthesize resumed to the same bytes       | test_synthesize.py::test_kill_9_midway_then_rerun_gives_the_same_bytes |
| killed classify resumed to the same model         | test_classify.py::test_resume_after_interruption_gives_the_same_model  |
| read-only workdir in prepare                      | test_prepare.py::test_read_only_workdir                                |

Full disk and read-only folders are made for real where the machine allows it (a small tmpfs or a
read-only bind mount in a private mount namespace: `unshare -m` as root, `unshare -r -m` otherwise);
where it does not, those tests skip with the reason (shown by pytest's -ra summary) and the
simulated-ENOSPC tests below still check the write helpers.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsynth.errors import UserError

CLASSES = ("polyps", "normal-cecum")
# A small tiny base and no VAE fit: these tests are about failures, not image quality.
TINY = ["model.resolution=32", "model.tiny.vae_fit_steps=0", "model.tiny.layers=1", "model.tiny.heads=2",
        "model.tiny.head_dim=8", "model.tiny.text_layers=1", "model.tiny.text_dim=32", "model.tiny.vae_channels=[8,16]",
        "model.max_text_tokens=24", "modality=endoscopic", "finetune.max_steps=2", "finetune.batch_size=2",
        "synthesize.per_class=2", "synthesize.steps=2", "classify.epochs=1", "classify.model=resnet10t"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the machine is shared


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sets(*pairs: str) -> list[str]:
    out = []
    for p in pairs:
        out += ["--set", p]
    return out


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256 of its bytes): equal snapshots = nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _hk_root(shared_data: Path, dest: Path, per_class: int = 4) -> Path:
    for c in CLASSES:
        (dest / c).mkdir(parents=True)
        for f in sorted((shared_data / "hyperkvasir" / c).iterdir())[:per_class]:
            (dest / c / f.name).symlink_to(f.resolve())
    return dest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared workspace (2 classes x 4 HyperKvasir images) and the --set list that reaches it."""
    from medsynth import data
    from medsynth.recipe import load_recipe

    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests expect ../shared/data beside the project (CI provides it)")
    tmp = tmp_path_factory.mktemp("rel")
    root = _hk_root(SHARED_DATA, tmp / "data")
    sets = [f"data.root={root}", f"workdir={tmp / 'ws'}", *TINY]
    data.run(load_recipe("demo", sets))
    return tmp / "ws", sets


# ----------------------------------------------------------------------------- private mounts


@functools.lru_cache(maxsize=1)
def _mount_wrapper() -> tuple[list[str] | None, str]:
    """argv prefix that runs a shell script in a private mount namespace (where mounts are allowed)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "unshare(1) is not installed: cannot make a tmpfs or a read-only mount"
    tries = [[unshare, "-m"]] if os.geteuid() == 0 else []
    tries.append([unshare, "-r", "-m"])  # unprivileged: a user namespace where we may mount
    why = ""
    for pre in tries:
        probe = subprocess.run(pre + ["sh", "-c", 'd=$(mktemp -d); mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d"; rc=$?; rmdir "$d"; exit $rc'],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return pre, ""
        why = probe.stderr.strip()[:200]
    return None, f"cannot mount in a private mount namespace here ({why}); the simulated-ENOSPC tests still run"


def _in_mount_ns(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    pre, why = _mount_wrapper()
    if pre is None:  # reported by -ra; the simulated-ENOSPC tests below still run
        pytest.skip(why)
    env = dict(os.environ, **ENV)
    return subprocess.run(pre + ["sh", "-c", script, "sh", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# Mount a tmpfs of SIZE at $1, fill it with a filler file (leaving SPARE bytes), run the rest of the
# arguments, then list what the run left on the full disk (it vanishes with the namespace).
FULL_DISK = """
set -e
d="$1"; spare="$2"; shift 2
mount -t tmpfs -o size=4m tmpfs "$d"
[ -n "$SEED" ] && cp -a "$SEED" "$d/ws"
avail=$(df -B1 --output=avail "$d" | tail -1)
dd if=/dev/zero of="$d/filler" bs=4096 count=$(( (avail - spare) / 4096 )) 2>/dev/null
set +e
"$@"; rc=$?
echo "== rc=$rc"
echo "== files"
cd "$d" && find . -type f ! -name filler | sort
"""


def _parse_ns_output(stdout: str) -> tuple[int, list[str]]:
    head, _, files = stdout.partition("== files\n")
    rc = int(head.rsplit("== rc=", 1)[1].split()[0])
    return rc, [f[2:] for f in files.split("\n") if f.strip()]


# ----------------------------------------------------------------------------- images


def _png_bomb(path: Path, side: int = 30000) -> None:
    """A PNG whose header claims side x side pixels (900 M) on a few hundred bytes of data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_every_image_flavour_in_one_data_root(cli, shared_data, tmp_path):
    """Bad files are all listed in one run; grayscale / RGBA / 16-bit / large ones are taken and converted."""
    from medsynth.images import read_image

    root = tmp_path / "data"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for f in sorted((shared_data / "hyperkvasir" / c).iterdir())[:3]:
            shutil.copy(f, root / c / f.name)
    good = next((root / "polyps").iterdir()).read_bytes()
    rgb = np.asarray(Image.open(next((root / "polyps").iterdir())).convert("RGB"))
    p = root / "polyps"
    Image.fromarray(rgb[..., 1]).save(p / "gray.png")                               # L
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 40, np.uint8)])).save(p / "rgba.png")  # RGBA
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(p / "deep16.png")   # I;16
    Image.new("RGB", (4000, 3000), (120, 60, 30)).save(p / "large.png")             # 12 Mpx: fine
    _png_bomb(root / "normal-cecum" / "bomb.png")                                    # 900 Mpx header: refused
    (root / "normal-cecum" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "normal-cecum" / "empty.jpg").write_bytes(b"")
    (root / "normal-cecum" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(64))
    ws = tmp_path / "ws"
    sets = _sets(f"data.root={root}", f"workdir={ws}")

    r = cli("prepare", "demo", *sets, env=ENV)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "4 image(s) cannot be used" in r.stderr  # all of them at once, not the first one
    for name, why in (("bomb.png", "too large"), ("truncated.jpg", "truncated"), ("empty.jpg", "empty file"),
                      ("corrupt.jpg", "")):
        line = next((ln for ln in r.stderr.splitlines() if name in ln), "")
        assert str(root / "normal-cecum" / name) in line and why in line, (name, r.stderr)
    assert "data.on_bad_image: skip" in r.stderr
    assert not ws.exists() or _snapshot(ws) == {}  # no manifest, nothing half-written

    r = cli("prepare", "demo", *sets, "--set", "data.on_bad_image=skip", "--json", env=ENV)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["skipped"] == 4 and out["n_train"] + out["n_test"] == 6 + 4
    import csv

    with open(ws / "manifest.csv", newline="") as fh:
        rows = {Path(x["path"]).name: x for x in csv.DictReader(fh)}
    assert {"gray.png", "rgba.png", "deep16.png", "large.png"} <= set(rows)
    assert (rows["large.png"]["width"], rows["large.png"]["height"]) == ("4000", "3000")
    with open(ws / "prepare" / "bad_images.csv", newline="") as fh:
        assert sorted(Path(x["path"]).name for x in csv.DictReader(fh)) == ["bomb.png", "corrupt.jpg", "empty.jpg", "truncated.jpg"]
    # What every later stage reads: 8-bit RGB of the same size, converted as docs/data.md says.
    for name in ("gray.png", "rgba.png", "deep16.png"):
        im = read_image(p / name)
        assert im.mode == "RGB" and im.size == (rgb.shape[1], rgb.shape[0]), name
    assert np.array_equal(np.asarray(read_image(p / "gray.png"))[..., 2], rgb[..., 1])
    assert np.array_equal(np.asarray(read_image(p / "rgba.png")), rgb)  # alpha dropped, colours kept
    assert np.array_equal(np.asarray(read_image(p / "deep16.png"))[..., 0], rgb[..., 0])  # 65535 -> 255 scaling


# ----------------------------------------------------------------------------- recipes


def test_bad_recipe_lists_every_problem_and_touches_nothing(cli, tmp_path):
    ws = tmp_path / "ws"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"""\
name: bad
workdir: {ws}
colour: red                       # unknown key
data: {{root: {tmp_path}, test_fraction: 0.7, min_per_class: two}}
finetune: {{max_steps: -3, batch_size: 1.5, lora: {{rank: 0, dropuot: 0.1}}}}
synthesize: {{per_class: -1}}
caption: {{source: vlmm}}
""")
    for argv in (("recipes", "validate", str(bad)), ("prepare", str(bad))):
        r = cli(*argv, "--set", "seed=abc", env=ENV) if argv[0] == "prepare" else cli(*argv, env=ENV)
        assert r.returncode == 1, (argv, r.stderr)
        assert "Traceback" not in r.stderr
        err = r.stderr
        for needle in ("colour: unknown key",
                       "data.test_fraction: 0.7 is out of range; it must be at most 0.5; more would hold out more test than train images",
                       "data.min_per_class: 'two' is not an integer",
                       "finetune.max_steps: -3 is out of range; it must be at least 1",
                       "finetune.batch_size: 1.5 is not an integer",
                       "finetune.lora.rank: 0 is out of range; it must be at least 1",
                       "finetune.lora.dropuot: unknown key; did you mean 'finetune.lora.dropout'?",
                       "synthesize.per_class: -1 is out of range; it must be at least 0",
                       "caption.source: 'vlmm' is not one of vlm, simple, empty, file, stats (did you mean 'vlm'?)"):
            assert needle in err, (needle, err)
        assert f"{bad}: " in err  # every line names the file
        if argv[0] == "prepare":
            assert "--set seed: 'abc' is not an integer" in err and "10 problems" in err
    assert not ws.exists()


@pytest.mark.parametrize("fraction,ok", [(0.5, True), (0.51, False), (0.9, False)])
def test_test_fraction_above_one_half_is_an_error(fraction, ok):
    from medsynth.recipe import build_recipe

    if ok:
        assert build_recipe({"data": {"test_fraction": fraction}}).data.test_fraction == fraction
    else:
        with pytest.raises(UserError, match=f"data.test_fraction: {fraction} is out of range; it must be at most 0.5; more would hold out more test than train"):
            build_recipe({"data": {"test_fraction": fraction}})


@pytest.mark.parametrize("n", [2, 3, 5, 7, 10])
def test_never_more_test_than_train_images(n):
    from medsynth.data import _split_class

    n_test = _split_class(n, 0.5)  # 3 * 0.5 rounds up to 2: capped to 1
    assert 1 <= n_test <= n - n_test


# ----------------------------------------------------------------------------- missing weights


def test_missing_local_base_fails_before_any_work_cli(cli, prepared):
    ws, sets = prepared
    before = _snapshot(ws)
    nowhere = ws.parent / "no-such-pixart"
    r = cli("finetune", "demo", *_sets(*sets, f"model.base={nowhere}"), env=ENV)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"model.base: {nowhere} is not a directory" in r.stderr
    assert "hf download PixArt-alpha/PixArt-XL-2-512x512 --local-dir DIR" in r.stderr and "model.base=tiny" in r.stderr
    assert _snapshot(ws) == before


def test_hub_base_offline_fails_before_finetune_work(prepared, monkeypatch):
    from medsynth import finetune
    from medsynth.recipe import load_recipe

    ws, sets = prepared
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(ws)
    repo = "medsynth-tests/never-cached-pixart"
    with pytest.raises(UserError) as e:
        finetune.run(load_recipe("demo", [*sets, f"model.base={repo}"]))
    msg = str(e.value)
    assert f"'{repo}' is not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert f"hf download {repo} --local-dir DIR" in msg
    assert _snapshot(ws) == before


@pytest.mark.parametrize("base", ["/nonexistent/pixart", "medsynth-tests/never-cached-pixart"])
def test_missing_base_fails_before_synthesize_work(prepared, monkeypatch, base):
    from medsynth import synthesize
    from medsynth.recipe import load_recipe

    ws, sets = prepared
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(ws)
    try:
        with pytest.raises(UserError, match="model.base: .*hf download"):
            synthesize.run(load_recipe("demo", [*sets, f"model.base={base}"]), base_only=True)
        assert _snapshot(ws) == before
    finally:
        shutil.rmtree(ws / "synthetic", ignore_errors=True)


def test_classify_weights_missing_fail_before_any_work(prepared, monkeypatch, tmp_path):
    from medsynth import classify
    from medsynth.recipe import load_recipe

    ws, sets = prepared
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(ws)
    with pytest.raises(UserError) as e:  # timm weights of resnet10t, not in this (offline) cache
        classify.run(load_recipe("demo", [*sets, "classify.pretrained=true"]), train_on="real")
    msg = str(e.value)
    assert "classify.model 'resnet10t': pretrained weights not found" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "classify.pretrained_path" in msg and "classify.pretrained=false" in msg
    missing = tmp_path / "resnet10t.safetensors"
    with pytest.raises(UserError, match=f"classify.pretrained_path: {missing} does not exist"):
        classify.run(load_recipe("demo", [*sets, "classify.pretrained=true", f"classify.pretrained_path={missing}"]),
                     train_on="real")
    assert _snapshot(ws) == before and not (ws / "classify").exists()


def test_score_domain_model_missing_id(prepared, monkeypatch):
    import torch

    from medsynth.features import domain_extractor
    from medsynth.recipe import load_recipe

    ws, sets = prepared
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = load_recipe("demo", [*sets, "score.domain_model=nobody/no-such-classifier"])
    with pytest.raises(UserError) as e:
        domain_extractor(r.score, ws, torch.device("cpu"))
    msg = str(e.value)
    assert "score.domain_model: 'nobody/no-such-classifier' could not be loaded" in msg
    assert "hf download nobody/no-such-classifier" in msg and "score.domain_model: null" in msg


# ----------------------------------------------------------------------------- read-only and full disk

READ_ONLY = """
set -e
mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1"
shift
set +e
"$@"; echo "== rc=$?"
echo "== files"
"""


def test_read_only_workdir_in_caption_loses_nothing(prepared, tmp_path):
    ws, sets = prepared
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy, symlinks=True)
    before = _snapshot(copy)
    r = _in_mount_ns(READ_ONLY, str(copy), sys.executable, "-m", "medsynth", "caption", "demo",
                     *_sets(*sets, f"workdir={copy}", "caption.source=simple"))
    rc, _ = _parse_ns_output(r.stdout)
    assert rc == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot write {copy / 'caption'}: Read-only file system" in r.stderr and "--set workdir=DIR" in r.stderr
    assert _snapshot(copy) == before


def test_full_disk_in_prepare_leaves_no_temp_file(shared_data, tmp_path):
    root = _hk_root(shared_data, tmp_path / "data")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ws = mnt / "ws"
    r = _in_mount_ns(FULL_DISK, str(mnt), "0", sys.executable, "-m", "medsynth", "prepare", "demo",
                     *_sets(f"data.root={root}", f"workdir={ws}"))
    rc, files = _parse_ns_output(r.stdout)
    assert rc == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "No space left on device; free some space or choose another workdir" in r.stderr
    assert f"cannot write {ws}" in r.stderr  # names the file it could not write
    assert not [f for f in files if ".tmp" in f], files  # the atomic writer removed its temporary file
    assert "ws/manifest.csv" not in files  # no manifest rather than a half one


@pytest.mark.parametrize("tokenizer_cached", [False, True], ids=["while-building-the-tokenizer", "while-writing-captions"])
def test_full_disk_in_caption_keeps_the_workspace(prepared, tmp_path, tokenizer_cached):
    from medsynth.models import tiny
    from medsynth.recipe import load_recipe

    ws, sets = prepared
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    seed = tmp_path / "seed"
    shutil.copytree(ws, seed, symlinks=True)
    if tokenizer_cached:  # the disk fills later: at the stage's own files
        tiny.tokenizer_dir(load_recipe("demo", [*sets, f"workdir={seed}"]))
    before = {f"ws/{k}" for k in _snapshot(seed)}
    r = _in_mount_ns(f"export SEED={seed}\n" + FULL_DISK, str(mnt), "0", sys.executable, "-m", "medsynth", "caption",
                     "demo", *_sets(*sets, f"workdir={mnt / 'ws'}", "caption.source=simple"))
    rc, files = _parse_ns_output(r.stdout)
    assert rc == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "No space left on device; free some space or choose another workdir" in r.stderr
    where = f"{mnt / 'ws' / 'caption'}/" if tokenizer_cached else f"{mnt / 'ws' / 'tiny-base' / 'tokenizer-'}"
    assert f"cannot write {where}" in r.stderr, r.stderr
    # Every input is still there; the only new file is the (empty) run lock: no temp files, no
    # half-built tokenizer, no captions.jsonl or provenance claiming a run that did not happen.
    assert before <= set(files) and set(files) - before <= {"ws/caption/.lock"}, sorted(set(files) - before)


def test_enospc_in_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    """Simulated ENOSPC (fsync is where a full disk shows on delayed-allocation file systems)."""
    from medsynth import workspace

    target = tmp_path / "out" / "scores.json"
    workspace.atomic_write_json(target, {"v": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(workspace.os, "fsync", full)
    with pytest.raises(UserError) as e:
        workspace.atomic_write_json(target, {"v": 2})
    assert str(e.value) == f"cannot write {target}: No space left on device; free some space or choose another workdir"
    assert json.loads(target.read_text()) == {"v": 1}  # the previous complete file, untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["scores.json"]  # no temp file left


def test_enospc_mid_caption_batch_keeps_whole_records(tmp_path):
    """A disk filling during a caption append: the partial batch is cut off, earlier captions stay."""
    from medsynth.caption import store

    path = tmp_path / "captions.jsonl"
    rec = lambda i: {"path": f"/d/{i}.jpg", "label": "a", "sha256": f"{i:064x}", "caption": f"caption {i} " * 20,  # noqa: E731
                     "source": "simple", "n_tokens": 40, "how": "fits"}
    with store.Appender(path) as app:
        app.write([rec(0), rec(1)])

        class FullDisk:  # the kernel takes part of the bytes, then reports ENOSPC
            def __init__(self, fh):
                self.fh, self.calls = fh, 0

            def write(self, data):
                self.calls += 1
                if self.calls == 1:
                    return self.fh.write(bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def fileno(self):
                return self.fh.fileno()

            def close(self):
                self.fh.close()

        app._fh = FullDisk(app._fh)
        with pytest.raises(UserError) as e:
            app.write([rec(2), rec(3)])
    msg = str(e.value)
    assert msg.startswith(f"cannot write {path}: No space left on device; free some space or choose another workdir")
    assert "run `medsynth caption` again to continue" in msg
    assert path.read_bytes().endswith(b"\n")  # no torn line left behind
    assert [r["path"] for r in store.read(path, repair=False)] == ["/d/0.jpg", "/d/1.jpg"]
