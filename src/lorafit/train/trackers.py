"""Experiment trackers (``--report-to``, YAML ``report_to``): a run's metrics, settings and files, sent through each
tracker's own library (``pip install 'lorafit[track]'``).

- ``tensorboard``: event files in the run folder's ``tensorboard/`` (``torch.utils.tensorboard``), with the LoRA
  settings and the final eval metrics in TensorBoard's HPARAMS tab; open them with ``tensorboard --logdir RUN``
  (a sweep's or a study's folder shows every run in it).
- ``mlflow``: one MLflow run named after the run folder, in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default
  "lorafit"), at ``MLFLOW_TRACKING_URI`` (MLflow's default otherwise): the settings as parameters, the metrics with
  their steps, ``report.png`` and the adapter folder as artifacts, FINISHED, FAILED or KILLED at the end.
- ``wandb``: one W&B run in ``WANDB_PROJECT`` (default "lorafit"), its local files in ``RUN/wandb``;
  ``WANDB_MODE=offline`` keeps it on the machine (``wandb sync`` uploads it later). The adapter is a model artifact.
- ``trackio``: one trackio run in the project ``TRACKIO_PROJECT`` (default "lorafit"), in trackio's local store
  (``TRACKIO_DIR``, trackio's default otherwise); ``trackio show --project lorafit`` opens it.

What a run sends: every step's loss, learning rate and gradient norm (when the loop reads them back from the device,
every ``--log-every`` steps: reporting adds no read of its own), every evaluation (before, during and after
training), the settings (LoRA's fields named as in ``adapter_config.json``, the training settings as in
``config.yaml``) and the trainable and total parameter counts. Only rank 0 reports. A tracker that fails (its
server gone, a full disk) is warned about once and dropped; training and ``metrics.jsonl`` go on. A resumed run
continues the MLflow and W&B runs it started (their ids are kept in the run folder's ``trackers.json``); steps
before the resume point are not sent again.

A tune trial or a sweep point is one run of a ``Group``: a child of the study's or sweep's MLflow parent run, in the
W&B and trackio group named after it, its outcome (complete, pruned, failed) marked on the run (``StudyRuns``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError
from ..files import read_json, write_json

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
INSTALL = {"tensorboard": ("tensorboard", "pip install tensorboard"),
           "mlflow": ("mlflow", "pip install mlflow-skinny sqlalchemy alembic"),
           "wandb": ("wandb", "pip install wandb"),
           "trackio": ("trackio", "pip install trackio")}
STATE_FILE = "trackers.json"  # the run ids a resumed run continues
OUTCOMES = ("complete", "pruned", "failed", "killed")
MLFLOW_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "killed": "KILLED"}


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


@dataclass
class Group:
    """The tune study or sweep a run is one trial of (``StudyRuns.group``); JSON in a tune trial's folder."""

    name: str  # the study's or sweep's name: the W&B and trackio group, the MLflow parent run's name
    run_name: str  # this run's name in every tracker, e.g. "trial-0003" or a sweep point's name
    kind: str = "sweep"  # "tune" | "sweep"
    mlflow_parent: Optional[str] = None  # the parent run's id
    tags: dict = field(default_factory=dict)  # e.g. {"trial": "3"}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Group":
        return cls(**d)


class TensorBoard:
    """Scalars ``train/loss``, ``train/learning_rate``, ``train/grad_norm`` and ``eval/<metric>``, the settings as
    text, and at the end the LoRA settings with the final eval metrics in the HPARAMS tab, in ``RUN/tensorboard``."""

    name = "tensorboard"

    def __init__(self, out: Path, params: dict, state: dict, group: Optional[Group]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.params, self.last_eval = params, {}
        rows = "\n".join(f"| {k} | {_plain(v)} |" for k, v in params.items())
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + rows, 0)

    def log(self, records) -> None:
        for record in records:
            for key, value in metrics(record).items():
                self.writer.add_scalar(key, value, record["step"])
                if key.startswith("eval/"):
                    self.last_eval[key] = value

    def finish(self, outcome: str, out: Path) -> None:
        from torch.utils.tensorboard.summary import hparams

        if outcome != "complete":
            self.writer.add_text("outcome", outcome, 0)
        shown = {k: v if isinstance(v, (int, float, str, bool)) else _plain(v) for k, v in self.params.items()
                 if v is not None and k in HPARAMS}
        final = {f"final/{k.removeprefix('eval/')}": v for k, v in self.last_eval.items()}
        for summary in hparams({**shown, "outcome": outcome}, final):  # HPARAMS: one row per run, sortable
            self.writer.file_writer.add_summary(summary)
        for key, value in final.items():
            self.writer.add_scalar(key, value, 0)
        self.writer.close()


# the settings a HPARAMS row shows (TensorBoard's table takes scalars: lists go in as JSON text)
HPARAMS = ("r", "lora_alpha", "target_modules", "target_parameters", "use_dora", "use_rslora", "lr", "steps",
           "batch_size", "seed", "trainable_parameters")


