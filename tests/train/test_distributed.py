"""torchrun on the CPU (gloo): DDP equals the single-process run, FSDP2 trains and saves a PEFT-loadable adapter,
and a dead rank ends the job with an error that --resume recovers from (DDP and FSDP2: to the uninterrupted
result)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import peft
import pytest
import torch
from safetensors.torch import load_file

from helpers import close, close_to_scale, make_data, make_model_dir

COMMON = ["--steps", "6", "--max-length", "48", "--lr", "5e-3", "--rank", "8", "--target-modules", "all-linear",
          "--quiet", "--eval-split", "0.1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return make_model_dir(root / "model"), make_data(root / "data.jsonl", n=80), root


def torchrun(*args, nproc=2, timeout=900, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lorafit", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def single(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def ddp_run(setup):
    model, data, root = setup
    out = root / "ddp"
    r = torchrun("train", "--model", model, "--data", data, "--output", out, "--batch-size", "2", "--strategy",
                 "ddp", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_ddp_equals_single_process_with_the_same_global_batch(setup, ddp_run):
    model, data, root = setup
    out = root / "single"
    r = single("train", "--model", model, "--data", data, "--output", out, "--batch-size", "4", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    # the batch of 4 is split into 2 halves whose float32 gradients gloo averages; 6 AdamW steps (lr 5e-3): relative
    # to each adapter value, plus 2e-4 of one step for values near 0 (measured at most 1/7 of that bound)
    close(adapter(ddp_run), adapter(out), rtol=1e-5, atol=1e-6)
    state = json.loads((ddp_run / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["strategy"] == "ddp"
    assert state["max_rank_divergence"] == 0.0  # both ranks hold identical adapters


@pytest.mark.parametrize("fmt", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])  # 20 s each: one by default
def test_ddp_over_a_quantized_base_equals_single_process(setup, fmt):
    """--quantize under torchrun: "auto" picks DDP (FSDP2 is refused, tests/cli/test_quantize_cli.py), every rank
    quantizes the same checkpoint to the same codes, and 2 ranks x batch 2 train the adapter a single process trains
    with batch 4. float32 compute, so that the comparison is as tight as the float DDP test's."""
    pytest.importorskip("torchao")
    model, data, root = setup
    flags = ["--model", model, "--data", data, "--quantize", fmt, "--dtype", "float32", *COMMON]
    r = torchrun("train", *flags, "--output", root / f"ddp-{fmt}", "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = single("train", *flags, "--output", root / f"single-{fmt}", "--batch-size", "4")
    assert r1.returncode == 0, r1.stderr[-3000:]
    # the quantized weights' kernels round differently on half batches: measured under ATEN_CPU_CAPABILITY=avx2,
    # int8's worst value is 2.1e-5 relative / 2.3e-6 absolute (1 of 512), nf4 and avx512 within 1e-5; a rank whose
    # weights DDP re-quantized was 0.4 relative off
    close(adapter(root / f"ddp-{fmt}"), adapter(root / f"single-{fmt}"), rtol=1e-4, atol=1e-5)
    state = json.loads((root / f"ddp-{fmt}" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["strategy"] == "ddp" and state["max_rank_divergence"] == 0.0
    assert f"quantized 14 linear layers to {fmt}" in r.stdout + r.stderr


def test_fsdp_trains_and_saves_a_peft_loadable_adapter(setup, ddp_run):
    from transformers import AutoModelForCausalLM

    import lorafit

    model_dir, data, root = setup
    out = root / "fsdp"
    r = torchrun("train", "--model", model_dir, "--data", data, "--output", out, "--batch-size", "2", "--strategy",
                 "fsdp", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.randint(0, 200, (2, 16))
    ours = lorafit.load(copy.deepcopy(base), out).eval()
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ddp = lorafit.load(copy.deepcopy(base), ddp_run).eval()
    with torch.no_grad():
        a, b, c = ours(x).logits, ref(x).logits, ddp(x).logits
    close_to_scale(a, b, rtol=1e-5)  # same weights, two libraries: float32 rounding of the largest |logit|
    # FSDP2 and DDP train 6 steps on differently reduced (sharded) float32 gradients: ~80 ulps of the largest |logit|
    # (measured 3e-7 of it)
    close_to_scale(a, c, rtol=1e-5)


def test_fsdp_over_expert_weights_equals_single_process(tmp_path):
    """FSDP2 shards the 3D expert stacks (DTensor); the fast path reads them from the module as FSDP puts them back
    for the forward, and the expert adapters train as in one process with the same global batch."""
    from helpers import make_moe_dir

    model = make_moe_dir(tmp_path / "moe")
    data = make_data(tmp_path / "data.jsonl", n=40)
    args = ["train", "--model", model, "--data", data, "--steps", "4", "--target-parameters", "experts", "--lr",
            "5e-3", "--quiet"]
    r = torchrun(*args, "--output", tmp_path / "fsdp", "--batch-size", "2", "--strategy", "fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    r = single(*args, "--output", tmp_path / "one", "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")
    assert any("experts.base_layer.lora_B" in k for k in want)
    close(got, want, rtol=1e-5, atol=1e-6)  # 4 AdamW steps on differently reduced float32 gradients


# Long enough that the kill, sent once checkpoint-2 exists, lands mid-run even when the test process is starved of
# CPU (a 10-step run once finished before the kill under three concurrent jobs).
DEAD_RANK_STEPS = 60


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])  # 40 s each
def test_a_dead_rank_fails_the_job_and_resume_matches_the_uninterrupted_run(setup, strategy):
    model, data, root = setup
    out, whole = root / f"killed-{strategy}", root / f"whole-{strategy}"
    args = ["train", "--model", model, "--data", data, "--batch-size", "2", "--strategy", strategy,
            "--steps", str(DEAD_RANK_STEPS), "--save-every", "2", "--max-length", "48", "--quiet", "--dist-timeout",
            "30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "lorafit", *map(str, args), "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while not (out / "checkpoint-2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)  # rank 1 dies mid-run
    _, err = proc.communicate(timeout=120)  # no hang: torchrun tears the job down
    assert proc.returncode != 0
    assert "fail" in err.lower() or "error" in err.lower()
    assert not (out / "trainer_state.json").exists()
    r = torchrun("train", "--resume", out, "--quiet", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["finished"]
    resumed_at = re.search(r"resuming .* from checkpoint-(\d+)", r.stderr)
    assert resumed_at and 2 <= int(resumed_at.group(1)) < DEAD_RANK_STEPS, r.stderr[-3000:]  # mid-run
    r = torchrun(*args, "--output", whole)  # the same job, never interrupted
    assert r.returncode == 0, r.stderr[-3000:]
    # the resumed job repeats the uninterrupted job's float32 steps (measured bit-identical): ulps of each adapter
    # value, and of one AdamW step (default lr 1e-3) for values near 0
    close(adapter(out), adapter(whole), rtol=1e-6, atol=1e-8)


def test_workers_stop_when_the_launcher_is_killed(setup):
    """A SIGKILLed torchrun agent cannot tear its workers down: they notice the re-parenting and exit."""
    model, data, root = setup
    out = root / "orphans"
    args = ["train", "--model", model, "--data", data, "--output", out, "--batch-size", "2", "--strategy", "ddp",
            "--steps", "400", "--save-every", "2", "--max-length", "48", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "lorafit", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.time() + 180
        while not (out / "checkpoint-2").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "orphaned workers still running 30 s after the launcher died"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the job's session
        except ProcessLookupError:
            pass
    assert not (out / "trainer_state.json").exists() and (out / "checkpoint-2").is_dir()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (an exited child of another process may linger as a zombie: not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_readme_torchrun_command_parses(setup, tmp_path):
    """torchrun accepts abbreviations of its own options: no lorafit flag may be a prefix of one of them."""
    from torch.distributed.run import get_args_parser

    torchrun_opts = [o for a in get_args_parser()._actions for o in a.option_strings]
    from lorafit.cli.train import train_flags
    flags = [flag for flag, _, _ in train_flags()]
    flags += [f"--no-{f[2:]}" for f, _, kw in train_flags() if kw.get("action") is argparse.BooleanOptionalAction]
    for flag in flags + ["--config", "--resume", "--quiet"]:
        clashes = [o for o in torchrun_opts if o.startswith(flag)]
        assert not clashes, (flag, clashes)
    args = get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "lorafit", "train", "--model", "m",
                                         "--rank", "8", "--strategy", "fsdp"])
    assert args.training_script == "lorafit" and args.training_script_args[-4:] == ["--rank", "8", "--strategy",
                                                                                    "fsdp"]



# --- --strategy auto: sized from the rank's device, the same on every rank ------------------------------------------

def _weights_and_model():
    model = torch.nn.Linear(100, 100)  # float32: 40,400 bytes
    return 4 * (100 * 100 + 100), model


def test_auto_strategy_on_cuda_sizes_from_the_gpu_not_the_host(monkeypatch):
    from lorafit.train import distributed as D

    weights, model = _weights_and_model()
    asked = []
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (free["bytes"], 0))
    monkeypatch.setattr(D, "host_available_memory", lambda: pytest.fail("a GPU rank read the host's memory"))
    d = D.Dist(rank=1, world=2, local_rank=1, device=torch.device("cuda", 1))  # no process group: no all-reduce
    free["bytes"] = 3 * weights + 1  # each rank has its own GPU: not shared between the ranks
    assert D.choose_strategy("auto", model, d) == "ddp" and asked == [torch.device("cuda", 1)]
    free["bytes"] = 3 * weights
    assert D.choose_strategy("auto", model, d) == "fsdp"
    assert D.choose_strategy("ddp", model, d) == "ddp"  # asked for: no sizing


def test_auto_strategy_on_the_cpu_shares_the_host_between_ranks(monkeypatch):
    from lorafit.train import distributed as D

    weights, model = _weights_and_model()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("a CPU rank read a GPU"))
    d = D.Dist(rank=0, world=2)
    monkeypatch.setattr(D, "host_available_memory", lambda: 2 * (3 * weights + 1))
    assert D.choose_strategy("auto", model, d) == "ddp"
    monkeypatch.setattr(D, "host_available_memory", lambda: 2 * 3 * weights)
    assert D.choose_strategy("auto", model, d) == "fsdp"


def test_strategy_sizing_falls_back_where_sc_avphys_pages_is_missing(monkeypatch):
    """macOS has no SC_AVPHYS_PAGES: half the physical memory stands in."""
    from lorafit.train import distributed as D

    def sysconf(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return {"SC_PAGE_SIZE": 16384, "SC_PHYS_PAGES": 1_000_000}[name]

    monkeypatch.setattr(os, "sysconf", sysconf)
    assert D.host_available_memory() == 16384 * 1_000_000 // 2
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_AVPHYS_PAGES": 10}[name])
    assert D.host_available_memory() == 40960


def test_strategy_memory_is_the_least_over_the_ranks(tmp_path):
    """Ranks that read different free memory still choose the same strategy: each takes the smallest (gloo)."""
    script = tmp_path / "least.py"
    script.write_text("import sys, torch.distributed as dist\n"
                      "from pathlib import Path\n"
                      "from lorafit.train import distributed as D\n"
                      "d = D.init_distributed(60)\n"
                      "least = D._least_over_ranks(1000 + 7 * d.rank, d)\n"
                      "Path(sys.argv[1], f'rank{d.rank}').write_text(str(least))  # a file each: no interleaving\n"
                      "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"rank{k}").read_text() for k in (0, 1)] == ["1000", "1000"]

# --- exit under load (slow): `pytest -m slow tests/train/test_distributed.py -k load` ------------------------------

ROUNDS = int(os.environ.get("LORAFIT_STRESS_ROUNDS", "10"))
EXIT_WITHIN_S = 30


def _cpu_load(n: int = 2) -> list[subprocess.Popen]:
    """CPU-bound processes, one per core, that the launcher and workers compete with."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _timed_torchrun(*args, timeout=600) -> tuple[int, float, str]:
    """(exit code, seconds from trainer_state.json's last write to the job's exit, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = args[args.index("--output") + 1] if "--output" in args else args[args.index("--resume") + 1]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "lorafit", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return -9, float("inf"), err
    ended = time.time()
    state = out / "trainer_state.json"
    return proc.returncode, ended - state.stat().st_mtime if state.exists() else float("inf"), err


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_finished_and_resumed_runs_exit_promptly_under_load(setup, strategy):
    """Issue 18: a worker that has written everything exits within seconds, whatever its peers do (the DDP
    reducer, which holds the process group, is freed before the group is destroyed)."""
    model, data, root = setup
    args = ["train", "--model", model, "--data", data, "--batch-size", "2", "--strategy", strategy, "--steps", "6",
            "--save-every", "2", "--max-length", "48", "--quiet", "--eval-split", "0.1"]
    load, delays = _cpu_load(), []
    try:
        for i in range(ROUNDS):
            out = root / f"load-{strategy}-{i}"
            code, delay, err = _timed_torchrun(*args, "--output", out)
            assert code == 0 and delay <= EXIT_WITHIN_S, (i, "finished run", code, delay, err[-6000:])
            delays.append(delay)
            # make it a run killed after checkpoint-4: --resume trains steps 5-6 and finishes again
            shutil.rmtree(out / "checkpoint-6")
            (out / "trainer_state.json").unlink()
            code, delay, err = _timed_torchrun("train", "--resume", out, "--quiet")
            assert code == 0 and delay <= EXIT_WITHIN_S, (i, "resumed run", code, delay, err[-6000:])
            assert "from checkpoint-4" in err
            delays.append(delay)
    finally:
        for p in load:
            p.kill()
    print(f"{strategy}: exit after trainer_state.json in {min(delays):.1f}-{max(delays):.1f} s over {len(delays)} runs")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_dead_rank_under_load_repeatedly(setup, strategy):
    """The dead-rank test ROUNDS times in a row while both cores are busy."""
    load = _cpu_load()
    try:
        for i in range(ROUNDS):
            model, data, root = setup
            for name in (f"killed-{strategy}", f"whole-{strategy}"):
                shutil.rmtree(root / name, ignore_errors=True)
            test_a_dead_rank_fails_the_job_and_resume_matches_the_uninterrupted_run(setup, strategy)
    finally:
        for p in load:
            p.kill()


def test_torchrun_on_mps_is_refused_before_joining(monkeypatch):
    """One Mac has one MPS device, and gloo reduces CPU tensors only: several processes on mps are a ConfigError
    (exit 2) before any process group forms."""
    import torch

    from lorafit.errors import ConfigError
    from lorafit.train import distributed as D

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(D.dist, "init_process_group", lambda *a, **kw: pytest.fail("joined a process group"))
    with pytest.raises(ConfigError, match="torchrun with 2 processes on mps"):
        D.init_distributed(60, torch.device("mps"))
