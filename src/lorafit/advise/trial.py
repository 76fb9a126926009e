"""One training run of `lorafit tune` in its own process, watched from the study's process.

The run is ``lorafit.train.run`` on ``FOLDER/trial.json`` (TrainConfig fields), output in ``FOLDER/run``, log in
``FOLDER/train.log``, started from a forkserver that has imported torch and transformers once (a fresh interpreter
per trial would spend ~4 s importing them). The watcher reads the evaluations the run appends to
``run/metrics.jsonl`` at the rungs (``eval_every``), hands each to ``on_eval`` (Optuna's report / should_prune) and
stops the process when it says stop: SIGTERM, which the trial turns into ``Stopped`` so that its experiment trackers
mark the run as pruned (``FOLDER/group.json`` names the study it belongs to), then a kill after ``GRACE_S``. A crash,
a kill or a diverging loss ends the trial's process only: the worker records why and goes on. The child exits by
itself when the study's process is gone (a killed ``tune``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import DataError
from ..files import read_json, read_jsonl, write_text

POLL_S = 0.2
GRACE_S = 10.0  # seconds a pruned trial has to end its tracker runs before it is killed
# imported once by the forkserver, so that each trial process starts with them (transformers imports its model
# classes lazily: ~2 s per process for Llama otherwise)
PRELOAD = ["lorafit.advise.trial", "lorafit.train.loop", "lorafit.hf", "transformers", "transformers.modeling_utils",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
           "matplotlib.pyplot"]


def preload_model_type(model_type: str) -> None:
    """Have the forkserver also import the modeling module of ``model_type`` (before the first trial starts it)."""
    name = f"transformers.models.{model_type}.modeling_{model_type}"
    if name not in PRELOAD:
        PRELOAD.append(name)


@dataclass
class Outcome:
    state: str  # "complete" | "pruned" | "failed"
    value: Optional[float] = None  # final eval loss
    step: int = 0  # last evaluated step
    reason: str = ""
    summary: Optional[dict] = None  # trainer_state.json of a complete run


def _watch_parent(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # the study's process is gone: nobody reads this trial any more
            os.kill(os.getpid(), signal.SIGINT)  # its tracker runs end marked killed (KeyboardInterrupt)
            time.sleep(GRACE_S)
            os._exit(3)
        time.sleep(0.5)


class Stopped(BaseException):
    """The study stopped this trial (pruned): raised in the trial process by SIGTERM, so that the training loop ends
    its tracker runs as ``outcome``."""

    outcome = "pruned"


def _stopped(signum, frame) -> None:
    raise Stopped("the study pruned this trial")


# the experiment trackers' settings (lorafit.train.trackers), handed to each trial: the forkserver's environment is
# the one it started with, not the study process's at the trial's start
TRACKER_ENV = ("MLFLOW_", "WANDB_", "TRACKIO_")


def tracker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(TRACKER_ENV)}


def child_main(folder: str, resume: bool, parent_pid: int, env: dict[str, str]) -> None:
    """The trial process: train ``folder/trial.json`` into ``folder/run``; an error goes to ``folder/error.txt``."""
    for key in [k for k in os.environ if k.startswith(TRACKER_ENV)]:
        del os.environ[key]
    os.environ.update(env)
    folder_p = Path(folder)
    log = os.open(folder_p / "train.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    signal.signal(signal.SIGTERM, _stopped)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    from ..train import TrainConfig, run
    from ..train.trackers import Group

    try:
        cfg = TrainConfig.from_dict(read_json(folder_p / "trial.json", error=DataError))
        group_file = folder_p / "group.json"
        group = Group.from_dict(read_json(group_file, error=DataError)) if group_file.is_file() else None
        run(cfg, resume=resume, quiet=True, group=group)
    except Stopped:
        os._exit(0)  # the watcher has recorded the pruning
    except BaseException as e:  # noqa: BLE001 - every failure is the trial's, recorded for the study
        write_text(folder_p / "error.txt", f"{type(e).__name__}: {e}")
        os._exit(1)


def start_server() -> None:
    """Start the forkserver now, so that it imports PRELOAD while the study's process does other work."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _evals(path: Path, seen: set) -> list[dict]:
    """New evaluation records of a metrics.jsonl that is being appended to (a torn last line is skipped)."""
    out = []
    for rec in read_jsonl(path):
        if isinstance(rec, dict) and rec.get("kind") == "eval" and "eval_loss" in rec and rec["step"] > 0 \
                and rec["step"] not in seen:
            seen.add(rec["step"])
            out.append(rec)
    return out


def failure_reason(folder: Path, exitcode: Optional[int]) -> str:
    """Why a trial process failed: "diverged: ..." for a non-finite loss, else its error or exit status."""
    err = folder / "error.txt"
    if err.is_file():
        text = err.read_text().strip()
        if "non-finite" in text or "loss became" in text:
            return "diverged: " + text.split(": ", 1)[-1]
        return text
    if exitcode is not None and exitcode < 0:
        return f"the trial process was killed by signal {-exitcode} (out of memory?)"
    return f"the trial process exited with code {exitcode}; see {folder / 'train.log'}"


def _end(proc, sig: int) -> None:
    """Signal the trial process, give it GRACE_S to end its tracker runs, then kill it."""
    if proc.is_alive():
        os.kill(proc.pid, sig)
        proc.join(GRACE_S)
    if proc.is_alive():
        proc.kill()
        proc.join()


def run_trial(folder: Path, *, on_eval: Callable[[int, float], bool], heartbeat: Callable[[], None] = lambda: None,
              resume: bool = False) -> Outcome:
    """Train ``folder/trial.json`` in its own process; ``on_eval(step, loss)`` True stops (prunes) it."""
    proc = _context().Process(target=child_main, args=(str(folder), resume, os.getpid(), tracker_env()))
    proc.start()
    seen: set = set()
    last = (0, None)
    try:
        while True:
            proc.join(POLL_S)
            heartbeat()
            for rec in _evals(folder / "run" / "metrics.jsonl", seen):
                last = (rec["step"], rec["eval_loss"])
                if on_eval(*last):
                    _end(proc, signal.SIGTERM)  # Stopped in the trial: its trackers mark the run pruned
                    return Outcome("pruned", last[1], last[0], f"pruned at step {last[0]}")
            if proc.exitcode is not None:
                break
    finally:
        if proc.is_alive():  # the watcher itself is ending (KeyboardInterrupt): end the trial with it, its tracker
            _end(proc, signal.SIGINT)  # runs marked killed
    state = folder / "run" / "trainer_state.json"
    if proc.exitcode == 0 and state.is_file():
        try:
            summary = read_json(state, error=DataError)
        except DataError as e:
            return Outcome("failed", None, last[0], str(e))
        return Outcome("complete", summary["after"]["eval_loss"], summary["steps"], summary=summary)
    return Outcome("failed", None, last[0], failure_reason(folder, proc.exitcode))
