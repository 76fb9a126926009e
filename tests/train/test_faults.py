"""Faults: SIGKILL during `save` and `train`, a full disk, and non-finite losses. Nothing complete is ever lost.

* ``lorafit.save`` killed at random points (and crashed before every one of its filesystem steps) leaves, at the
  target, the previous complete adapter or the new one, never a partial one (and never none, once one was saved).
* ``lorafit train`` killed at random points leaves only complete ``checkpoint-N`` folders, and ``--resume`` ends
  with the adapter of an uninterrupted run (to float32 rounding: 1e-6 of each value, plus 1e-8 near 0).
* A full disk (ENOSPC from the writer, or a real tiny tmpfs) gives an error naming the file and leaves the
  previous files as they were; a non-finite loss stops training with exit code 1, naming the step and the last
  good checkpoint, which loads.

The random kills run through a fork server (one Python process that imports torch, transformers and lorafit once
and forks a fresh child per run), so that a kill costs a fraction of a second instead of an interpreter start;
the variant marked slow kills real ``python -m lorafit train`` processes.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorafit
import lorafit.files as lfiles
import lorafit.peft_format as peft_format
import lorafit.train.steps as ltrain
from helpers import close, make_data, make_model_dir
from lorafit import LoraConfig
from lorafit.cli import main

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32",
                              reason="needs fork and SIGKILL"),
              pytest.mark.usefixtures("one_thread")]

TRAIN = ["--steps", "12", "--save-every", "2", "--batch-size", "4", "--max-length", "48", "--lora-dropout", "0.1",
         "--quiet"]
SAVER_MODEL = "torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512))"
SAVER_CONFIG = dict(r=64, lora_alpha=64, target_modules=["0", "2"], init_lora_weights=False)  # 0.5 MB per adapter

SERVER = r'''
import json, os, signal, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import torch
torch.set_num_threads(1)
import lorafit, lorafit.cli, lorafit.train, transformers, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
from transformers import AutoModelForCausalLM, AutoTokenizer


def save_forever(refs, target, log):
    """Load the two reference adapters, then save them alternately to ``target``; ``log`` gets a line per save."""
    models = [lorafit.load(eval(SAVER_MODEL), ref) for ref in refs]
    with open(log, "w") as f:  # its existence says: loaded, saving starts now
        for i in range(10**9):
            lorafit.save(models[i % 2], target)
            f.write(f"{i % 2}\n")
            f.flush()


def job(cmd):
    if "save" in cmd:
        save_forever(**cmd["save"])
    return lorafit.cli.main(cmd["argv"])


def fork(cmd):
    pid = os.fork()
    if pid == 0:
        out = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        try:
            code = job(cmd)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    return pid


def poll(pid, until):
    """The child's wait status if it exits before ``until()`` is true, else None."""
    while not until():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    return None


