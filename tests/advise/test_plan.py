"""lorafit plan: its peak-memory estimate against the measured peak RSS of a real lorafit train run (within 25%)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import make_data, make_model_dir, tiny_llama
from lorafit.advise.plan import estimate_memory


def lorafit(*args, timeout=900):
    r = subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def estimate_vs_measured(model, data, out, settings):
    lorafit("train", "--model", model, "--data", data, "--output", out, "--quiet", *settings)
    measured = json.loads((out / "trainer_state.json").read_text())["peak_rss_mib"] * 2**20
    plan_flags = [a for a in settings if a not in ("--use-dora",)]
    keep = {"--batch-size", "--max-length", "--rank", "--target-modules", "--dtype"}
    plan_args = []
    for flag, value in zip(plan_flags[::2], plan_flags[1::2]):
        if flag in keep:
            plan_args += [flag, value]
    plan = json.loads(lorafit("plan", "--model", model, "--json", *plan_args))
    return plan["memory_bytes"]["total"], measured


def test_plan_estimate_within_25_percent_on_the_tiny_model(tmp_path):
    model, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl")
    est, measured = estimate_vs_measured(model, data, tmp_path / "run", ["--steps", "4", "--batch-size", "4",
                                                                        "--max-length", "48", "--rank", "4"])
    assert abs(est - measured) / measured <= 0.25, (est / 2**20, measured / 2**20)


@pytest.mark.slow
def test_plan_estimate_within_25_percent_on_smollm2(tmp_path):
    import random

    from helpers import WORDS
    from lorafit.demo.assets import smollm2
    rng = random.Random(0)
    with open(tmp_path / "d.jsonl", "w") as f:  # long texts so that every batch is full length
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(400))}) + "\n")
    for settings in (["--batch-size", "4", "--max-length", "256", "--rank", "8"],
                     ["--batch-size", "8", "--max-length", "128", "--rank", "16", "--target-modules", "all-linear"]):
        est, measured = estimate_vs_measured(smollm2(), tmp_path / "d.jsonl", tmp_path / f"run{settings[1]}",
                                             ["--steps", "3", *settings])
        print(f"{settings}: estimate {est / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
        assert abs(est - measured) / measured <= 0.25, (settings, est / 2**20, measured / 2**20)


# --- a quantized base (lorafit plan --quantize) ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantized_bytes_are_what_torchao_stores(fmt, dtype):
    """The estimate's size of one quantized weight against the bytes of the real torchao tensor's parts (exact)."""
    pytest.importorskip("torchao")
    import torch
    from torch import nn

    import lorafit
    from lorafit.advise.plan import quantized_bytes
    from lorafit.quant import weight_bytes

    shapes = [(64, 64), (32, 64), (192, 256), (576, 1536), (1536, 576), (40, 96)]  # 60 NF4 blocks: factors of 60
    model = nn.Sequential(*[nn.Linear(i, o, bias=False) for o, i in shapes]).to(getattr(torch, dtype))
    assert lorafit.quantize(model, fmt) == [str(k) for k in range(len(shapes))]
    for (o, i), m in zip(shapes, model):
        assert weight_bytes(m.weight) == quantized_bytes(o, i, fmt, m.weight.element_size()), ((o, i), fmt, dtype)


def test_plan_weights_over_a_quantized_base_are_the_quantized_model_s(tmp_path):
    """plan's weights (meta model, no torchao work) equal the bytes of the model lorafit train --quantize holds, for
    a tiny Llama whose k/v projections NF4 leaves in float; and they are far below the unquantized ones."""
    pytest.importorskip("torchao")
    import torch
    from transformers import AutoModelForCausalLM

    import lorafit
    from lorafit.advise.plan import plan
    from lorafit.hf import meta_model
    from lorafit.quant import weight_bytes

    folder = make_model_dir(tmp_path / "m", hidden=40, intermediate=96)
    for fmt, n_quantized in (("nf4", 10), ("int8", 14)):
        real = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        assert len(lorafit.quantize(real, fmt)) == n_quantized
        held = sum(weight_bytes(p) for p in {id(p): p for p in real.parameters()}.values())
        p = plan(meta_model(folder, "bfloat16"), lorafit.LoraConfig(), runtime=0, quantize=fmt)
        assert p["quantized"] == n_quantized and p["memory"].weights == held, (fmt, p["memory"].weights, held)
        dense = plan(meta_model(folder, "bfloat16"), lorafit.LoraConfig(), runtime=0)["memory"].weights
        assert p["memory"].weights < dense


def test_plan_cli_quantize_defaults_to_bfloat16(tmp_path, capsys):
    from helpers import run_cli

    folder = make_model_dir(tmp_path / "m")
    code, out, err = run_cli(capsys, "plan", "--model", folder, "--quantize", "nf4")
    assert code == 0, err
    assert "bfloat16, 14 linears in nf4" in out
    code, out, err = run_cli(capsys, "plan", "--model", folder, "--quantize", "int8", "--dtype", "float32", "--json")
    assert code == 0, err
    assert json.loads(out)["quantized"] == 14


def test_dropout_masks_cost_one_byte_per_adapted_value_two_over_bfloat16():
    inputs, tokens = 1000, 4 * 16  # adapted input values per token, tokens
    for dtype, mask in ((torch.float32, 1), (torch.bfloat16, 2)):
        model = tiny_llama().to(dtype)
        act = [estimate_memory(model, 0, batch_size=4, max_length=16, runtime=0, adapter_inputs=inputs,
                               dropout=p).activations for p in (0.0, 0.1)]
        assert act[1] - act[0] == tokens * inputs * mask, dtype  # fused.mask_dtype: bfloat16 inputs, bfloat16 masks
