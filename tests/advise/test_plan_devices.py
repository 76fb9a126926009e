"""lorafit plan, suggest and tune on CUDA, without a GPU: the estimate's arithmetic (the documented sum of terms) with
torch.cuda's memory queries monkeypatched, its comparison with the GPU's free memory, suggest's default budget there,
and peak RSS in each platform's unit. Whether the estimate matches torch.cuda.max_memory_allocated needs a GPU
(benchmarks/gpu.py)."""

from __future__ import annotations

import json
import resource
import sys
import types

import pytest
import torch

from helpers import tiny_llama
from lorafit import LoraConfig
from lorafit.advise import plan as P
from lorafit.advise.suggest import suggest
from lorafit.hf import meta_model
from lorafit.train import distributed as D

CUDA = torch.device("cuda", 0)
GiB = 2**30


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda's memory queries answer for one 80 GiB GPU; ``gpu["free"]`` sets its free memory."""
    gpu = {"free": 60 * GiB, "total": 80 * GiB, "asked": []}

    def mem_get_info(device=None):
        gpu["asked"].append(device)
        return gpu["free"], gpu["total"]

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=gpu["total"], name="Fake GPU"))
    return gpu


def n_adapter(model, cfg):
    return sum(P.adapter_parameters(model, P.select_targets(model, cfg), cfg.use_dora).values())


# --- the CUDA estimate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("gc", [False, True])
def test_cuda_estimate_is_the_documented_sum_of_terms(gc):
    model, cfg = tiny_llama(), LoraConfig(r=8, target_modules="all-linear")
    n = n_adapter(model, cfg)
    kw = dict(batch_size=4, max_length=64, gradient_checkpointing=gc, runtime=0)
    cpu = P.estimate_memory(model, n, **kw)
    gpu = P.estimate_memory(model, n, **kw, device=CUDA)
    # the tensors are the CPU's terms, unchanged: weights at their dtype, 16 B per adapter parameter, ...
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert gpu.weights == cpu.weights == weights and gpu.adapter == cpu.adapter == 16 * n
    assert (gpu.activations, gpu.logits) == (cpu.activations, cpu.logits)
    assert gpu.logits == 4 * (4 * 64) * model.config.vocab_size * 4  # four float32 (tokens, V) tensors
    tensors = weights + 16 * n + cpu.activations + cpu.logits
    assert gpu.tensors == tensors  # what torch.cuda.max_memory_allocated should reach
    # ... less the host-only runtime, plus the allocator's slack and the CUDA context
    assert gpu.runtime == 0 and cpu.runtime == P.TOKENIZER_AND_DATA
    assert gpu.slack == int(0.10 * tensors) and gpu.context == 512 * 2**20
    assert gpu.total == tensors + int(0.10 * tensors) + 512 * 2**20
    assert (cpu.slack, cpu.context) == (0, 0) and cpu.total == P.TOKENIZER_AND_DATA + tensors


def test_cuda_estimate_reads_no_rss(monkeypatch):
    monkeypatch.setattr(P, "current_rss", lambda: pytest.fail("the GPU estimate has no runtime term"))
    est = P.estimate_memory(tiny_llama(), 0, batch_size=1, max_length=8, device=CUDA)
    assert est.runtime == 0


def test_plan_on_the_cpu_is_as_before():
    model, cfg = tiny_llama(), LoraConfig(r=4)
    default, cpu = P.plan(model, cfg, runtime=0), P.plan(model, cfg, runtime=0, device="cpu")
    assert default["memory"] == cpu["memory"] and default["free_bytes"] is None and cpu["device"].type == "cpu"
    facts = json.loads(P.plan_json(default))
    assert set(facts) == {"targets", "trainable", "total", "file_bytes", "quantized", "memory_bytes"}
    assert set(facts["memory_bytes"]) == {"runtime", "weights", "adapter", "activations", "logits", "total"}


