"""The CLI on a tiny random Llama: train (outputs, resume after a kill), plan, merge, inspect, and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import close, close_to_scale, make_data, run_cli
from lorafit.cli import main

FAST = ["--steps", "12", "--batch-size", "4", "--max-length", "48", "--lr", "5e-3", "--quiet"]




def lorafit(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_train_writes_every_output(model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--save-every", "5",
                 "--use-dora", "--rank", "4", *FAST]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "report.png",
            "checkpoint-5", "checkpoint-10", "trainer_state.json"} <= names
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    evals = [m for m in metrics if m.get("kind") == "eval"]
    assert len(evals) == 2 and "eval_accuracy" in evals[0]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["use_dora"]
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["steps"] == 12 and saved["model"] == str(model_dir)


def test_text_data_and_csv(model_dir, tmp_path):
    text = make_data(tmp_path / "t.jsonl", kind="text")
    assert main(["train", "--model", str(model_dir), "--data", str(text), "--output", str(tmp_path / "a"), *FAST]) == 0
    import csv
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        for line in make_data(tmp_path / "pc.jsonl").read_text().splitlines():
            w.writerow(json.loads(line))
    assert main(["train", "--model", str(model_dir), "--data", str(tmp_path / "d.csv"), "--output",
                 str(tmp_path / "b"), *FAST]) == 0


def test_yaml_config_and_flag_override(model_dir, data, tmp_path):
    (tmp_path / "c.yaml").write_text(f"model: {model_dir}\ndata: {data}\nsteps: 3\nbatch_size: 2\nmax_length: 40\n"
                                     "lora:\n  r: 2\n  target_modules: all-linear\n  use_rslora: true\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--output", str(out), "--rank", "3", "--quiet"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["use_rslora"] and len(cfg["target_modules"]) == 14


def _adapter(path):
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.slow  # 22 s: a real kill (README: opt-in); tests/train/test_faults.py kills saves in the default run
def test_resume_after_sigkill_matches_uninterrupted_run(model_dir, data, tmp_path):
    args = ["train", "--model", model_dir, "--data", data, "--save-every", "4", "--lora-dropout", "0.1",
            "--steps", "16", "--batch-size", "4", "--max-length", "48", "--quiet"]
    full = tmp_path / "full"
    assert lorafit(*args, "--output", full).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", *map(str, args), "--output", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # the first checkpoint: 12 steps are left, so the kill lands before the end however fast the machine is
    while not (killed / "checkpoint-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter_model.safetensors").exists()  # killed before the end
    resumed = lorafit("train", "--resume", killed, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _adapter(full), _adapter(killed)
    assert a.keys() == b.keys()
    # the resumed run repeats the same float32 steps (measured bit-identical): ulps of each adapter value, and of
    # one AdamW step (lr 5e-3) for values near 0
    close(b, a, rtol=1e-6, atol=1e-8)
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 17))
    again = lorafit("train", "--resume", killed, "--quiet")  # a finished run: nothing to do, exit 0
    assert again.returncode == 0 and "already finished" in again.stderr


def test_interrupted_checkpoint_write_is_ignored_on_resume(model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--save-every", "4",
                 "--steps", "8", "--batch-size", "4", "--max-length", "48", "--quiet"]) == 0
    # simulate a kill in the middle of writing checkpoint-12 and of the final adapter
    (out / ".checkpoint-12.tmp-x").mkdir()
    (out / ".checkpoint-12.tmp-x" / "adapter_model.safetensors").write_bytes(b"partial")
    (out / "trainer_state.json").unlink()
    from lorafit.train.checkpoint import latest_checkpoint
    assert latest_checkpoint(out).name == "checkpoint-8"


def test_merge_command_matches_the_adapted_model(model_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    import lorafit as lf

    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), *FAST]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(out), "--output", str(merged)]) == 0
    x = torch.randint(0, 100, (2, 12))
    adapted = lf.load(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        # float32: the merged weights round W0 + s·B·A once; ~80 ulps of the largest |logit|
        close_to_scale(plain(x).logits, adapted(x).logits, rtol=1e-5)
    assert main(["merge", "--model", str(model_dir), "--adapter", str(out), "--output", str(merged)]) == 2


def test_inspect_and_plan(model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 adapted modules" in text and "model.layers.0.self_attn.q_proj" in text
    assert main(["plan", "--model", str(model_dir), "--rank", "4", "--target-modules", "all-linear"]) == 0
    text = capsys.readouterr().out
    assert "q_proj (linear)" in text and "peak training memory" in text


def test_help_lists_every_flag_with_default():
    out = lorafit("train", "--help").stdout
    for flag in ("--model", "--data", "--output", "--config", "--steps", "--batch-size", "--grad-accum", "--lr",
                 "--max-length", "--seed", "--eval-every", "--save-every", "--resume", "--quiet", "--rank",
                 "--lora-alpha", "--lora-dropout", "--target-modules", "--use-dora", "--use-rslora"):
        assert flag in out
    assert out.count("default") >= 20


BAD = {
    "missing data": (["--data", "nope.jsonl"], "does not exist"),
    "malformed json": (["--data", "{bad}"], "not valid JSON"),
    "empty data": (["--data", "{empty}"], "holds no examples"),
    "missing fields": (["--data", "{nofield}"], "needs a non-empty \"text\""),
    "half prompt": (["--data", "{halfpc}"], "\"completion\" is missing"),
    "not a checkpoint": (["--model", "{tmp}"], "not a transformers checkpoint"),
    "unknown config key": (["--config", "{badyaml}"], "unknown config key"),
    "unknown lora key": (["--config", "{badlora}"], "unknown LoraConfig field"),
    "negative steps": (["--steps", "-3"], "expected a positive integer"),
    "bad target": (["--target-modules", "nothing_here"], "matches no module"),
    "bad rank": (["--rank", "0"], "expected a positive integer"),
    "bad lr": (["--lr", "7"], "lr=7.0 is invalid"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, model_dir, data, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "completion": " y"}\n{oops\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "nofield.jsonl").write_text('{"txt": "hello"}\n')
    (tmp_path / "halfpc.jsonl").write_text('{"prompt": "hello"}\n')
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    (tmp_path / "badlora.yaml").write_text("lora:\n  rank: 3\n")
    flags, message = BAD[case]
    subs = {"{bad}": tmp_path / "bad.jsonl", "{empty}": tmp_path / "empty.jsonl",
            "{nofield}": tmp_path / "nofield.jsonl", "{halfpc}": tmp_path / "halfpc.jsonl", "{tmp}": tmp_path,
            "{badyaml}": tmp_path / "bad.yaml", "{badlora}": tmp_path / "badlora.yaml"}
    flags = [str(subs.get(f, f)) for f in flags]
    base = {"--model": str(model_dir), "--data": str(data)}
    for f in flags[::2]:
        base.pop(f, None)
    args = [a for kv in base.items() for a in kv] + flags + ["--output", str(tmp_path / "out"), "--quiet"]
    if case == "bad target":  # one case as a real process: its exit status and its whole stderr
        result = lorafit("train", *args)
        code, err = result.returncode, result.stderr
    else:  # the rest in this process (a new interpreter costs ~2 s each)
        code, _, err = run_cli(capsys, "train", *args)
    assert code == 2, err
    assert message in err
    errors = [line for line in err.splitlines() if line.startswith("lorafit: error") or "error:" in line]
    assert len(errors) == 1, err
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_model_exits_2(model_dir, tmp_path):
    import lorafit as lf
    from helpers import tiny_gpt2
    model = lf.attach(tiny_gpt2(), lf.LoraConfig(target_modules=["c_attn"]))
    lf.save(model, tmp_path / "gpt2_adapter")
    result = lorafit("merge", "--model", model_dir, "--adapter", tmp_path / "gpt2_adapter", "--output", tmp_path / "m")
    assert result.returncode == 2 and "does not fit this model" in result.stderr
    assert not (tmp_path / "m").exists()


def test_existing_output_is_never_overwritten(model_dir, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = lorafit("train", "--model", model_dir, "--data", data, "--output", out, "--quiet")
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
