"""--report-to: TensorBoard and MLflow read back with their own readers (EventAccumulator, MlflowClient on SQLite),
bad names and missing libraries refused before any work, a failing tracker that never stops training, and a resume
that continues the same MLflow run without sending a step twice."""

from __future__ import annotations

import json

import pytest

from lorafit.cli import main
from lorafit.errors import ConfigError
from lorafit.train import trackers

FAST = ["--steps", "6", "--batch-size", "4", "--eval-max", "8", "--eval-every", "3", "--log-every", "2", "--quiet"]




@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lorafit-tests")
    # artifacts in tmp_path: a SQLite store's default artifact root is ./mlruns in the working directory
    MlflowClient(uri).create_experiment("lorafit-tests", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


def mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lorafit-tests")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_report_to_names():
    assert trackers.parse_report_to("none") == () and trackers.parse_report_to(None) == ()
    assert trackers.parse_report_to("mlflow, tensorboard,mlflow") == ("mlflow", "tensorboard")
    assert trackers.parse_report_to(["tensorboard"]) == ("tensorboard",)
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; choose from tensorboard, mlflow"):
        trackers.parse_report_to("tensorbord")
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        trackers.parse_report_to("none,mlflow")


def test_tensorboard_and_mlflow_read_back_with_their_own_readers(model_dir, data, tmp_path, mlflow_uri):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--report-to",
                 "tensorboard,mlflow", *FAST]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if m.get("kind") != "eval"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert len(events.Scalars("train/learning_rate")) == 6
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 3, 6]

    client, run = mlflow_run(mlflow_uri, "run")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in history] == pytest.approx(losses, rel=1e-6)
    params = run.data.params
    assert params["r"] == "8" and params["lora_alpha"] == "16" and params["target_modules"] == '["q_proj", "v_proj"]'
    assert params["steps"] == "6" and int(params["trainable_parameters"]) > 0
    assert {f.path for f in client.list_artifacts(run.info.run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}


def test_bad_names_and_missing_libraries_exit_2_before_any_work(model_dir, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--report-to",
                 "wandbb", *FAST]) == 2
    assert "unknown tracker 'wandbb'" in capsys.readouterr().err and not out.exists()
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--report-to",
                 "mlflow", *FAST]) == 2
    err = capsys.readouterr().err
    assert "the mlflow library is not installed; pip install mlflow-skinny" in err and not out.exists()


def test_a_failing_tracker_never_stops_training(model_dir, data, tmp_path, mlflow_uri, capsys, monkeypatch):
    def broken(self, records):
        raise ConnectionError("tracking server gone")

    monkeypatch.setattr(trackers.MLflow, "log", broken)
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--report-to",
                 "mlflow", *FAST]) == 0
    err = capsys.readouterr().err
    assert err.count("--report-to mlflow failed (ConnectionError: tracking server gone)") == 1
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 3, 4, 5, 6, 6]  # every step and evaluation, as without a tracker
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_continues_the_same_mlflow_run_without_repeating_steps(model_dir, data, tmp_path, mlflow_uri,
                                                                      monkeypatch):
    from lorafit.train import loop

    out = tmp_path / "run"
    real = loop.log_steps

    def dies_after_sending_step_six(state, records, bar):  # steps 5 and 6 reach MLflow; checkpoint-4 is kept
        real(state, records, bar)
        if any(r["step"] >= 5 for r in records):
            raise RuntimeError("killed")

    monkeypatch.setattr(loop, "log_steps", dies_after_sending_step_six)
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--report-to",
                 "mlflow", "--save-every", "4", *FAST]) != 0  # "killed" after checkpoint-4
    client, run = mlflow_run(mlflow_uri, "run")
    assert run.info.status == "FAILED"
    monkeypatch.setattr(loop, "log_steps", real)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    client, again = mlflow_run(mlflow_uri, "run")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    # the resumed run re-ran steps 5 and 6 from checkpoint-4 and did not send them again
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, 3, 6]
