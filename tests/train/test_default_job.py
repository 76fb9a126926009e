"""The embedded default: `lorafit train` with no arguments on SmolLM2-135M-Instruct and the VADER reviews, in
bfloat16 where the CPU has bf16 instructions that time faster than float32 (float32 elsewhere), and what a bfloat16
run does where bf16 is slow."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

import lorafit.hf as hf
import lorafit.train.loop as loop
import lorafit.train.train_config as train_config
from helpers import make_data, make_model_dir, run_cli
from lorafit.cli import build_parser
from lorafit.cli.train import train_settings

pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE = (True, "the CPU has avx512_bf16")
EMULATED = (False, "the CPU has no avx512_bf16/amx_bf16 (x86) or bf16 (Arm) instructions")


@pytest.mark.slow
def test_default_run_improves_accuracy_by_15_points(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lorafit", "train", "--quiet"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=1800)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0
    (run,) = (tmp_path / "runs").iterdir()
    state = json.loads((run / "trainer_state.json").read_text())
    before, after = state["before"]["eval_accuracy"], state["after"]["eval_accuracy"]
    print(f"zero-shot {before:.3f} -> fine-tuned {after:.3f} in {state['wall_time_s']} s")
    assert after - before >= 0.15
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "report.png"):
        assert (run / name).is_file()
    native, why = hf.native_bf16("cpu")
    dtype = yaml.safe_load((run / "config.yaml").read_text())["dtype"]  # bfloat16 also needs bf16 to time faster
    assert dtype == "float32" if not native else dtype in ("bfloat16", "float32")
    assert f"dtype {dtype}: {why}" in r.stderr  # --quiet: the log lines go to stderr
    assert native == (dtype == "bfloat16" or "bf16 matmuls run only" in r.stderr)  # float32 with bf16: timed slow


def settings_of(*argv, native=NATIVE, speed=2.3, monkeypatch):
    monkeypatch.setattr(train_config, "native_bf16", lambda device="cpu": native)
    monkeypatch.setattr(train_config, "bf16_speed", speed if callable(speed) else lambda: speed)
    return train_settings(build_parser().parse_args(["train", *map(str, argv)]))


def test_the_default_job_runs_in_bfloat16_on_a_cpu_with_fast_bf16(monkeypatch):
    settings, note = settings_of(monkeypatch=monkeypatch)  # an EPYC measured 2.3
    assert settings["dtype"] == "bfloat16"
    assert note == ("dtype bfloat16: the CPU has avx512_bf16 and its bf16 matmuls run 2.3x as fast as float32 (timed "
                    "now); the default job reaches float32's accuracy in bfloat16 (--dtype float32 for the float32 "
                    "run)")


@pytest.mark.parametrize("speed, why_not", [(0.55, "so float32 is faster"),
                                            (1.2, "under the 1.25x that bfloat16 needs here")])
def test_the_default_job_stays_float32_where_bf16_instructions_time_slow(speed, why_not, monkeypatch):
    # an Intel Xeon with avx512_bf16 but no AMX: 0.55x float32, and the job took 202 s against 111 s
    settings, note = settings_of(speed=speed, monkeypatch=monkeypatch)
    assert settings["dtype"] == "float32"
    assert note == (f"dtype float32: the CPU has avx512_bf16, but its bf16 matmuls run only {speed:.2g}x as fast as "
                    f"float32 (timed now), {why_not} (--dtype bfloat16 for the bfloat16 run)")


def no_timing():
    raise AssertionError("bf16 was timed where the dtype is decided without timing")


def test_a_multi_process_default_job_stays_float32_untimed(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    settings, note = settings_of(speed=no_timing, monkeypatch=monkeypatch)
    assert settings["dtype"] == "float32"
    assert note == ("dtype float32: the CPU has avx512_bf16, but under torchrun each rank would time bf16 separately "
                    "and the ranks could pick different dtypes (--dtype bfloat16 for the bfloat16 run)")


def test_the_bf16_speed_is_timed_only_where_the_cpu_has_bf16(monkeypatch):
    monkeypatch.setattr(train_config, "native_bf16", lambda device="cpu": EMULATED)
    monkeypatch.setattr(train_config, "bf16_speed", no_timing)
    assert train_config.default_dtype(demo=True, quantize=None)[0] == "float32"
    assert train_config.default_dtype(demo=False, quantize="nf4")[0] == "bfloat16"


def test_the_default_job_stays_float32_without_bf16(monkeypatch):
    settings, note = settings_of(native=EMULATED, monkeypatch=monkeypatch)
    assert settings["dtype"] == "float32"
    assert note == f"dtype float32: {EMULATED[1]}, so bfloat16 would be emulated and slower"


@pytest.mark.parametrize("how", ["flag", "config"])
def test_a_named_dtype_always_wins(how, tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("dtype: float32\nsteps: 3\n")
    argv = ["--dtype", "float32"] if how == "flag" else ["--config", tmp_path / "c.yaml"]
    for extra in ([], ["--quantize", "nf4"]):
        settings, note = settings_of(*argv, *extra, monkeypatch=monkeypatch)
        assert settings["dtype"] == "float32" and note == ""


def test_a_run_of_your_own_model_keeps_float32_unless_quantized(tmp_path, monkeypatch):
    settings, note = settings_of("--model", tmp_path, monkeypatch=monkeypatch)
    assert "dtype" not in settings and note == ""  # TrainConfig's float32
    settings, note = settings_of("--model", tmp_path, "--quantize", "int8", native=EMULATED, monkeypatch=monkeypatch)
    assert settings["dtype"] == "bfloat16" and note.startswith("dtype bfloat16: int8 base weights with bfloat16 "
                                                               "compute, QLoRA's recipe")


def test_native_bf16_reads_the_cpu_flags_and_onednn_limit(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(hf, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert hf.native_bf16("cpu") == (True, "the CPU has avx512_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN then emulates bf16 (~40x slower measured here)
    assert hf.native_bf16("cpu")[0] is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert hf.native_bf16("cpu")[0] is True
    monkeypatch.setattr(hf, "_cpu_flags", lambda: {"avx2", "avx512f"})  # AVX-512 without BF16
    assert hf.native_bf16("cpu") == (False, EMULATED[1])


def test_bf16_speed_is_quick():
    t0 = time.perf_counter()
    ratio = hf.bf16_speed()
    assert time.perf_counter() - t0 < 0.3 and ratio > 0  # 5-10 ms here, 80 ms with ONEDNN_MAX_CPU_ISA=AVX2


def test_bfloat16_without_bf16_instructions_warns_with_the_measured_speed_and_trains(tmp_path, monkeypatch,
                                                                                      capsys):
    model, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl", n=16)
    monkeypatch.setattr(loop, "native_bf16", lambda device="cpu": EMULATED)
    monkeypatch.setattr(loop, "bf16_speed", lambda: 0.4)  # what an emulating CPU measures (0.02-0.4)
    code, out, err = run_cli(capsys, "train", "--model", model, "--data", data, "--output", tmp_path / "run",
                             "--steps", "1", "--batch-size", "4", "--max-length", "32", "--dtype", "bfloat16")
    assert code == 0, err
    assert (f"warning: dtype bfloat16, but {EMULATED[1]}: bf16 matmuls run 0.4x as fast as fp32 here; --dtype "
            "float32 is likely faster") in out
    assert (tmp_path / "run" / "trainer_state.json").is_file()


def test_bfloat16_with_slow_bf16_instructions_warns_with_the_measured_speed(tmp_path, monkeypatch, capsys):
    model, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl", n=16)
    monkeypatch.setattr(loop, "native_bf16", lambda device="cpu": NATIVE)
    monkeypatch.setattr(loop, "bf16_speed", lambda: 0.55)  # avx512_bf16 without AMX on an Intel Xeon
    code, out, err = run_cli(capsys, "train", "--model", model, "--data", data, "--output", tmp_path / "run",
                             "--steps", "1", "--batch-size", "4", "--max-length", "32", "--dtype", "bfloat16")
    assert code == 0, err
    assert ("warning: dtype bfloat16, but bf16 matmuls run 0.55x as fast as float32 here (the CPU has avx512_bf16, "
            "but its bf16 kernels are slower than float32's); --dtype float32 is likely faster") in out


def test_bfloat16_with_fast_bf16_instructions_says_nothing(tmp_path, monkeypatch, capsys):
    model, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl", n=16)
    monkeypatch.setattr(loop, "native_bf16", lambda device="cpu": NATIVE)
    monkeypatch.setattr(loop, "bf16_speed", lambda: 2.3)
    code, out, err = run_cli(capsys, "train", "--model", model, "--data", data, "--output", tmp_path / "run",
                             "--steps", "1", "--batch-size", "4", "--max-length", "32", "--dtype", "bfloat16")
    assert code == 0, err
    assert "warning" not in out + err
