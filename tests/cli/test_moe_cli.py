"""The command line on a tiny Qwen3-MoE: `train --target-parameters experts`, the left-out note of plan and train,
`check` for the engines, and a refused expert target (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_moe_dir
from lorafit.cli import main

FAST = ["--steps", "4", "--batch-size", "4", "--eval-max", "8", "--quiet"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_moe_dir(tmp_path_factory.mktemp("moe") / "model")



def test_train_with_expert_weights_saves_a_peft_adapter(moe_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(moe_dir), "--data", str(data), "--output", str(out),
                 "--target-parameters", "experts", *FAST]) == 0
    logged = capsys.readouterr()
    assert "expert weights" not in logged.out + logged.err  # nothing left out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2)
                                        for w in ("down_proj", "gate_up_proj")]
    tensors = load_file(out / "adapter_model.safetensors")
    gate_up_b = tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"]
    assert gate_up_b.shape == (32, 8 * 4) and gate_up_b.abs().sum() > 0  # trained from B = 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_dir), out)
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()


def test_plan_and_train_name_the_expert_weights_they_leave_out(moe_dir, data, tmp_path, capsys):
    assert main(["plan", "--model", str(moe_dir), "--target-modules", "all-linear"]) == 0
    text = capsys.readouterr().out
    assert "4 expert weights (down_proj, gate_up_proj; 32% of the model's parameters) are not adapted" in text
    assert "--target-parameters experts" in text
    assert main(["plan", "--model", str(moe_dir), "--target-parameters", "experts"]) == 0
    text = capsys.readouterr().out
    assert "gate_up_proj (param)" in text and "4 x 32 x 32" in text and "not adapted" not in text
    assert main(["train", "--model", str(moe_dir), "--data", str(data), "--output", str(tmp_path / "r"), *FAST]) == 0
    assert "4 expert weights" in capsys.readouterr().err  # train's log lines


def test_check_says_the_engines_cannot_take_expert_weights(moe_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--model", str(moe_dir), "--data", str(data), "--output", str(out), "--target-parameters",
          "experts", "--steps", "1", "--batch-size", "4", "--eval-max", "4", "--quiet"])
    capsys.readouterr()
    for engine in ("vllm", "llama.cpp"):
        main(["check", str(out), "--for", engine])
        text = capsys.readouterr().out
        assert "target_parameters (4 expert weights" in text and "(1 problem)" in text, text
    main(["check", str(out), "--for", "peft"])
    assert "loads in peft" in capsys.readouterr().out


def test_a_bad_expert_target_exits_2_and_writes_nothing(moe_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(moe_dir), "--data", str(data), "--output", str(out),
                 "--target-parameters", "mlp.experts.gate_proj", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "matches no parameter" in err and "gate_up_proj" in err
    assert not out.exists()


def test_a_quantized_moe_base_keeps_its_experts_in_bfloat16_and_says_so(moe_dir, data, tmp_path, capsys):
    pytest.importorskip("torchao")
    out = tmp_path / "run"
    assert main(["train", "--model", str(moe_dir), "--data", str(data), "--output", str(out), "--quantize", "nf4",
                 "--target-parameters", "experts", *FAST]) == 0
    log = capsys.readouterr().err
    assert "4 mixture-of-experts weights stay in bfloat16" in log, log
    assert json.loads((out / "adapter_config.json").read_text())["target_parameters"]


def test_sweep_switches_the_experts_off_and_on(moe_dir, data, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(moe_dir), "--data", str(data), "--grid", "r=4;targets=qv;experts=off,on",
                 "--steps", "2", "--batch-size", "4", "--eval-max", "4", "--output", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "| r4-qv-lora | 4 | q_proj+v_proj | lora | 896 |" in text
    assert "| r4-qv-lora-experts | 4 | q_proj+v_proj+experts | lora | 2,688 |" in text
    cfg = json.loads((out / "r4-qv-lora-experts" / "adapter_config.json").read_text())
    assert len(cfg["target_parameters"]) == 4 and set(cfg["rank_pattern"].values()) == {2}  # r/k, k = 2


def test_merge_and_generate_from_an_expert_adapter(moe_dir, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import lorafit

    out = tmp_path / "run"
    assert main(["train", "--model", str(moe_dir), "--data", str(data), "--output", str(out),
                 "--target-parameters", "experts", "--lr", "1e-2", *FAST]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(moe_dir), "--adapter", str(out), "--output", str(merged)]) == 0
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    adapted = lorafit.load(AutoModelForCausalLM.from_pretrained(moe_dir), out).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    base = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    with torch.no_grad():
        want = adapted(x).logits
        torch.testing.assert_close(plain(x).logits, want, rtol=1e-4, atol=1e-5)
        assert (base(x).logits - want).abs().max() > 1e-4  # the adapter moved the model
    capsys.readouterr()
    assert main(["generate", "--model", str(moe_dir), "--adapter", str(out), "--prompt", "Review: good",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_the_advisers_take_target_parameters(moe_dir, data, tmp_path, capsys):
    assert main(["suggest", "--model", str(moe_dir), "--goal", "efficiency", "--target-parameters", "experts"]) == 0
    text = capsys.readouterr().out
    assert "target_modules=['q_proj', 'v_proj'] target_parameters='experts'" in text and "(4 layers)" in text
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(moe_dir), "--data", str(data), "--grid", "r=4;targets=qv", "--steps", "1",
                 "--batch-size", "4", "--eval-max", "4", "--target-parameters", "mlp.experts.down_proj",
                 "--output", str(out)]) == 0
    cfg = json.loads((out / "r4-qv-lora" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    capsys.readouterr()
    assert main(["tune", "--model", str(moe_dir), "--data", str(data), "--trials", "1", "--output",
                 str(tmp_path / "tune"), "--target-parameters", "mlp.experts.down_proj"]) == 2
    assert "takes 'experts'" in capsys.readouterr().err and not (tmp_path / "tune").exists()
