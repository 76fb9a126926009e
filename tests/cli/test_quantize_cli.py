"""lorafit train --quantize and lorafit merge of a quantized run (QLoRA, issue #15): the run quantizes its base's
linears before the adapter attaches and says so; merge folds the adapter into dequantize(quantize(W0)), the weights
it was trained against; without torchao both commands refuse before any work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import close, make_data, make_model_dir, run_cli

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")

PEFT = "base_model.model."
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny Llamas: the default one (every linear a whole number of NF4 blocks) and one of width 40, whose k/v
    projections (20 x 40 = 800 weights) are not, so NF4 leaves them in float; and a data file."""
    root = tmp_path_factory.mktemp("quantize")
    return (make_model_dir(root / "model"), make_model_dir(root / "odd", hidden=40, intermediate=96),
            make_data(root / "d.jsonl"))


def train(capsys, model, data, out, *flags):
    return run_cli(capsys, "train", "--model", model, "--data", data, "--output", out, "--steps", "2",
                   "--batch-size", "4", "--max-length", "32", "--lr", "1e-2", *flags)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_train_quantizes_the_base_in_bfloat16_and_records_it(files, fmt, tmp_path, capsys):
    model, _, data = files
    code, out, err = train(capsys, model, data, tmp_path / "run", "--quantize", fmt)
    assert code == 0, err
    assert f"dtype bfloat16: {fmt} base weights with bfloat16 compute, QLoRA's recipe" in out
    assert f"quantized 14 linear layers to {fmt} (bfloat16 compute); kept in bfloat16: model.embed_tokens " \
           "(Embedding), lm_head (the output layer)" in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["quantize"] == fmt and saved["dtype"] == "bfloat16"
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_train_names_the_linears_nf4_leaves_in_float_and_an_explicit_dtype_wins(files, tmp_path, capsys):
    _, odd, data = files
    code, out, err = train(capsys, odd, data, tmp_path / "run", "--quantize", "nf4", "--dtype", "float32")
    assert code == 0, err
    assert "dtype bfloat16" not in out
    assert "quantized 10 linear layers to nf4 (float32 compute); kept in float32: model.embed_tokens (Embedding), " \
           "model.layers.0.self_attn.k_proj (800 weights are not a multiple of NF4's block of 64)" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["dtype"] == "float32"


def test_resume_of_a_quantized_run_quantizes_again(files, tmp_path, capsys):
    model, _, data = files
    code, _, err = train(capsys, model, data, tmp_path / "run", "--quantize", "int8", "--save-every", "1")
    assert code == 0, err
    (tmp_path / "run" / "trainer_state.json").unlink()  # as if killed after its last checkpoint
    code, out, err = run_cli(capsys, "train", "--resume", tmp_path / "run")
    assert code == 0, err
    assert "quantized 14 linear layers to int8 (bfloat16 compute)" in out and "resuming" in out


def _expected_merge(model_dir, adapter_dir, fmt: str) -> dict[str, torch.Tensor]:
    """The reference: W = float32(dequantize(quantize(W0 in bfloat16))) + (alpha / r)·B·A, in plain torch."""
    import json

    from transformers import AutoModelForCausalLM

    import lorafit

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    lorafit.quantize(base, fmt)
    lorafit.dequantize(base)
    want = {k: v.float() for k, v in base.state_dict().items()}
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        name = key[len(PEFT):-len(".lora_A.weight")]
        a, b = tensors[key].float(), tensors[key.replace("lora_A", "lora_B")].float()  # (r, in), (out, r)
        want[name + ".weight"] = want[name + ".weight"] + cfg["lora_alpha"] / cfg["r"] * (b @ a)  # (out, in)
    return want


def _merged(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v for k, v in AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict().items()}


