"""`--device` on eval, generate, chat and merge (train, sweep and tune have theirs from TrainConfig): an absent or
unknown device is one error line and exit 2 before any model loads or any file is written; the model is read
straight onto the resolved device and every tensor made for it is made there; the first line names the device; and
`--device cpu` runs end to end, with the answers and metrics of the default (here: the CPU too).

No test here needs an accelerator: torch.cuda's and lorafit.devices' probes are monkeypatched, and where a device
must seem present the first model load is stopped (``Loaded``) after recording where it was asked to go."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

import lorafit
from helpers import Loaded, make_chat_model_dir, make_data, perturb_trainable, run_cli, stop_at_load
from lorafit import ConfigError, LoraConfig
from lorafit.generate import Chat, Sampling, generate, load_for_inference, render
from lorafit.hf import merge_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
COMMANDS = ("eval", "generate", "chat", "merge")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("device")
    model = make_chat_model_dir(d / "model")
    adapted = lorafit.attach(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, lora_alpha=8))
    perturb_trainable(adapted, std=0.1)
    return {"model": model, "adapter": lorafit.save(adapted, d / "adapter"), "data": make_data(d / "d.jsonl", 8),
            "dir": d}


def argv(command: str, f: dict, out) -> list:
    """``lorafit COMMAND``'s arguments on the tiny model, without --device."""
    model = ["--model", f["model"], "--adapter", f["adapter"]]
    return {"eval": ["eval", *model, "--data", f["data"], "--max-length", 32],
            "generate": ["generate", *model, "--prompt", "the movie was", "--max-new-tokens", 4],
            "chat": ["chat", *model, "--max-new-tokens", 4],
            "merge": ["merge", *model, "--output", out],
            "plan": ["plan", "--model", f["model"]],
            "suggest": ["suggest", "--model", f["model"]],
            "train": ["train", "--model", f["model"], "--data", f["data"], "--output", out, "--steps", 1]}[command]



def snapshot(folder) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


# --- an absent device: one line, exit 2, nothing loaded or written -------------------------------------------------

ABSENT = [  # (--device, CUDA devices, the error line's text)
    ("cuda", 0, "--device cuda: CUDA is not available here (no NVIDIA GPU, or a CPU-only torch build); use "
                "--device cpu or auto"),
    ("cuda:3", 1, "--device cuda:3: this machine has 1 CUDA device (cuda:0); name one of them or use --device auto"),
    ("mps", 0, "--device mps: Apple's Metal (MPS) backend is not available here"),
    ("tpu", 0, "--device 'tpu' is not a device lorafit knows; use auto, cpu, cuda, cuda:N or mps"),
]



@pytest.mark.parametrize("command", COMMANDS + ("plan", "suggest", "train"))
@pytest.mark.parametrize("device, gpus, message", ABSENT, ids=[a[0] for a in ABSENT])
def test_an_absent_device_is_one_error_line_before_any_work(files, capsys, tmp_path, monkeypatch, machine, command,
                                                            device, gpus, message):
    from transformers import AutoModelForCausalLM

    machine(gpus)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: pytest.fail("a model loaded"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))  # chat: never read
    before = snapshot(files["dir"])
    out = tmp_path / "merged"
    code, stdout, err = run_cli(capsys, *argv(command, files, out), "--device", device)
    assert code == 2 and stdout == "", err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorafit: error: {message}"), err
    assert not out.exists() and list(tmp_path.iterdir()) == [] and snapshot(files["dir"]) == before


def test_the_library_refuses_an_absent_device_before_reading(files, tmp_path, machine):
    machine(0)
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        load_for_inference(tmp_path / "no-model", device="cuda")  # the device is checked before the folder
    with pytest.raises(ConfigError, match="--device mps: Apple's Metal"):
        merge_checkpoint(files["model"], files["adapter"], tmp_path / "merged", device="mps")
    assert list(tmp_path.iterdir()) == []


