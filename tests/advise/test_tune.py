"""lorafit tune: the search space and its bad input, the storage errors, a 6-trial study on a tiny Llama (prunes,
writes every file, best.yaml trains), a kill during a trial and the rerun, two workers on one SQLite file."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import make_data, make_model_dir, run_cli, tiny_llama
from lorafit import ConfigError
from lorafit.advise.space import Space, parse_space, scaled_pattern, trial_lora, within
from lorafit.lora_config import LoraConfig

optuna = pytest.importorskip("optuna")

FAST = ["--steps", "8", "--batch-size", "4", "--max-length", "48", "--eval-max", "8", "--seeds", "1"]
SMALL_SPACE = "r: {low: 1, high: 4}\ntargets: [qv, mlp]\nalpha: [16]\nrslora: [false]\ndora: [false]\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    space = d / "space.yaml"
    space.write_text(SMALL_SPACE)
    return make_model_dir(d / "m"), make_data(d / "d.jsonl", n=48), space


def tune_argv(files, out, trials, *extra):
    model, data, space = files
    return ["tune", "--model", model, "--data", data, "--trials", trials, "--output", out, *FAST, *extra]


def load(out: Path, name: str = "lorafit"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def finished(study) -> list:
    """Complete, pruned and failed-for-a-reason trials (a trial failed for a lost heartbeat is re-run)."""
    S = optuna.trial.TrialState
    return [t for t in study.trials if t.state in (S.COMPLETE, S.PRUNED)
            or (t.state == S.FAIL and "fail_reason" in t.user_attrs)]


# --- the space -------------------------------------------------------------------------------------------

def test_space_parses_ranges_and_choices():
    s = parse_space({"r": {"low": 2, "high": 16}, "targets": ["qv", "probed"], "dora": [True], "lr": {"low": 1e-4,
                                                                                                       "high": 1e-2}})
    assert s.r == (2, 16) and s.targets == ("qv", "probed") and s.dora == (True,) and s.lr == (1e-4, 1e-2)
    assert Space().around(1e-3).lr == pytest.approx((1e-4, 1e-2)) and s.around(1.0).lr == (1e-4, 1e-2)
    assert within({"r": 100, "targets": "attention", "lr": 1.0}, s) == {"r": 16, "lr": 1e-2}


@pytest.mark.parametrize("data, match", [
    ({"rank": [4]}, "unknown search-space key.*'rank'.*allowed: r, targets"),
    ({"r": {"low": 8, "high": 4}}, "'r' is an empty range: low 8 > high 4"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "'lr' is an empty range"),
    ({"targets": []}, "'targets' is empty"),
    ({"targets": ["qk"]}, "'qk' is not one of qv, attention"),
    ({"r": [4, 8]}, "'r' is a range"),
    ({"r": {"low": 0, "high": 4}}, "integers >= 1"),
    ({"alpha": [-1]}, "positive numbers"),
])
def test_space_bad_input(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_space(data)


def test_trial_lora_targets_and_the_scaled_probed_pattern():
    model = tiny_llama()
    cfg = trial_lora(model, {"r": 4, "targets": "qv", "alpha": 16.0, "rslora": True, "dora": False})
    assert cfg == LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True)
    probed = LoraConfig(r=2, lora_alpha=16, target_modules=["a", "b", "c"], rank_pattern={"b": 4, "c": 1})
    assert scaled_pattern(probed, 8).rank_pattern == {"b": 16, "c": 4} and scaled_pattern(probed, 1).rank_pattern \
        == {"b": 2}  # c: max(1, round(0.5)) = 1 = r, so no entry
    with pytest.raises(ConfigError, match="probe"):
        trial_lora(model, {"r": 4, "targets": "probed", "alpha": 16.0, "rslora": False, "dora": False})


def test_a_job_naming_no_warm_up_gets_suggests_and_its_own_is_kept():
    from lorafit.advise.suggest import with_warmup

    settings = {"steps": 40}
    with_warmup(settings)
    assert settings == {"steps": 40, "warmup_ratio": 0.1}
    for given in ({"warmup_steps": 0}, {"warmup_ratio": 0.0}, {"warmup_steps": 5}, {"warmup_ratio": 0.03}):
        settings = dict(given)
        with_warmup(settings)
        assert settings == given


JOB = dict(model="m", data="d.jsonl", steps=8, batch_size=4)
# the 8 settings a study recorded before tune gave a warm-up, an unnamed one as null
OLD_SETTINGS = {**JOB, "max_length": None, "eval_max": None, "eval_split": None, "seed": None}
LR_SPACE = Space(lr=(1e-4, 1e-3))  # tune sets the lr range from suggest's before it opens the study


def reopen(storage, settings: dict, lines: list):
    from lorafit.advise.tune import TuneJob, open_study

    job = TuneJob(settings=dict(settings), output=Path("unused"), trials=2, storage="sqlite:///unused", space=LR_SPACE)
    open_study(job, storage, [], lines.append)
    return job


def stored_study(settings: dict):
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="lorafit")
    study.set_user_attr("space", LR_SPACE.to_dict())
    study.set_user_attr("settings", settings)
    study.set_user_attr("trials", 2)
    return storage


def test_a_study_from_before_the_default_warm_up_resumes_without_one():
    lines: list[str] = []
    job = reopen(stored := stored_study(OLD_SETTINGS), JOB, lines)
    assert "warmup_ratio" not in job.settings  # trained as its first trials were
    assert "created before tune gave a default warm-up" in lines[0] and "reopened" in lines[1]
    assert reopen(stored, {**JOB, "max_length": 256, "seed": 0}, [])  # a recorded null is TrainConfig's default
    with pytest.raises(ConfigError, match=r"differs in steps"):  # the recorded settings are still compared
        reopen(stored, {**JOB, "steps": 9}, [])
    # the same from the first study that recorded the warm-up: its unnamed settings were null too
    first = {**OLD_SETTINGS, "warmup_steps": None, "warmup_ratio": 0.1, "schedule": None}
    job = reopen(stored_study(first), {**JOB, "schedule": "cosine"}, lines)
    assert job.settings["warmup_ratio"] == 0.1


def test_a_new_study_records_the_warm_up_and_the_defaults():
    from lorafit.advise.tune import TuneJob, open_study

    job = TuneJob(settings=dict(JOB), output=Path("unused"), trials=2, storage="sqlite:///unused", space=LR_SPACE)
    open_study(job, storage := optuna.storages.InMemoryStorage(), [], [].append)
    assert job.settings["warmup_ratio"] == 0.1
    recorded = optuna.load_study(study_name="lorafit", storage=storage).user_attrs["settings"]
    assert recorded["warmup_ratio"] == 0.1 and recorded["schedule"] == "cosine" and recorded["max_length"] == 256
    assert reopen(storage, {**JOB, "schedule": "cosine"}, []).settings["warmup_ratio"] == 0.1
    other = optuna.storages.InMemoryStorage()
    reopen(other, {**JOB, "warmup_ratio": 0.0}, [])  # creates the study
    reopen(other, {**JOB, "warmup_ratio": 0}, [])  # a YAML 0 is the recorded 0.0: not refused
    with pytest.raises(ConfigError, match=r"differs in warmup_ratio"):
        reopen(storage, {**JOB, "warmup_ratio": 0.0}, [])


def test_bad_input_exits_2_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *tune_argv(files, out, 0))
    assert code == 2 and "expected a positive integer, got '0'" in err
    bad_space = tmp_path / "bad.yaml"
    bad_space.write_text("rank: [4]\n")
    code, _, err = run_cli(capsys, *tune_argv(files, out, 2, "--space", bad_space))
    assert code == 2 and "unknown search-space key(s) 'rank'" in err
    code, _, err = run_cli(capsys, *tune_argv(files, out, 2, "--storage", "postgresql://me:secret@db.example/x"))
    assert code == 2 and "URL scheme 'postgresql' needs the driver psycopg2-binary" in err and "secret" not in err
    code, _, err = run_cli(capsys, *tune_argv(files, out, 2, "--storage", "nosuchdb://x"))
    assert code == 2 and "Optuna cannot open the storage nosuchdb://x (URL scheme 'nosuchdb')" in err
    code, _, err = run_cli(capsys, *tune_argv(files, out, 2, "--space", files[2], "--budget-params", "100"))
    assert code == 2 and "fits --budget-params 100: the smallest (r=1, qv) has 448 adapter parameters" in err
    code, _, err = run_cli(capsys, *tune_argv(files, out, 2, "--space", files[2], "--memory-budget", "10MB"))
    assert code == 2 and "fits --memory-budget 10 MiB: the smallest (r=1, qv) needs ~" in err
    assert not out.exists()


def test_a_failed_trial_process_is_recorded_with_its_reason(tmp_path):
    """A crash in a trial ends that trial's process only; a non-finite loss reads as diverged."""
    from lorafit.advise.trial import failure_reason, run_trial

    (tmp_path / "trial.json").write_text('{"steps": 0}')  # refused by TrainConfig inside the trial process
    out = run_trial(tmp_path, on_eval=lambda step, loss: False)
    assert out.state == "failed" and out.reason.startswith("ConfigError: steps=0 is invalid")
    (tmp_path / "error.txt").write_text("TrainingError: loss became nan at step 3; stopping (no checkpoint)")
    assert failure_reason(tmp_path, 1) == "diverged: loss became nan at step 3; stopping (no checkpoint)"
    (tmp_path / "error.txt").unlink()
    assert "killed by signal 9" in failure_reason(tmp_path, -9)


