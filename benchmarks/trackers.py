"""What --report-to costs: start both trackers (TensorBoard, MLflow on a fresh SQLite store), send the default job's
pattern (100 steps read back every 10: ten calls of ten records) and an evaluation, finish.

    python benchmarks/trackers.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    out = Path(tempfile.mkdtemp())
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"
    from lorafit.train import trackers
    from lorafit.train.train_config import TrainConfig

    t = time.perf_counter()
    rep = trackers.start(("tensorboard", "mlflow"), out, trackers.run_params(TrainConfig(), 1000, 100000), print)
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
    rep.finish("FINISHED")
    print(f"start {started * 1e3:.0f} ms; per read interval (10 steps): median {statistics.median(times) * 1e3:.1f} "
          f"ms, max {max(times) * 1e3:.1f} ms; an evaluation {evaluation * 1e3:.1f} ms; finish "
          f"{(time.perf_counter() - t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
