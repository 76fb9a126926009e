"""What --report-to costs: start the trackers (TensorBoard; MLflow on a fresh SQLite store; W&B offline; trackio in
a fresh local store), send the default job's pattern (100 steps read back every 10: ten calls of ten records) and an
evaluation, finish. Each tracker alone, then all of them together, each in a fresh process (the start includes
importing the tracker's library).

    python benchmarks/trackers.py [--report-to tensorboard,mlflow,wandb,trackio]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(names: tuple[str, ...], root: Path) -> str:
    from lorafit.train import trackers
    from lorafit.train.train_config import TrainConfig

    out = Path(tempfile.mkdtemp(dir=root))
    t = time.perf_counter()
    rep = trackers.start(names, out, trackers.run_params(TrainConfig(), 1000, 100000), print)
    started = time.perf_counter() - t
    times = []
    for i in range(10):
        records = [{"step": 10 * i + j, "loss": 1.0 / j, "lr": 1e-3, "grad_norm": 0.5, "elapsed": 1.0}
                   for j in range(1, 11)]
        t = time.perf_counter()
        rep.log(records)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    rep.log([{"step": 100, "kind": "eval", "eval_loss": 0.3, "eval_accuracy": 0.9}])
    evaluation = time.perf_counter() - t
    t = time.perf_counter()
    rep.finish("complete")
    return (f"| {'+'.join(names)} | {started:.1f} s | {statistics.median(times) * 1e3:.1f} ms | "
            f"{max(times) * 1e3:.1f} ms | {evaluation * 1e3:.1f} ms | {(time.perf_counter() - t) * 1e3:.0f} ms |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report-to", default="tensorboard,mlflow,wandb,trackio")
    p.add_argument("--one", help=argparse.SUPPRESS)  # measure these trackers in this process
    args = p.parse_args()
    if args.one:
        print(measure(tuple(args.one.split(",")), Path(os.environ["BENCH_ROOT"])))
        return
    names = args.report_to.split(",")
    rows = []
    for one in names + ([args.report_to] if len(names) > 1 else []):
        root = Path(tempfile.mkdtemp())  # a fresh MLflow store and trackio folder each time
        env = {**os.environ, "BENCH_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
               "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(root / "trackio"),
               "TRACKIO_PROJECT": "lorafit-bench"}
        done = subprocess.run([sys.executable, __file__, "--one", one], env=env, capture_output=True, text=True)
        rows += [line for line in done.stdout.splitlines() if line.startswith("| ")] or [f"| {one} | failed: "
                                                                                         f"{done.stderr[-300:]} |"]
    print("| trackers | start (once per run) | per read interval of 10 steps, median | max | an evaluation | finish |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