def test_failing_trials_are_recorded_with_their_reason_and_the_study_goes_on(files, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"chat_template: {tmp_path / 'missing.jinja'}\n")  # every trial's process fails when it loads
    out = tmp_path / "failing"
    code, text, _ = run_cli(capsys, *tune_argv(files, out, 2, "--space", files[2], "--config", cfg))
    assert code == 1 and "no trial completed" in text
    study = load(out)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2  # both ran: the study went on
    assert all("missing.jinja" in t.user_attrs["fail_reason"] for t in study.trials)
    assert "missing.jinja" in (out / "results.md").read_text()


# --- a study ---------------------------------------------------------------------------------------------

def test_six_trials_prune_write_every_file_and_best_trains(files, tmp_path, capsys):
    out = tmp_path / "study"
    code, text, err = run_cli(capsys, *tune_argv(files, out, 6, "--sampler-seed", "0", "--seeds", "2"))
    assert code == 0, err
    for name in ("study.db", "results.csv", "results.md", "pareto.png", "importances.png", "best.yaml",
                 "probed.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    study = load(out)
    done = finished(study)
    assert len(study.trials) == len(done) == 6
    states = [t.state for t in done]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    assert [t.user_attrs.get("mark") for t in study.trials[:2]] == ["suggested", "probed"]
    assert study.trials[1].params["targets"] == "probed"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 6 and {r["mark"] for r in rows} >= {"suggested", "probed"}
    assert any(r["seeds"] == "2" and r["std"] for r in rows)  # the top configs re-trained with a second seed
    reruns = sorted((out / "seeds").glob("*/run/metrics.jsonl"))
    assert reruns and all(json.loads((m.parent.parent / "trial.json").read_text())["eval_every"] == 0 for m in reruns)
    evals = [json.loads(line).get("step") for line in reruns[0].read_text().splitlines()
             if json.loads(line).get("kind") == "eval"]
    assert evals == [0, 8], evals  # before and after training only: nothing prunes a re-run
    assert "done 6/6" in text and "pruned" in text and "best " in text
    # a job naming no warm-up trains every trial with suggest's (10% of 8 steps: 1), and best.yaml keeps it
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["warmup_ratio"] == 0.1 and "warmup_steps" not in best
    for t in study.trials:
        if "folder" in t.user_attrs:
            assert json.loads((Path(t.user_attrs["folder"]) / "trial.json").read_text())["warmup_ratio"] == 0.1
    code, _, err = run_cli(capsys, "train", "--config", out / "best.yaml", "--output", tmp_path / "best", "--quiet")
    assert code == 0, err
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()

    # the same study with another search space is refused, before any trial
    other = tmp_path / "other.yaml"
    other.write_text("r: {low: 2, high: 8}\n")
    code, _, err = run_cli(capsys, *tune_argv(files, out, 6, "--space", other))
    assert code == 2 and "was created with another space" in err and "--study NEW_NAME" in err
    assert len(load(out).trials) == 6


def _wait_for(predicate, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.1)


# Run in the tune process: trial ``number``'s first pruning check touches ``marker`` and waits there to be killed, so
# the kill lands while the trial is running, after its first eval, whatever the machine's speed (the pruner could
# otherwise stop the trial between the test seeing it train and the kill).
HOLD_AT_FIRST_EVAL = """
import sys, time
from pathlib import Path
import optuna
number, marker = int(sys.argv[1]), Path(sys.argv[2])
should_prune = optuna.trial.Trial.should_prune
def held(self):
    if self.number == number:
        marker.touch()
        time.sleep(3600)
    return should_prune(self)
optuna.trial.Trial.should_prune = held
from lorafit.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _tune_process(files, out, trials, log: Path, *extra, hold: tuple[int, Path] | None = None) -> subprocess.Popen:
    argv = [str(a) for a in tune_argv(files, out, trials, "--space", files[2], "--heartbeat", "1", *extra)]
    cmd = ["-m", "lorafit"] if hold is None else ["-c", HOLD_AT_FIRST_EVAL, str(hold[0]), str(hold[1])]
    return subprocess.Popen([sys.executable, *cmd, *argv], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_killed_study_resumes_and_reruns_the_interrupted_trial_only(files, tmp_path, capsys):
    out = tmp_path / "killed"
    held = tmp_path / "trial-1-held"
    proc = _tune_process(files, out, 3, tmp_path / "first.log", hold=(1, held))
    _wait_for(held.is_file)  # trial 1 trained to its first eval and is running
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t.value for t in load(out).trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert list(before) == [0]  # trial 0 finished before the kill

    code, text, err = run_cli(capsys, *tune_argv(files, out, 3, "--space", files[2], "--heartbeat", "1"))
    assert code == 0, err
    study = load(out)
    done = finished(study)
    assert len(done) == 3 and study.trials[0].value == before[0]  # kept, not re-run
    interrupted = study.trials[1]
    assert interrupted.state == optuna.trial.TrialState.FAIL and "fail_reason" not in interrupted.user_attrs
    retry = [t for t in done if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].params == interrupted.params
    assert sorted(t.number for t in done) == [0, 2, 3]


@pytest.mark.slow  # 19 s; the killed-study test covers one worker's resume by default
def test_two_workers_on_one_sqlite_file_share_the_trials_and_the_seeded_reruns(files, tmp_path):
    out = tmp_path / "shared"
    # a 5 s heartbeat: no trial is taken over because a busy machine delayed its worker's heartbeat
    workers = [_tune_process(files, out, 4, tmp_path / f"w{i}.log", "--seeds", "2", "--heartbeat", "5")
               for i in range(2)]
    for w in workers:
        assert w.wait(timeout=600) == 0, (tmp_path / "w0.log").read_text()[-2000:]
    study = load(out)
    assert len(study.trials) == len(finished(study)) == 4  # N in total: none run twice, none extra
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    ran = [{int(line.split("]")[0].split()[-1]) for line in log.splitlines() if line.startswith("[trial ")}
           for log in logs]
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {0, 1, 2, 3}
    # the top 3 (of the complete trials) re-trained with seed 1: each once, by one of the two workers
    top = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)[:3]
    trained = [line.split(": training")[0] for log in logs for line in log.splitlines()
               if line.startswith("[seeds]") and line.endswith(": training")]
    reruns = load(out, "lorafit:seeds").trials
    assert top and len(trained) == len(set(trained)) == len(reruns) == len(top)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in reruns)
    assert sorted(t.user_attrs["source"] for t in reruns) == sorted(t.number for t in top)
    with (out / "results.csv").open() as f:  # the last worker's report holds every re-run, its own or not
        rows = {int(r["trial"]): r for r in csv.DictReader(f)}
    assert all(rows[t.number]["seeds"] == "2" and rows[t.number]["std"] for t in top)


def test_tune_without_optuna_says_what_to_install_before_any_work(files, tmp_path):
    out = tmp_path / "out"
    argv = [str(a) for a in tune_argv(files, out, 2)]
    code = f"import sys; sys.modules['optuna'] = None\nfrom lorafit.cli import main\nsys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("lorafit: error: lorafit tune needs optuna, which is not installed: "
                                                 "pip install 'lorafit[tune]'")
    assert not out.exists()
