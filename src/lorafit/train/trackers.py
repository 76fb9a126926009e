"""Experiment trackers (``--report-to``, YAML ``report_to``): a run's metrics, settings and files, sent through each
tracker's own library (``pip install 'lorafit[track]'``).

- ``tensorboard``: event files in the run folder's ``tensorboard/`` (``torch.utils.tensorboard``); open them with
  ``tensorboard --logdir RUN/tensorboard``.
- ``mlflow``: one MLflow run named after the run folder, in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default
  "lorafit"), at ``MLFLOW_TRACKING_URI`` (MLflow's default otherwise): the settings as parameters, the metrics with
  their steps, ``report.png`` and the adapter folder as artifacts, FINISHED or FAILED at the end.

What a run sends: every step's loss, learning rate and gradient norm (when the loop reads them back from the device,
every ``--log-every`` steps: reporting adds no read of its own), every evaluation (before, during and after
training), the settings (LoRA's fields named as in ``adapter_config.json``, the training settings as in
``config.yaml``) and the trainable and total parameter counts. Only rank 0 reports. A tracker that fails (its
server gone, a full disk) is warned about once and dropped; training and ``metrics.jsonl`` go on. A resumed run
continues the MLflow run it started (its id is kept in the run folder's ``trackers.json``); steps before the resume
point are not sent again.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError
from ..files import read_json, write_json

TRACKERS = ("tensorboard", "mlflow")
INSTALL = {"tensorboard": ("tensorboard", "pip install tensorboard"),
           "mlflow": ("mlflow", "pip install mlflow-skinny sqlalchemy alembic")}
STATE_FILE = "trackers.json"  # the run ids a resumed run continues


def parse_report_to(value) -> tuple[str, ...]:
    """The tracker names of ``--report-to`` ('none', one name, or several comma-separated, or a YAML list)."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if names in ([], ["none"]):
        return ()
    bad = [n for n in names if n not in (*TRACKERS, "none")]
    if bad or "none" in names:
        what = f"unknown tracker {bad[0]!r}" if bad else "'none' cannot be combined with a tracker"
        raise ConfigError(f"report_to: {what}; choose from {', '.join(TRACKERS)} or none (comma-separated for "
                          "several, e.g. --report-to tensorboard,mlflow)")
    return tuple(dict.fromkeys(names))


def check_installed(names: tuple[str, ...]) -> None:
    """Refuse a tracker whose library is missing, with the command that installs it, before any work."""
    for name in names:
        module, command = INSTALL[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name}: the {module} library is not installed; {command} (or "
                              "pip install 'lorafit[track]' for every tracker)")


def run_params(cfg, trainable: int, total: int) -> dict:
    """The parameters a run reports: the training settings as in config.yaml, LoRA's fields as in
    adapter_config.json (r, lora_alpha, target_modules, ...), and the parameter counts."""
    d = cfg.to_dict()
    lora = d.pop("lora")
    return {**d, **lora, "trainable_parameters": trainable, "total_parameters": total}


def _plain(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class TensorBoard:
    """Scalars ``train/loss``, ``train/learning_rate``, ``train/grad_norm`` and ``eval/<metric>``, the settings as
    text, in ``RUN/tensorboard``."""

    name = "tensorboard"

    def __init__(self, out: Path, params: dict, state: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        rows = "\n".join(f"| {k} | {_plain(v)} |" for k, v in params.items())
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + rows, 0)

    def log(self, records) -> None:
        for record in records:
            for key, value in metrics(record).items():
                self.writer.add_scalar(key, value, record["step"])

    def finish(self, status: str, out: Path) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per lorafit run (continued on resume), through ``MlflowClient``."""

    name = "mlflow"

    def __init__(self, out: Path, params: dict, state: dict) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        run_id = state.get("mlflow")
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorafit"
            experiment = self.client.get_experiment_by_name(name)
            exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
            from mlflow.entities import Param

            self.client.log_batch(run_id, params=[Param(k, _plain(v)[:6000]) for k, v in params.items()])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = state["mlflow"] = run_id

    def log(self, records) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "_"), v, now, r["step"])
                                                    for r in records for k, v in metrics(r).items()])

    def finish(self, status: str, out: Path) -> None:
        try:
            if status == "FINISHED":
                if (out / "report.png").is_file():
                    self.client.log_artifact(self.run_id, str(out / "report.png"))
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    if (out / f).is_file():
                        self.client.log_artifact(self.run_id, str(out / f), artifact_path="adapter")
        finally:  # an artifact store that fails must not leave the run RUNNING
            self.client.set_terminated(self.run_id, status=status)


CLASSES = {"tensorboard": TensorBoard, "mlflow": MLflow}


def metrics(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: a step's loss, learning rate and gradient norm, or an evaluation's
    metrics (``eval/...``); None and non-finite values are left out."""
    if record.get("kind") == "eval":
        pairs = {f"eval/{k.removeprefix('eval_')}": v for k, v in record.items() if k not in ("step", "kind")}
    else:
        pairs = {"train/loss": record.get("loss"), "train/learning_rate": record.get("lr"),
                 "train/grad_norm": record.get("grad_norm")}
    return {k: float(v) for k, v in pairs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _sent_key(record: dict) -> str:
    return "sent_eval" if record.get("kind") == "eval" else "sent_step"


class Reporting:
    """The run's trackers, fanned out; a tracker that raises is warned about once (``say``) and dropped."""

    def __init__(self, names: tuple[str, ...], out: Path, params: dict, say: Callable[[str], None]) -> None:
        self.out, self.say, self.live = out, say, []
        self.state = read_json(out / STATE_FILE) if (out / STATE_FILE).is_file() else {}
        for name in names:
            self._call(name, lambda: self.live.append(CLASSES[name](out, params, self.state)))
        write_json(out / STATE_FILE, self.state)

    def _call(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # a tracker must never end the run
            self.live = [t for t in self.live if t.name != name]
            first = (str(e).splitlines() or [""])[0][:200]
            self.say(f"warning: --report-to {name} failed ({type(e).__name__}: {first}); training goes on without "
                     "it, metrics.jsonl keeps everything")

    def log(self, records) -> None:
        """The records of one read interval (or one evaluation), in one call per tracker. A resumed run re-runs the
        steps after its checkpoint: those already sent (``trackers.json`` keeps the last step sent, per kind) are not
        sent again."""
        fresh = [r for r in records if r["step"] > self.state.get(_sent_key(r), -1)]
        if not fresh or not self.live:
            return
        for tracker in list(self.live):
            self._call(tracker.name, lambda t=tracker: t.log(fresh))
        for r in fresh:
            self.state[_sent_key(r)] = r["step"]
        write_json(self.out / STATE_FILE, self.state)

    def finish(self, status: str) -> None:
        for tracker in list(self.live):
            self._call(tracker.name, lambda t=tracker: t.finish(status, self.out))
        self.live = []


def start(names: tuple[str, ...], out: Path, params: dict, say: Callable[[str], None]) -> Optional[Reporting]:
    return Reporting(names, out, params, say) if names else None