class MLflow:
    """One MLflow run per lorafit run (continued on resume), through ``MlflowClient``; a trial's is a child of its
    study's parent run."""

    name = "mlflow"

    def __init__(self, out: Path, params: dict, state: dict, group: Optional[Group]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        run_id = state.get("mlflow")
        if run_id is None:
            tags = {}
            if group is not None:
                tags = {f"lorafit.{k}": str(v) for k, v in group.tags.items()}
                tags[f"lorafit.{group.kind}"] = group.name
                if group.mlflow_parent:
                    tags["mlflow.parentRunId"] = group.mlflow_parent
            run_id = self.client.create_run(mlflow_experiment(self.client), run_name=run_name(out, group),
                                            tags=tags).info.run_id
            _log_params(self.client, run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = state["mlflow"] = run_id

    def log(self, records) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "_"), v, now, r["step"])
                                                    for r in records for k, v in metrics(r).items()])

    def finish(self, outcome: str, out: Path) -> None:
        try:
            self.client.set_tag(self.run_id, "lorafit.outcome", outcome)
            if outcome == "complete":
                if (out / "report.png").is_file():
                    self.client.log_artifact(self.run_id, str(out / "report.png"))
                for f in adapter_files(out):
                    self.client.log_artifact(self.run_id, str(f), artifact_path="adapter")
        finally:  # an artifact store that fails must not leave the run RUNNING
            self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[outcome])


def _log_params(client, run_id: str, params: dict) -> None:
    """The run's parameters; a run whose parameters cannot be sent ends FAILED rather than left RUNNING."""
    from mlflow.entities import Param

    try:
        client.log_batch(run_id, params=[Param(k, _plain(v)[:6000]) for k, v in params.items() if v is not None])
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise


