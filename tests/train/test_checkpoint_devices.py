"""Checkpoints across devices: the device generator's state is saved and restored, a checkpoint loads onto the CPU
whatever wrote it, and a checkpoint from another kind of device resumes with a one-line warning."""

from __future__ import annotations

import torch

from helpers import make_data, make_model_dir
from lorafit.cli import main
from lorafit.train import checkpoint

TRAIN = ["--steps", "6", "--save-every", "3", "--batch-size", "4", "--max-length", "48", "--lora-dropout", "0.1",
         "--quiet", "--device", "cpu"]


def test_a_device_generator_state_is_saved_and_restored_for_its_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or
                        torch.arange(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda rng, device: calls.append(("set", device, rng.tolist())))
    cuda = torch.device("cuda", 1)
    state = checkpoint.device_rng_state(cuda)
    checkpoint.set_device_rng_state(cuda, state)
    assert calls == [("get", cuda), ("set", cuda, [0, 1, 2, 3])]
    assert checkpoint.device_rng_state(torch.device("cpu")) is None  # the CPU's is torch_rng


def test_a_checkpoint_from_another_device_type_resumes_with_a_warning(tmp_path, capsys):
    model_dir, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl", n=32)
    out = tmp_path / "run"
    assert main([str(a) for a in ["train", "--model", model_dir, "--data", data, "--output", out, *TRAIN]]) == 0
    saved = torch.load(out / "checkpoint-6" / "trainer_state.pt", weights_only=False)
    assert saved["device_type"] == "cpu" and saved["device_rng"] is None
    # as if written on a GPU: the last checkpoint claims CUDA, and the run is not finished
    ckpt = out / "checkpoint-3" / "trainer_state.pt"
    state = torch.load(ckpt, weights_only=False)
    torch.save({**state, "device_type": "cuda", "device_rng": torch.zeros(16, dtype=torch.uint8)}, ckpt)
    for leftover in ("checkpoint-6", "trainer_state.json"):
        path = out / leftover
        if path.is_dir():
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
        else:
            path.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: checkpoint-3 was written on cuda and resumes on cpu: dropout masks differ between "
                        "device types, so the run goes on, but not bit for bit"], err
    assert (out / "trainer_state.json").is_file()
