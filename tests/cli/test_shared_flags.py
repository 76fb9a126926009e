"""The flags many commands take are built in one place (lorafit.cli.common), with one help stem each; and train,
probe, sweep and tune resolve their settings with the one resolver (lorafit.train.settings)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from lorafit.cli import build_parser
from lorafit.cli.common import MAX_NEW_TOKENS_HELP
from lorafit.cli.train import run_settings, train_settings
from lorafit.train.train_config import DEVICE_HELP, MAX_LENGTH_HELP, MODEL_HELP, OUTPUT_HELP

CLI = Path(__file__).resolve().parents[2] / "src" / "lorafit" / "cli"
STEMS = {"--model": MODEL_HELP, "--output": OUTPUT_HELP, "--max-length": MAX_LENGTH_HELP,
         "--max-new-tokens": MAX_NEW_TOKENS_HELP, "--device": DEVICE_HELP}
METAVARS = {"--model": "DIR", "--output": "PATH", "--device": "DEVICE"}  # the others': N


def literal_add_arguments() -> dict[str, list[str]]:
    """{flag: ["file:line", ...]} of every ``add_argument("--flag", ...)`` with the flag as a literal."""
    found: dict[str, list[str]] = {}
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found.setdefault(arg.value, []).append(f"{path.name}:{node.lineno}")
    return found


@pytest.mark.parametrize("flag", STEMS)
def test_each_shared_flag_is_added_in_exactly_one_place(flag):
    places = literal_add_arguments().get(flag, [])
    assert len(places) == 1 and places[0].startswith("common.py:"), \
        f"{flag} is added at {places}: build it with cli.common's add_*_flag instead"


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("flag", STEMS)
def test_every_command_taking_a_shared_flag_starts_its_help_with_the_one_stem(flag):
    takers = {name: a for name, p in commands().items() for a in p._actions if flag in a.option_strings}
    assert len(takers) >= 2  # shared, or it would not be here
    for name, action in takers.items():
        help_ = action.help or ""
        assert help_ == STEMS[flag] or help_.startswith((STEMS[flag] + ": ", STEMS[flag] + " (default: ")), \
            f"lorafit {name} {flag}: {help_!r} does not start with {STEMS[flag]!r}"
        assert action.metavar == METAVARS.get(flag, "N"), (name, flag)


def test_the_walk_finds_every_command_that_takes_model():
    takers = {name for name, p in commands().items() for a in p._actions if "--model" in a.option_strings}
    assert takers == {"train", "data", "eval", "plan", "merge", "generate", "chat", "suggest", "probe", "sweep",
                      "tune", "export", "check", "serve"}


def test_the_walk_finds_every_command_that_takes_device():
    """eval, generate, chat, merge, plan, suggest and serve build it in cli.common; train, probe, sweep and tune
    generate it from TrainConfig. Every command that loads or plans a model takes it."""
    built = ("eval", "generate", "chat", "merge", "plan", "suggest", "serve")
    generated = ("train", "probe", "sweep", "tune")
    takers = {name: a for name, p in commands().items() for a in p._actions if "--device" in a.option_strings}
    assert set(takers) == {*built, *generated}
    assert {name: a.default for name, a in takers.items() if name in built} == dict.fromkeys(built, "auto")
    # the generated ones are unset: a config file may name the device


def test_max_new_tokens_refuses_zero_everywhere(capsys):
    parser = build_parser()
    for argv in (["generate", "--model", "m", "--prompt", "p"], ["chat", "--model", "m"],
                 ["eval", "--model", "m", "--data", "d"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--max-new-tokens", "0"])
        assert "expected a positive integer, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["probe", "sweep", "tune"])
def test_probe_sweep_and_tune_resolve_what_train_resolves(command, tmp_path):
    """The same --config and flags give train's settings, without 'lora' and with save_every 0 (and tune's
    default steps, which cmd_tune sets after)."""
    config = tmp_path / "c.yaml"
    config.write_text("data: d.jsonl\nlr: 0.002\nsave_every: 5\nlora:\n  r: 4\n")
    argv = ["--config", str(config), "--model", str(tmp_path), "--max-length", "40", "--seed", "3"]
    extra = ["--trials", "1"] if command == "tune" else []
    want, note = train_settings(build_parser().parse_args(["train", *argv]))
    got = run_settings(build_parser().parse_args([command, *argv, *extra]))
    assert note == "" and want.pop("lora")["r"] == 4
    assert got == {**want, "save_every": 0}
    assert got["max_length"] == 40 and got["lr"] == 0.002 and got["model"] == str(tmp_path)


def test_a_demo_run_of_probe_and_train_gets_the_demo_job(tmp_path, monkeypatch):
    import lorafit.train.settings as settings

    monkeypatch.setattr(settings, "default_dtype", lambda *, demo, quantize, device: ("float32", f"demo={demo}"))
    monkeypatch.setattr("lorafit.cli.train.require_demo", lambda command, model: None)
    config = tmp_path / "c.yaml"
    config.write_text("model: null\nsteps: 7\n")  # a null names no model: still the demo job
    train, note = train_settings(build_parser().parse_args(["train", "--config", str(config)]))
    probe = run_settings(build_parser().parse_args(["probe", "--config", str(config)]))
    assert note == "demo=True" and train["max_length"] == probe["max_length"] == 96  # DEFAULT_JOB's
    assert train["steps"] == probe["steps"] == 7
