"""The command line as a user meets it: help, speed, exit codes (issue 2)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import typer

from medsynth import __version__
from medsynth.cli import app, main

# Stages the design promises (DESIGN.md, "Command line"); the CLI may have more.
DESIGN_COMMANDS = {"prepare", "caption", "finetune", "synthesize", "classify", "score", "run", "demo", "recipes"}
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "timm", "webdataset", "sklearn")


def _commands(cmd, path=()):
    yield path, cmd
    if hasattr(cmd, "list_commands"):  # a group (Typer may vendor its own click: no isinstance)
        ctx = cmd.context_class(cmd)
        for name in cmd.list_commands(ctx):
            yield from _commands(cmd.get_command(ctx, name), (*path, name))


ALL = [p for p, _ in _commands(typer.main.get_command(app))]


def test_design_commands_exist():
    top = {p[0] for p in ALL if len(p) == 1}
    assert DESIGN_COMMANDS <= top, DESIGN_COMMANDS - top
    assert {("recipes", "list"), ("recipes", "show"), ("recipes", "validate")} <= set(ALL)


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "medsynth")
def test_help_exits_0_and_documents(capsys, path):
    # In-process (subprocesses cost a second each here); test_help_is_fast and
    # test_cli_import_and_help_do_not_load_heavy_libraries run the same through a real process.
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: medsynth" in out
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.get_command(cmd.context_class(cmd), name)
    assert cmd.help and len(cmd.help.split()) >= 4, f"{' '.join(path)} has no real help text"
    first_words = " ".join(cmd.help.split()[:3])
    assert first_words in " ".join(out.replace("│", " ").split()), "help text not shown"
    for p in cmd.params:
        if p.param_type_name == "option" and "--help" not in p.opts:
            assert p.help, f"{' '.join(path)} {p.opts[0]} has no help"
    if not path:
        for name in DESIGN_COMMANDS:
            assert name in out


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_cli_import_and_help_do_not_load_heavy_libraries():
    r = _run("import medsynth.cli, sys; bad = [m for m in %r if m in sys.modules]; assert not bad, bad" % (HEAVY,))
    assert r.returncode == 0, r.stderr
    # Rendering every command's help must not import them either (imports live inside commands).
    code = (
        "import sys\nfrom medsynth.cli import main\n"
        f"for path in {ALL!r}:\n"
        "    assert main([*path, '--help']) == 0, path\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\nassert not bad, bad\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr


def test_help_is_fast():
    # Best of three, so one scheduling hiccup on a shared machine does not fail it; importing torch
    # alone takes longer than the bound on the machines this was written on.
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "medsynth", "--help"], capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - t0)
        assert r.returncode == 0
    assert best < 2.0, f"medsynth --help took {best:.2f} s"


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"medsynth {__version__}"


@pytest.mark.parametrize("args", [
    ("prepare", "--no-such-option"),
    ("no-such-command",),
    ("recipes", "show"),  # missing argument
    ("--set",),  # option without its value
])
def test_usage_errors_exit_2(cli, args):
    r = cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Error:" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_no_arguments_shows_help(cli):
    r = cli()
    assert r.returncode in (0, 2) and "Usage: medsynth" in r.stdout + r.stderr


@pytest.mark.parametrize("args,needle", [
    (("prepare", "no-such-recipe"), "recipe 'no-such-recipe' not found"),
    (("prepare", "demo", "--set", "seed=abc"), "--set seed: 'abc' is not an integer"),
    (("prepare", "demo", "--set", "nokey"), "expected key=value"),
    (("recipes", "validate", "skin", "nope"), "recipe 'nope' not found"),
])
def test_user_errors_exit_1_without_traceback(cli, args, needle, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert needle in r.stderr
    assert r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


def test_json_errors_keep_stdout_clean(cli, tmp_path):
    r = cli("prepare", "demo", "--json", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "" and "data.root is not set" in r.stderr
