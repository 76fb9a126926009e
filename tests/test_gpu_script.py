"""benchmarks/gpu.py, issue 32's GPU acceptance script, in its CPU mode (``--device cpu --quick``): the same code a
GPU run goes through, so the script cannot rot between GPU runs. It must exit 0 and print every check's row; on the
CPU only the CUDA-only rows may say n/a (and the quantized steps, where torchao is not installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

# every row the script reports (its ROWS), and what each may say on the CPU
PASS = ["train fp32 = cpu", "train bf16", "fused fp32", "fused bf16", "fused autocast", "eval", "generate", "per_row"]
QUANT = ["nf4 step", "int8 step"]
CUDA_ONLY = ["sync-free steps", "peak vs plan"]
MEASURED = [f"bench {shape} {kind}" for shape in ("135m", "1b") for kind in ("floor", "lora", "dora")]


def test_the_gpu_script_runs_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# torch ") and "device cpu" in lines[0]  # the device line comes first
    table = {cells[0].strip(): cells[1].strip() for cells in (line.split(" | ") for line in lines) if len(cells) == 3}
    assert set(table) - {"check"} == set(PASS + QUANT + CUDA_ONLY + MEASURED), table
    assert all(table[name] == "pass" for name in PASS), table
    torchao = importlib.util.find_spec("torchao") is not None
    assert all(table[name] == "pass" if torchao else table[name].startswith("n/a: torchao") for name in QUANT), table
    assert all(table[name].startswith("n/a: ") for name in CUDA_ONLY), table
    assert all(table[name] == "measured" for name in MEASURED), table
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and [r["name"] for r in report["rows"]] == [n for n in table if n != "check"]


def test_an_unknown_check_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "train,bogus"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "bogus" in proc.stderr
