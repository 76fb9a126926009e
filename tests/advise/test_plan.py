"""lorafit plan: its peak-memory estimate against the measured peak RSS of a real lorafit train run (within 25%)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import make_data, make_model_dir


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
    from lorafit.demo.assets import smollm2
    from helpers import WORDS
    import random
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