# --- a present device: the first line names it, the model is read straight onto it ------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_the_model_is_read_onto_the_device_the_first_line_names(files, capsys, tmp_path, monkeypatch, machine,
                                                                command):
    """On a (pretended) one-GPU machine, --device cuda loads with device_map="cuda:0" after a first line naming it:
    on stderr for generate (its stdout is the answer), on stdout for the others (chat's once the chat can start,
    so the stand-in load stops it first)."""

    machine(1)
    asked = stop_at_load(monkeypatch)
    from lorafit.cli import main

    with pytest.raises(Loaded):
        main([str(a) for a in argv(command, files, tmp_path / "merged")] + ["--device", "cuda"])
    out, err = capsys.readouterr()
    first = {"generate": err, "chat": None}.get(command, out)
    want = "device: cuda:0 (Fake GPU" + (")" if command == "merge" else ", float32)") + " (the current GPU)"
    assert asked == ["cuda:0"] and (first is None or first.splitlines()[0] == want), (out, err)
    assert not (tmp_path / "merged").exists()


def test_the_ids_handed_to_the_model_are_on_its_device(files, monkeypatch):
    """generate (and Chat, through it) makes the input ids and the attention mask on the model's device: here the
    meta device, where transformers' generate itself cannot run, so the model's generate is a stand-in."""
    model, tok = load_for_inference(files["model"], files["adapter"], device="cpu")
    model.to("meta")
    seen = []

    def fake_generate(ids, *, attention_mask, max_new_tokens, **kwargs):
        seen.append((ids.device, attention_mask.device))
        return torch.zeros(1, ids.shape[1] + max_new_tokens, dtype=torch.long)

    monkeypatch.setattr(model, "generate", fake_generate)
    assert generate(model, tok, render(tok, prompt="hi"), max_new_tokens=3) == [0, 0, 0]
    Chat(model, tok, sampling=Sampling(max_new_tokens=2)).reply("hello")
    meta = torch.device("meta")
    assert seen == [(meta, meta), (meta, meta)]


# --- --device cpu end to end ---------------------------------------------------------------------------------------

def test_generate_on_the_cpu_gives_the_defaults_answer(files, capsys, machine):
    machine(0)
    runs = {}
    for device in ("cpu", "auto"):
        code, out, err = run_cli(capsys, *argv("generate", files, None), "--json", "--device", device)
        assert code == 0, err
        runs[device] = json.loads(out)
        why = "asked" if device == "cpu" else "auto: no CUDA or MPS device"
        assert err.splitlines()[0] == f"device: cpu (float32) ({why})", err
    model, tok = load_for_inference(files["model"], files["adapter"], device="cpu")
    want = generate(model, tok, render(tok, prompt="the movie was"), max_new_tokens=4)
    assert runs["cpu"] == runs["auto"] and runs["cpu"]["token_ids"] == want and len(want) == 4


def test_eval_on_the_cpu_names_it_first_and_gives_the_defaults_metrics(files, capsys, machine):
    machine(0)
    code, out, err = run_cli(capsys, *argv("eval", files, None), "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "device: cpu (float32) (asked)" and lines[1].startswith(f"{files['data']}: 8 examples")
    results = {}
    for device in ("cpu", "auto"):
        code, out, err = run_cli(capsys, *argv("eval", files, None), "--json", "--device", device)
        assert code == 0 and err.splitlines()[0].startswith("device: cpu (float32) ("), err
        results[device] = json.loads(out)  # stdout is the JSON object alone
    assert results["cpu"] == results["auto"] and set(results["cpu"]) == {"adapted"}
    assert results["cpu"]["adapted"]["eval_loss"] > 0


def test_chat_on_the_cpu_names_it_on_its_first_line(files, capsys, monkeypatch, machine):
    machine(0)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    code, out, err = run_cli(capsys, *argv("chat", files, None), "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "device: cpu (float32) (asked)" and lines[1].startswith(f"chatting with {files['model']}")


def test_merge_on_the_cpu_names_it_first_and_keeps_the_bases_dtype(files, capsys, tmp_path, machine):
    """docs/cli.md: merge computes in float32 and rounds once into a bfloat16 base (transformers 4 would load
    float32 without being told the checkpoint's dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    machine(0)
    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(files["model"], dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(files["model"]).save_pretrained(base)
    out = tmp_path / "merged"
    code, stdout, err = run_cli(capsys, *argv("merge", {**files, "model": base}, out), "--device", "cpu")
    assert code == 0, err
    assert stdout.splitlines() == ["device: cpu (asked)", f"merged checkpoint written to {out}"]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.dtype == torch.bfloat16 and not any("lora" in k for k in merged.state_dict())
