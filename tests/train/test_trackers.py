"""--report-to: TensorBoard, MLflow, W&B (offline) and trackio read back with their own readers (EventAccumulator,
MlflowClient on SQLite, W&B's run folder, trackio's SQLiteStorage), bad names and missing libraries refused before
any work, a failing tracker that never stops training, a resume that continues the same MLflow run without sending a
step twice, and tune's and sweep's trials as runs of one parent (MLflow) or group (W&B), pruned ones marked."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def losses_of(out: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if m.get("kind") != "eval"]


def test_wandb_offline_trackio_and_tensorboard_hparams(model_dir, data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    trackio = pytest.importorskip("trackio")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_PROJECT", "lorafit-tests")
    store = tmp_path / "trackio"  # trackio's local store (TRACKIO_DIR, which trackio reads when imported)
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    for module in (trackio.sqlite_storage, trackio.utils):
        monkeypatch.setattr(module, "TRACKIO_DIR", store)
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--report-to",
                 "wandb,trackio,tensorboard", *FAST]) == 0
    losses = losses_of(out)

    # W&B: the offline run folder, under the run's id, with the run's log and report.png
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    [folder] = (out / "wandb").glob(f"offline-run-*-{run_id}")
    log = (folder / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in log and b"lora_alpha" in log and (folder / "files" / "report.png").is_file()

    # trackio: its own storage holds the run, one loss per step, equal to metrics.jsonl, and the LoRA settings
    storage = trackio.SQLiteStorage
    assert "run" in storage.get_runs("lorafit-tests")
    logs = storage.get_logs("lorafit-tests", "run")
    steps = [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r]
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in steps] == pytest.approx(losses, rel=1e-6)
    assert [r["step"] for r in logs if "eval/loss" in r] == [0, 3, 6]
    assert list(store.glob("lorafit-tests*.db"))
    config = storage.get_run_config("lorafit-tests", "run")
    assert config["r"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]

    # TensorBoard's HPARAMS row: the LoRA settings, the outcome and the final eval loss
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["r"].number_value == 8 and start.hparams["outcome"].string_value == "complete"
    final = json.loads((out / "trainer_state.json").read_text())["after"]["eval_loss"]
    assert events.Scalars("final/loss")[0].value == pytest.approx(final, rel=1e-6)


def _children(uri: str, parent):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.info.run_name: r for r in runs}


def test_a_three_trial_tune_is_one_mlflow_run_per_trial_under_the_study(model_dir, data, tmp_path, mlflow_uri,
                                                                          monkeypatch, capsys):
    optuna = pytest.importorskip("optuna")
    should_prune = optuna.trial.Trial.should_prune
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda t: t.number == 2 or should_prune(t))
    space = tmp_path / "space.yaml"
    space.write_text("r: {low: 1, high: 4}\ntargets: [qv, mlp]\nalpha: [16]\nrslora: [false]\ndora: [false]\n")
    out = tmp_path / "study"
    assert main(["tune", "--model", str(model_dir), "--data", str(data), "--trials", "3", "--output", str(out),
                 "--space", str(space), "--steps", "8", "--batch-size", "4", "--eval-max", "8",
                 "--sampler-seed", "0", "--seeds", "1", "--report-to", "mlflow"]) == 0
    client, parent = mlflow_run(mlflow_uri, "study")
    assert parent.info.status == "FINISHED" and parent.data.params["trials"] == "3"
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {"results.md", "pareto.png", "best.yaml"}
    children = _children(mlflow_uri, parent)
    assert sorted(children) == ["trial-0000", "trial-0001", "trial-0002"]
    study = optuna.load_study(study_name="lorafit", storage=f"sqlite:///{out / 'study.db'}")
    for t in study.trials:
        run = children[f"trial-{t.number:04d}"]
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"], rel=1e-12)
        assert run.data.tags["lorafit.tune"] == "study" and run.data.tags["lorafit.trial"] == str(t.number)
        history = client.get_metric_history(run.info.run_id, "eval_loss")
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.tags["lorafit.outcome"] == "complete"
            assert history[-1].step == 8 and history[-1].value == pytest.approx(t.value, rel=1e-6)
    pruned = children["trial-0002"]
    assert study.trials[2].state == optuna.trial.TrialState.PRUNED
    assert pruned.info.status == "KILLED" and pruned.data.tags["lorafit.outcome"] == "pruned"
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(study.best_value, rel=1e-6)


def test_a_sweep_is_one_mlflow_run_per_point_under_the_sweep(model_dir, data, tmp_path, mlflow_uri, capsys):
    out = tmp_path / "grid"
    assert main(["sweep", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--grid",
                 "r=1,2", "--steps", "4", "--batch-size", "4", "--eval-max", "8", "--report-to", "mlflow"]) == 0
    client, parent = mlflow_run(mlflow_uri, "grid")
    assert parent.info.status == "FINISHED"
    children = _children(mlflow_uri, parent)
    assert sorted(children) == ["r1-qv-lora", "r2-qv-lora"]
    for name, run in children.items():
        final = json.loads((out / name / "trainer_state.json").read_text())["after"]["eval_loss"]
        assert run.data.params["r"] == name[1] and run.data.metrics["eval_loss"] == pytest.approx(final, rel=1e-6)
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(
        min(r.data.metrics["eval_loss"] for r in children.values()), rel=1e-6)
    assert os.path.isdir(out / "r1-qv-lora" / "tensorboard") is False  # only the trackers asked for


@pytest.mark.parametrize("command", ["sweep", "tune"])
def test_sweep_and_tune_refuse_bad_trackers_before_any_work(command, model_dir, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = [command, "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "4",
            *(["--grid", "r=1"] if command == "sweep" else ["--trials", "2"])]
    assert main([*argv, "--report-to", "tensorbord"]) == 2
    assert "unknown tracker 'tensorbord'" in capsys.readouterr().err and not out.exists()
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    assert main([*argv, "--report-to", "tensorboard,wandb"]) == 2
    assert "the wandb library is not installed; pip install wandb" in capsys.readouterr().err and not out.exists()
