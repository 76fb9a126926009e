"""The embedded default: `lorafit train` with no arguments on SmolLM2-135M-Instruct and the VADER reviews."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