SAVER_MODEL = sys.argv[1]
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    pid, status = fork(cmd), None
    if cmd.get("delay") is not None:  # wait for the marker, then for the delay, then SIGKILL
        marker, deadline = cmd["marker"], time.time() + cmd["timeout"]
        status = poll(pid, lambda: os.path.exists(marker) or time.time() > deadline)
        if status is None:
            end = time.time() + cmd["delay"]
            status = poll(pid, lambda: time.time() > end)
        if status is None:
            os.kill(pid, signal.SIGKILL)
    if status is None:
        status = os.waitpid(pid, 0)[1]
    print(json.dumps({"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                      "killed": os.WIFSIGNALED(status)}), flush=True)
'''


class ForkServer:
    """Runs jobs in forked children of one warm Python process: run(argv) or run with a kill after a delay."""

    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        self.stderr = open(tmp / "server.err", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, SAVER_MODEL], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        assert self.proc.stdout.readline().strip() == "ready", (tmp / "server.err").read_text()

    def __call__(self, timeout: float = 240, **cmd) -> dict:
        self.n += 1
        cmd = {"log": str(self.tmp / f"job{self.n}.log"), "timeout": timeout, **cmd}
        self.proc.stdin.write(json.dumps(cmd, default=str) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, (self.tmp / "server.err").read_text()
        return {**json.loads(reply), "log": Path(cmd["log"]).read_text()}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return make_model_dir(root / "model"), make_data(root / "train.jsonl")


def saver_model() -> torch.nn.Module:
    return eval(SAVER_MODEL)  # the fork server builds it from the same source


def saver_adapters(tmp: Path) -> list[Path]:
    """Two different complete adapters for SAVER_MODEL."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = lorafit.attach(saver_model(), LoraConfig(**SAVER_CONFIG))
        paths.append(lorafit.save(model, tmp / f"ref{seed}"))
    return paths


def which_adapter(path: Path, refs: list[Path]) -> int:
    """The index of the reference adapter that ``path`` holds, bit for bit (fails on anything else)."""
    _, tensors = peft_format.read_adapter(path)  # parses both files and checks every tensor
    config = json.loads((path / peft_format.CONFIG_NAME).read_text())
    for i, ref in enumerate(refs):
        expected = load_file(ref / peft_format.WEIGHTS_NAME)
        if tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors):
            assert config == json.loads((ref / peft_format.CONFIG_NAME).read_text())
            return i
    raise AssertionError(f"{path} holds neither complete adapter")


def visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


# --- lorafit.save ---------------------------------------------------------------------------------------------

def test_save_killed_at_random_points_leaves_a_complete_adapter(server, tmp_path):
    refs = saver_adapters(tmp_path)
    outcomes = []
    for seed in range(10):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        target, log = folder / "adapter", folder / "saves.log"
        reply = server(save=dict(refs=refs, target=target, log=log), marker=log,
                       delay=random.Random(seed).uniform(0, 0.3))
        assert reply["killed"], reply["log"]
        saves = log.read_text().split()
        if target.exists():
            outcomes.append((len(saves), which_adapter(target, refs), len(os.listdir(folder)) - 2))
            lorafit.load(saver_model(), target)  # and it loads
        else:
            assert saves == [], "a complete adapter was saved, yet the folder is gone"
        assert visible(folder) <= {"adapter", "saves.log"}  # temp folders of the killed write are hidden
    print("kills (saves completed, adapter found, temp folders left):", *outcomes)
    assert outcomes, "no kill came after a complete save; raise the delays"


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (cleanup included)."""


@pytest.mark.parametrize("crash_before", range(6))
def test_save_crashing_before_each_filesystem_step_keeps_the_old_or_the_new_adapter(crash_before, tmp_path,
                                                                                    monkeypatch):
    """A crash before each of save's steps (weights, config, fsync x2, swap) or after the last one (skipping the
    clean-up): the target holds one complete adapter, the old one until the swap and the new one after it."""
    refs = saver_adapters(tmp_path)
    target = shutil.copytree(refs[0], tmp_path / "out" / "adapter")
    new = lorafit.load(saver_model(), refs[1])
    steps = []

    def step(name, fn):
        def wrapped(*args, **kwargs):
            if len(steps) == crash_before:
                raise Killed(name)
            steps.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(peft_format, "save_file", step("weights", peft_format.save_file))
    monkeypatch.setattr(pathlib.Path, "write_text", step("config", pathlib.Path.write_text))
    monkeypatch.setattr(os, "fsync", step("fsync", os.fsync))
    monkeypatch.setattr(lfiles, "exchange", step("swap", lfiles.exchange))
    monkeypatch.setattr(lfiles.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    try:
        lorafit.save(new, target)
    except Killed:
        pass
    monkeypatch.undo()
    assert steps[:crash_before] == ["weights", "config", "fsync", "fsync", "swap"][:crash_before]
    assert which_adapter(target, refs) == (1 if crash_before == 5 else 0)
    assert visible(target.parent) == {"adapter"}


def test_save_without_an_atomic_exchange_replaces_the_folder(tmp_path, monkeypatch):
    """Systems without renameat2 (macOS, old kernels) take the two-rename path."""
    monkeypatch.setattr(lfiles, "exchange", lambda a, b: False)
    refs = saver_adapters(tmp_path)
    target = shutil.copytree(refs[0], tmp_path / "out" / "adapter")
    lorafit.save(lorafit.load(saver_model(), refs[1]), target)
    assert which_adapter(target, refs) == 1 and os.listdir(target.parent) == ["adapter"]


# --- lorafit train --------------------------------------------------------------------------------------------

def adapter_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / peft_format.WEIGHTS_NAME)


def assert_checkpoints_complete(out: Path, model_dir: Path) -> list[int]:
    """Every visible checkpoint-N folder holds the three files, a valid adapter and the state of step N."""
    steps = []
    for ckpt in sorted(out.glob("checkpoint-*")):
        assert visible(ckpt) == {peft_format.CONFIG_NAME, peft_format.WEIGHTS_NAME, "trainer_state.pt"}, ckpt
        peft_format.read_adapter(ckpt)
        step = int(ckpt.name.split("-")[1])
        assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["step"] == step
        steps.append(step)
    if steps:  # the newest one loads into the base model
        from transformers import AutoModelForCausalLM
        lorafit.load(AutoModelForCausalLM.from_pretrained(model_dir), out / f"checkpoint-{max(steps)}")
    return sorted(steps)


def check_killed_run_resumes(out: Path, reference: Path, model_dir: Path, resume) -> None:
    steps = assert_checkpoints_complete(out, model_dir)
    assert all(s % 2 == 0 for s in steps)
    code = resume(out)
    assert code == 0
    # the resumed run repeats the uninterrupted run's float32 steps (measured bit-identical): ulps of each adapter
    # value, and of one AdamW step (lr 1e-3) for values near 0
    close(adapter_of(out), adapter_of(reference), rtol=1e-6, atol=1e-8)
    assert assert_checkpoints_complete(out, model_dir) == list(range(2, 13, 2))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    assert json.loads((out / "trainer_state.json").read_text())["finished"]


def test_train_killed_at_random_points_resumes_to_the_uninterrupted_result(server, files, tmp_path):
    model_dir, data = files
    argv = ["train", "--model", model_dir, "--data", data, *TRAIN]
    assert server(argv=[*argv, "--output", tmp_path / "reference"])["exit"] == 0
    # the run's time from writing config.yaml (the earliest point --resume can continue from) to its end
    span, kills = time.time() - (tmp_path / "reference" / "config.yaml").stat().st_mtime, []
    for seed in range(3):
        out = tmp_path / f"killed{seed}"
        reply = server(argv=[*argv, "--output", out], marker=out / "config.yaml",
                       delay=random.Random(seed).uniform(0, 1.1 * span))
        assert reply["killed"] or reply["exit"] == 0, reply["log"]
        kills.append((seed, reply["killed"], sorted(p.name for p in out.iterdir())))
        check_killed_run_resumes(out, tmp_path / "reference", model_dir,
                                 lambda o: server(argv=["train", "--resume", o, "--quiet"])["exit"])
    print("kills (seed, killed, files left):", *kills, sep="\n  ")
    assert any(killed for _, killed, _ in kills), "every run ended before its kill; the delays are too long"


@pytest.mark.slow
def test_train_processes_killed_at_random_points_resume_to_the_uninterrupted_result(files, tmp_path):
    """The same, with real `python -m lorafit train` processes killed at random times after they start."""
    model_dir, data = files
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def lorafit_cli(*args):
        return subprocess.Popen([sys.executable, "-m", "lorafit", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)

    t0 = time.time()
    argv = ["train", "--model", model_dir, "--data", data, *TRAIN]
    assert lorafit_cli(*argv, "--output", tmp_path / "reference").wait(timeout=600) == 0
    span = time.time() - t0
    for seed in range(4):
        out = tmp_path / f"killed{seed}"
        proc = lorafit_cli(*argv, "--output", out)
        time.sleep(random.Random(seed).uniform(0.3, 1.0) * span)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / "config.yaml").exists():  # killed while starting: nothing was written, nothing to resume
            assert not out.exists() or visible(out) == set()
            continue
        check_killed_run_resumes(out, tmp_path / "reference", model_dir,
                                 lambda o: lorafit_cli("train", "--resume", o, "--quiet").wait(timeout=600))


@pytest.mark.slow
def test_save_processes_killed_at_random_points_leave_a_complete_adapter(tmp_path):
    refs = saver_adapters(tmp_path)
    child = (f"import torch, lorafit; torch.set_num_threads(1); m = [lorafit.load({SAVER_MODEL}, r) for r in "
             f"{[str(r) for r in refs]!r}]\nprint('go', flush=True)\n"
             "i = 0\nwhile True:\n    lorafit.save(m[i % 2], {target!r}); i += 1\n")
    for seed in range(5):
        target = tmp_path / f"s{seed}" / "adapter"
        proc = subprocess.Popen([sys.executable, "-c", child.format(target=str(target))], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "go"
        time.sleep(random.Random(seed).uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        which_adapter(target, refs)


# --- a full disk --------------------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_save_on_a_full_disk_names_the_folder_and_keeps_the_previous_adapter(failing, tmp_path, monkeypatch):
    refs = saver_adapters(tmp_path)
    target = shutil.copytree(refs[0], tmp_path / "out" / "adapter")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    new = lorafit.load(saver_model(), refs[1])
    monkeypatch.setattr(*((peft_format, "save_file", _enospc) if failing == "weights" else
                          (pathlib.Path, "write_text", _enospc)))
    with pytest.raises(OSError) as info:
        lorafit.save(new, target)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert f"could not write {target}" in str(info.value) and "No space left on device" in str(info.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert os.listdir(target.parent) == ["adapter"]  # the temp folder is gone too


@pytest.fixture
def tmpfs(tmp_path):
    """A mounted tmpfs of 256 KiB (skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the patched-writer tests cover it")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def resize(tmpfs: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(tmpfs)], check=True)


def test_save_on_a_real_full_tmpfs(tmpfs):
    small = lorafit.attach(saver_model(), LoraConfig(r=1, target_modules=["0"]))
    target = lorafit.save(small, tmpfs / "adapter")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    big = lorafit.attach(saver_model(), LoraConfig(**SAVER_CONFIG))  # 0.5 MB: does not fit
    with pytest.raises(OSError) as info:
        lorafit.save(big, target)
    assert info.value.errno == errno.ENOSPC and f"could not write {target}" in str(info.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert os.listdir(tmpfs) == ["adapter"]
    lorafit.load(saver_model(), target)


def test_training_on_a_real_full_tmpfs_keeps_its_checkpoints_and_resumes_once_there_is_room(files, tmpfs, capsys):
    model_dir, data = files
    out = tmpfs / "run"
    code, err = run_train(capsys, "train", "--model", model_dir, "--data", data, "--output", out, *TRAIN)
    assert code == 1 and "could not write" in err and "Traceback" not in err
    written = assert_checkpoints_complete(out, model_dir)
    assert written and written == list(range(2, 2 * len(written) + 1, 2))
    assert not any(p.startswith(".") for p in os.listdir(out))
    resize(tmpfs, "4m")  # room again
    assert run_train(capsys, "train", "--resume", out, "--quiet")[0] == 0
    assert assert_checkpoints_complete(out, model_dir) == list(range(2, 13, 2))


def run_train(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_resume_completes(files, tmp_path, monkeypatch,
                                                                               capsys):
    model_dir, data = files
    out = tmp_path / "run"
    real, calls = peft_format.save_file, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        return _enospc() if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(peft_format, "save_file", second_fails)  # io writes every adapter file, checkpoints' too
    code, err = run_train(capsys, "train", "--model", model_dir, "--data", data, "--output", out, *TRAIN)
    monkeypatch.undo()
    assert code == 1
    assert f"could not write {out / 'checkpoint-4'}" in err and "No space left on device" in err
    assert assert_checkpoints_complete(out, model_dir) == [2]
    assert not any(p.startswith(".") for p in os.listdir(out))  # no temp folder left behind
    assert not (out / peft_format.WEIGHTS_NAME).exists()
    assert run_train(capsys, "train", "--resume", out, "--quiet")[0] == 0
    assert json.loads((out / "trainer_state.json").read_text())["finished"]


def test_full_disk_at_the_final_adapter_keeps_the_checkpoints_and_resume_completes(files, tmp_path, monkeypatch,
                                                                                   capsys):
    model_dir, data = files
    out = tmp_path / "run"
    real = peft_format.save_file

    def final_adapter_fails(tensors, filename, *args, **kwargs):  # checkpoints are written inside their own folder
        return _enospc() if Path(filename).parent == out else real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft_format, "save_file", final_adapter_fails)
    code, err = run_train(capsys, "train", "--model", model_dir, "--data", data, "--output", out, *TRAIN)
    monkeypatch.undo()
    assert code == 1 and f"could not write {out / peft_format.WEIGHTS_NAME}" in err
    assert assert_checkpoints_complete(out, model_dir) == list(range(2, 13, 2))
    assert not any(p.startswith(".") for p in os.listdir(out)) and not (out / "trainer_state.json").exists()
    assert run_train(capsys, "train", "--resume", out, "--quiet")[0] == 0
    peft_format.read_adapter(out)


# --- non-finite losses --------------------------------------------------------------------------------------

def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(files, tmp_path, monkeypatch, capsys):
    model_dir, data = files
    out, real, calls = tmp_path / "run", ltrain.token_loss_sum, []

    def nan_at_step_5(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(ltrain, "token_loss_sum", nan_at_step_5)
    code, err = run_train(capsys, "train", "--model", model_dir, "--data", data, "--output", out, *TRAIN)
    assert code == 1
    assert "loss became nan at step 5" in err and f"the last good checkpoint is {out / 'checkpoint-4'}" in err
    assert assert_checkpoints_complete(out, model_dir) == [2, 4]  # finite (read_adapter checks) and loadable
    assert not (out / peft_format.WEIGHTS_NAME).exists() and not (out / "trainer_state.json").exists()


class NanGradient(torch.autograd.Function):
    """The loss unchanged forward, NaN gradients backward (an overflow in backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradients_never_reach_a_checkpoint(files, tmp_path, monkeypatch, capsys):
    model_dir, data = files
    out, real, calls = tmp_path / "run", ltrain.token_loss_sum, []

    def nan_grad_at_step_4(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return NanGradient.apply(loss) if len(calls) == 4 else loss

    monkeypatch.setattr(ltrain, "token_loss_sum", nan_grad_at_step_4)
    code, err = run_train(capsys, "train", "--model", model_dir, "--data", data, "--output", out, *TRAIN)
    assert code == 1 and "step 4" in err
    assert_checkpoints_complete(out, model_dir)  # today: checkpoint-4 holds NaN (AdapterError)


def test_resume_after_a_torn_metrics_line(files, tmp_path, capsys):
    model_dir, data = files
    out = tmp_path / "run"
    assert run_train(capsys, "train", "--model", model_dir, "--data", data, "--output", out, *TRAIN)[0] == 0
    (out / "trainer_state.json").unlink()  # as if killed before the end, after a torn write:
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "lo')
    assert run_train(capsys, "train", "--resume", out, "--quiet")[0] == 0