def test_plan_on_cuda_compares_the_estimate_with_the_free_memory(fake_gpu, tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    cfg = LoraConfig(r=8)
    p = P.plan(meta_model(tmp_path), cfg, batch_size=4, max_length=64, device=CUDA)
    need = p["memory"].total
    assert fake_gpu["asked"] == [CUDA] and (p["free_bytes"], p["device_bytes"]) == (60 * GiB, 80 * GiB)

    fake_gpu["free"] = need
    text = P.plan_report(tmp_path, cfg, batch_size=4, max_length=64, device=CUDA)
    assert "peak GPU memory" in text and "runtime" not in text and "CUDA context 512 MiB" in text
    assert "  fits: ~" in text and "free of 80.00 GiB on cuda:0 (Fake GPU)" in text

    fake_gpu["free"] = need - 1
    text = P.plan_report(tmp_path, cfg, batch_size=4, max_length=64, device=CUDA)
    assert "does not fit: ~" in text and "--gradient-checkpointing" in text

    facts = json.loads(P.plan_report(tmp_path, cfg, batch_size=4, max_length=64, device=CUDA, as_json=True))
    mem = facts["memory_bytes"]
    assert facts["device"] == "cuda:0" and (mem["free"], mem["device_total"]) == (need - 1, 80 * GiB)
    assert mem["total"] == need == mem["tensors"] + mem["slack"] + mem["context"] and mem["runtime"] == 0


# --- suggest's budget on CUDA ----------------------------------------------------------------------------

def test_suggest_on_cuda_takes_the_free_memory_as_its_budget(fake_gpu):
    model = tiny_llama()
    s = suggest(model, "simple", device=CUDA)
    assert s.fits and s.reasons[0].startswith("memory budget: the 60.00 GiB free of 80.00 GiB on cuda:0")
    assert s.estimate.context == 512 * 2**20 and s.estimate.runtime == 0
    assert any(line.startswith("fits: ") and "<= budget 60.00 GiB" in line for line in s.reasons)

    fake_gpu["free"] = 100 * 2**20  # less than the context alone: nothing fits
    s = suggest(model, "simple", device=CUDA)
    assert not s.fits and "the base weights and CUDA context alone need" in s.reasons[-1]


def test_suggest_budget_given_or_on_the_cpu_reads_no_gpu(fake_gpu):
    model = tiny_llama()
    s = suggest(model, "simple", memory_budget="40GB", device=CUDA)
    assert fake_gpu["asked"] == [] and "budget 40.00 GiB" in s.reasons[-1] and s.estimate.context > 0
    s = suggest(model, "simple", runtime=0)  # the CPU: no budget, as before
    assert fake_gpu["asked"] == [] and s.reasons[-1].startswith("no budget given") and s.estimate.context == 0


def test_tune_budget_defaults_to_the_gpu_s_free_memory(fake_gpu):
    from lorafit.advise.tune import Context, TuneJob, device_budget, over_budget

    said = []
    job = TuneJob(settings={}, output=None, trials=1)
    ctx = Context(meta=None, probed=None, runtime=0, device=CUDA)
    device_budget(job, ctx, said.append)
    assert job.memory_budget == 60 * GiB and ctx.memory_why == "the free memory of cuda:0"
    assert said and said[0].startswith("memory budget: the 60.00 GiB free of 80.00 GiB on cuda:0 "
                                       "(torch.cuda.mem_get_info)")
    assert said[0].endswith("plan's GPU estimate prunes trials over it")
    assert over_budget(job, 1, 61 * GiB).startswith("over the memory budget")
    job, ctx = TuneJob(settings={}, output=None, trials=1, memory_budget=GiB), Context(None, None, 0, CUDA)
    device_budget(job, ctx, said.append)  # a budget given wins
    assert job.memory_budget == GiB and ctx.memory_why == "--memory-budget" and len(said) == 1


def test_cli_suggest_has_a_device_flag():
    import argparse

    from lorafit.cli.advise import add_suggest_parser

    p = argparse.ArgumentParser()
    add_suggest_parser(p.add_subparsers())
    assert p.parse_args(["suggest"]).device == "auto"
    assert p.parse_args(["suggest", "--device", "cpu"]).device == "cpu"


# --- peak RSS in each platform's unit ---------------------------------------------------------------------

@pytest.mark.parametrize("platform, unit", [("linux", 1024), ("darwin", 1)])
def test_peak_rss_is_in_bytes_on_linux_and_macos(monkeypatch, platform, unit):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=300_000_000))
    assert D.rss_unit() == unit
    assert D.peak_rss_bytes() == P.current_rss() == 300_000_000 * unit