def mlflow_experiment(client) -> str:
    """The id of ``MLFLOW_EXPERIMENT_NAME`` (default "lorafit"), created when absent."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorafit"
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def adapter_files(out: Path) -> list[Path]:
    return [out / f for f in ("adapter_config.json", "adapter_model.safetensors") if (out / f).is_file()]


def run_name(out: Path, group: Optional[Group]) -> str:
    return group.run_name if group is not None else out.name


class WandB:
    """One W&B run (``WANDB_PROJECT``, default "lorafit"; ``WANDB_MODE`` as W&B reads it), its files in
    ``RUN/wandb``, resumed by its id; the adapter is a model artifact, ``report.png`` a file of the run."""

    name = "wandb"

    def __init__(self, out: Path, params: dict, state: dict, group: Optional[Group]) -> None:
        import wandb

        run_id = state.get("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lorafit", dir=str(out),
                              name=run_name(out, group), id=run_id, resume="allow" if run_id else None,
                              config=params, group=group.name if group else None,
                              job_type=group.kind if group else "train", reinit="create_new")
        state["wandb"] = self.run.id

    def log(self, records) -> None:
        for record in records:
            self.run.log(metrics(record), step=record["step"])

    def finish(self, outcome: str, out: Path) -> None:
        import wandb

        try:
            self.run.summary["outcome"] = outcome
            if outcome != "complete":
                self.run.tags = (*self.run.tags, outcome)
            if outcome == "complete":
                if (out / "report.png").is_file():
                    self.run.save(str(out / "report.png"), base_path=str(out), policy="now")
                artifact = wandb.Artifact(f"adapter-{self.run.id}", type="model")
                for f in adapter_files(out):
                    artifact.add_file(str(f))
                self.run.log_artifact(artifact)
        finally:
            self.run.finish(exit_code=0 if outcome in ("complete", "pruned") else 1)


class Trackio:
    """One trackio run in ``TRACKIO_PROJECT`` (default "lorafit"), in trackio's local store, named after the run
    folder (with "-2", "-3", ... when the project has a run of that name); an outcome other than complete is a
    trackio alert on the run."""

    name = "trackio"

    def __init__(self, out: Path, params: dict, state: dict, group: Optional[Group]) -> None:
        import trackio

        project = os.environ.get("TRACKIO_PROJECT") or "lorafit"
        name = state.get("trackio")  # a resumed run continues the run it named
        resumed = name is not None
        if name is None:  # trackio resumes by name: a new run takes a name no run of the project has
            name = run_name(out, group)
            try:
                taken = set(trackio.SQLiteStorage.get_runs(project))
            except Exception:  # noqa: BLE001 - a store trackio cannot list: keep the name
                taken = set()
            base, n = name, 2
            while name in taken:
                name, n = f"{base}-{n}", n + 1
        self.run = trackio.init(project=project, name=name, group=group.name if group else None, config=params,
                                embed=False, space_id=os.environ.get("TRACKIO_SPACE_ID") or None,
                                resume="allow" if resumed else "never", auto_log_cpu=False, auto_log_gpu=False)
        state["trackio"] = name

    def log(self, records) -> None:
        for record in records:
            self.run.log(metrics(record), step=record["step"])

    def finish(self, outcome: str, out: Path) -> None:
        try:
            if outcome != "complete":
                self.run.alert(f"run {outcome}", f"{self.run.name}: {outcome}")
        finally:
            self.run.finish()


CLASSES = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}


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


def warn_failed(say: Callable[[str], None], name: str, e: BaseException, what: str) -> None:
    first = (str(e).splitlines() or [""])[0][:200]
    say(f"warning: --report-to {name} failed ({type(e).__name__}: {first}); {what}")


class Reporting:
    """The run's trackers, fanned out; a tracker that raises is warned about once (``say``) and dropped."""

    def __init__(self, names: tuple[str, ...], out: Path, params: dict, say: Callable[[str], None],
                 group: Optional[Group] = None) -> None:
        self.out, self.say, self.live = out, say, []
        self.state = read_json(out / STATE_FILE) if (out / STATE_FILE).is_file() else {}
        for name in names:
            self._call(name, lambda: self.live.append(CLASSES[name](out, params, self.state, group)))
        write_json(out / STATE_FILE, self.state)

    def _call(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # a tracker must never end the run
            self.live = [t for t in self.live if t.name != name]
            warn_failed(self.say, name, e, "training goes on without it, metrics.jsonl keeps everything")

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

    def finish(self, outcome: str) -> None:
        """End every tracker's run: "complete", "pruned" (a tune trial its study stopped), "failed" or "killed"."""
        live, self.live = self.live, []  # once: a second finish (a late stop signal) finds none
        for tracker in live:
            self._call(tracker.name, lambda t=tracker: t.finish(outcome, self.out))


def start(names: tuple[str, ...], out: Path, params: dict, say: Callable[[str], None],
          group: Optional[Group] = None) -> Optional[Reporting]:
    return Reporting(names, out, params, say, group) if names else None


class StudyRuns:
    """The parent of a tune study's or a sweep's runs. MLflow nests runs, so the study gets a parent run (named after
    its output folder; its id in ``FOLDER/trackers.json``, continued by a rerun); W&B and trackio group the runs by
    the study's name; TensorBoard shows each run's folder under the study's. ``mark`` records how a trial process
    ended where the process itself could not (killed); ``finish`` sends the study's result files."""

    def __init__(self, names: tuple[str, ...], folder: Path, kind: str, params: dict,
                 say: Callable[[str], None], parent: Optional[str] = None, key: str = "") -> None:
        self.names, self.folder, self.kind, self.say = names, Path(folder), kind, say
        self.name = self.folder.resolve().name
        self.client, self.parent = None, None
        if "mlflow" not in names:
            return
        try:
            from mlflow.tracking import MlflowClient

            state = read_json(self.folder / STATE_FILE) if (self.folder / STATE_FILE).is_file() else {}
            self.client = MlflowClient()
            # the parent of this study (``key``: tune's study name), not of another study in the same folder
            self.parent = parent or (state.get("mlflow") if state.get("key", "") == key else None)
            if self.parent is None:
                self.parent = self.client.create_run(mlflow_experiment(self.client), run_name=self.name,
                                                     tags={f"lorafit.{kind}": self.name}).info.run_id
                _log_params(self.client, self.parent, params)
                write_json(self.folder / STATE_FILE, {"mlflow": self.parent, "key": key})
            else:
                self.client.update_run(self.parent, status="RUNNING")
        except Exception as e:  # the study goes on; its trials still report by themselves
            warn_failed(say, "mlflow", e, f"the {kind}'s parent run is left out")
            self.client = self.parent = None

    def group(self, run_name: str, **tags) -> Group:
        return Group(self.name, run_name, self.kind, self.parent, {k: str(v) for k, v in tags.items()})

    def mark(self, run_folder: Path, outcome: str) -> None:
        """A trial's MLflow run that its process left RUNNING (the process was killed) ends as ``outcome``."""
        state_file = Path(run_folder) / STATE_FILE
        if self.client is None or not state_file.is_file():
            return
        try:
            run_id = read_json(state_file).get("mlflow")
            if run_id and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_tag(run_id, "lorafit.outcome", outcome)
                self.client.set_terminated(run_id, status=MLFLOW_STATUS[outcome])
        except Exception as e:
            warn_failed(self.say, "mlflow", e, f"{run_folder} is left as it was")

    def finish(self, files: list[Path], best: Optional[float], outcome: str = "complete") -> None:
        """The parent run gets the study's best eval loss and its result files, and ends."""
        if self.client is None:
            return
        try:
            if best is not None and math.isfinite(best):
                self.client.log_metric(self.parent, "best_eval_loss", best)
            for f in files:
                if Path(f).is_file():
                    self.client.log_artifact(self.parent, str(f))
        except Exception as e:
            warn_failed(self.say, "mlflow", e, "the parent run's results are left out")
        finally:
            try:
                self.client.set_terminated(self.parent, status=MLFLOW_STATUS[outcome])
            except Exception as e:
                warn_failed(self.say, "mlflow", e, "the parent run is left running")