@pytest.fixture(scope="module")
def nf4_run(files, tmp_path_factory):
    model, _, data = files
    out = tmp_path_factory.mktemp("nf4run") / "run"
    r = subprocess.run([sys.executable, "-m", "lorafit", "train", "--model", model, "--data", data, "--output", out,
                        "--steps", "3", "--batch-size", "4", "--max-length", "32", "--lr", "1e-2", "--quiet",
                        "--quantize", "nf4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_merge_of_a_quantized_run_folds_into_the_dequantized_base(files, nf4_run, tmp_path, capsys):
    model = files[0]
    code, out, err = run_cli(capsys, "merge", "--model", model, "--adapter", nf4_run, "--output", tmp_path / "m")
    assert code == 0, err
    assert f"merging into the dequantized nf4 base the adapter was trained against ({nf4_run / 'config.yaml'} says " \
           "quantize: nf4; nf4 made from bfloat16 weights), in float32" in out
    got, want = _merged(tmp_path / "m"), _expected_merge(model, nf4_run, "nf4")
    # merge and the reference add the same float32 product (r=8 terms, |values| < 0.1): rounding only, on any
    # ATEN_CPU_CAPABILITY; 1e-6 absolute is ~100 float32 ulps of the weights (std 0.02)
    close(got, want, rtol=1e-5, atol=1e-6, msg="merged nf4 run")
    delta = (want[Q_PROJ + ".weight"] - _merged(files[0])[Q_PROJ + ".weight"]).abs().max()
    assert delta > 1e-3  # the quantized base differs from W0, so merging into W0 would be another model


def test_merge_quantized_flag_for_an_adapter_without_a_run_config(files, nf4_run, tmp_path, capsys):
    model = files[0]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(nf4_run / name, adapter / name)
    code, out, err = run_cli(capsys, "merge", "--model", model, "--adapter", adapter, "--output", tmp_path / "m",
                             "--quantized", "int8")
    assert code == 0, err
    assert "(--quantized int8; int8 made from bfloat16 weights)" in out
    close(_merged(tmp_path / "m"), _expected_merge(model, adapter, "int8"), rtol=1e-5, atol=1e-6,
          msg="merged with --quantized int8")


@pytest.mark.parametrize("argv", [["train", "--quantize", "nf4"], ["merge", "--quantized", "nf4"]],
                         ids=["train", "merge"])
def test_without_torchao_quantizing_commands_say_what_to_install_before_any_work(files, argv, tmp_path):
    model, _, data = files
    out = tmp_path / "out"
    command, *flags = argv
    paths = ["--data", str(data)] if command == "train" else ["--adapter", str(model)]
    full = [command, "--model", str(model), *paths, "--output", str(out), *flags]
    code = f"import sys; sys.modules['torchao'] = None\nfrom lorafit.cli import main\nsys.exit(main({full!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"lorafit: error: lorafit {command} needs torchao, which is not "
                                             "installed: pip install 'lorafit[quant]'"]
    assert not out.exists()


def test_a_model_with_no_linear_nf4_can_hold_is_refused_before_any_file(files, tmp_path, capsys):
    model = make_model_dir(tmp_path / "m", hidden=36, intermediate=36, heads=2)  # every weight 36·36: no 64-block
    code, _, err = train(capsys, model, files[2], tmp_path / "run", "--quantize", "nf4")
    assert code == 2
    assert "selects no linear layer that can be quantized to nf4" in err and "not a multiple of NF4's block" in err
    assert not (tmp_path / "run").exists()


def test_quantize_with_fsdp_under_torchrun_is_refused_before_any_work(files, tmp_path):
    """In its own process: a torchrun worker's error ends the process at once (cli._fail). DDP over a quantized
    base is tested in tests/train/test_distributed.py."""
    model, _, data = files
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "run"), "--quantize", "nf4",
            "--strategy", "fsdp"]
    env = {**os.environ, "WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, "-m", "lorafit", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--quantize nf4 with --strategy fsdp under torchrun (WORLD_SIZE=2) is not supported: use --strategy ddp" \
        in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantize_on_a_device_torchao_has_no_kernels_for_exits_2_before_any_work(files, tmp_path, capsys,
                                                                               monkeypatch, fmt):
    from lorafit import devices

    monkeypatch.setattr(devices, "mps_available", lambda: True)  # as on a Mac
    model, _, data = files
    out = tmp_path / "run"
    code, _, err = train(capsys, model, data, out, "--quantize", fmt, "--device", "mps")
    assert code == 2 and err.strip().splitlines() == [
        f"lorafit: error: --quantize {fmt} on mps: torchao's {fmt} weights run on the CPU and CUDA only; use "
        "--device cpu or cuda, or drop --quantize to train on mps in bfloat16 or float32"]
    assert not out.exists()
