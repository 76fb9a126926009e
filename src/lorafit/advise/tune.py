"""`lorafit tune`: search rank, targets, alpha, variant and learning rate with Optuna, on a shared database.

The study (Optuna's RDB storage; default ``OUTPUT/study.db``, SQLite) is the only thing workers share:

- **N trials, no more.** The process that creates the study enqueues all N trials at once: first ``suggest``'s and
  ``probe``'s configurations, then N-2 empty ones whose parameters the TPE sampler (Bergstra et al. 2011) draws
  when a worker takes them, from every result so far. A worker takes a waiting trial by the storage's atomic
  WAITING -> RUNNING update, so two workers never take the same trial, and it stops when none is waiting or running.
- **Resume.** A worker records a heartbeat while its trial runs. A trial whose heartbeat stops (its worker was
  killed) is failed by ``optuna.storages.fail_stale_trials`` after the grace period (2 heartbeats), and
  ``RetryHeartbeatStaleTrialCallback`` enqueues it again with the same parameters: a rerun of a killed ``tune``
  keeps every finished trial and re-runs the interrupted one.
- **Pruning.** Each trial reports its eval loss at rungs of the step budget (steps/4, /2, and the end), and the
  pruner (successive halving, Li et al. 2018 / Jamieson & Talwalkar 2016; or Hyperband, Li et al. 2018) stops the
  ones that trail. ``plan``'s estimate prunes a trial over the parameter or memory budget before it starts; on a
  CUDA device it is the GPU's estimate, and without a memory budget the GPU's free memory is the budget.
- **Isolation.** Each trial trains in its own process (lorafit.advise.trial): a crash or a diverging loss fails
  that trial, with its reason, and the study goes on.
- **Trackers.** With ``report_to`` in the settings, every trial and seeded re-run is one tracker run, grouped under
  the study (``lorafit.train.trackers.StudyRuns``: an MLflow parent run, a W&B and trackio group), its outcome marked.

Outputs (lorafit.advise.tune_report): results.csv / results.md, pareto.png, importances.png, best.yaml.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import ConfigError, DataError
from ..experts import expert_weights
from ..files import read_json, write_json
from ..lora_config import LoraConfig
from ..train.trackers import StudyRuns, check_installed, parse_report_to
from .space import Space, sample, trial_label, trial_lora, within

if TYPE_CHECKING:
    import torch

DRIVERS = {"postgresql": "psycopg2-binary", "postgres": "psycopg2-binary", "postgresql+psycopg2": "psycopg2-binary",
           "postgresql+psycopg": "psycopg", "mysql": "mysqlclient", "mysql+pymysql": "PyMySQL",
           "mysql+mysqldb": "mysqlclient", "sqlite": "(none: built into Python)"}
SETTINGS_KEYS = ("model", "data", "steps", "batch_size", "max_length", "eval_max", "eval_split", "seed",
                 "warmup_steps", "warmup_ratio", "schedule")


@dataclass
class TuneJob:
    """Everything one ``tune`` worker needs; ``settings`` are TrainConfig fields shared by every trial."""

    settings: dict
    output: Path
    trials: int
    space: Space = field(default_factory=Space)
    storage: Optional[str] = None  # default sqlite:///OUTPUT/study.db
    study: str = "lorafit"
    budget_params: Optional[int] = None
    memory_budget: Optional[int] = None
    seeds: int = 3  # tune_report.SEEDS: the top configurations re-trained with 3 seeds
    pruner: str = "halving"
    heartbeat: int = 30  # seconds between heartbeats; a trial silent for 2 is re-run
    sampler_seed: Optional[int] = None  # None: each worker draws its own (identical seeds would repeat trials)

    @property
    def url(self) -> str:
        return self.storage or f"sqlite:///{(self.output / 'study.db').resolve()}"


# --- storage and study -------------------------------------------------------------------------------------

def _shown_url(url: str) -> str:
    """The URL without its password."""
    import re
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_storage(url: str, *, heartbeat: int = 30):
    """Optuna's RDBStorage for ``url`` with heartbeats and the retry of stale trials; ConfigError naming the scheme
    and the driver to install when it cannot be opened."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    for attempt in range(5):
        try:
            return _rdb_storage(url, scheme, heartbeat)
        except ImportError as e:
            driver = DRIVERS.get(scheme, e.name or "its database driver")
            raise ConfigError(f"storage {_shown_url(url)}: the URL scheme {scheme!r} needs the driver {driver}, which "
                              f"is not installed: pip install {driver}") from None
        except Exception as e:  # noqa: BLE001 - sqlalchemy's ArgumentError, NoSuchModuleError, OperationalError, ...
            # two workers creating the tables of one new database at once: the loser sees them half-made; again
            if attempt < 4 and any(w in str(e) for w in ("already exists", "locked", "UNIQUE constraint")):
                time.sleep(0.5 * (attempt + 1))
                continue
            known = ", ".join(f"{s} ({d})" for s, d in DRIVERS.items() if "+" not in s)
            raise ConfigError(f"Optuna cannot open the storage {_shown_url(url)} (URL scheme {scheme or 'none'!r}): "
                              f"{str(e).splitlines()[0]}. Expected a database URL such as sqlite:///study.db or "
                              f"postgresql://user:password@host/db; schemes and drivers: {known}") from None
    raise AssertionError("unreachable")


def _rdb_storage(url: str, scheme: str, heartbeat: int):
    import warnings

    import optuna

    # SQLite serialises writers: wait for a busy database instead of failing at once (several workers, one file)
    engine = {"connect_args": {"timeout": 120}} if scheme.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))


def make_pruner(kind: str, steps: int):
    """Successive halving or Hyperband on the eval loss at rungs steps/4, steps/2, steps (reduction factor 2)."""
    import optuna

    rung = max(1, steps // 4)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=rung, max_resource=steps, reduction_factor=2)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=rung, reduction_factor=2)
    raise ConfigError(f"pruner={kind!r} is invalid: expected halving or hyperband")


def _with_defaults(settings: dict) -> dict:
    """The SETTINGS_KEYS of ``settings``, an unnamed or null one as TrainConfig's default (a job naming ``schedule:
    cosine`` trains as one naming none; older lorafit recorded an unnamed setting as null)."""
    from ..train.train_config import setting_defaults

    defaults = setting_defaults()
    return {k: defaults[k] if settings.get(k) is None else settings[k] for k in SETTINGS_KEYS}


def _fingerprint(job: TuneJob) -> dict:
    """What makes two studies the same search: the space and the settings every trial trains with."""
    return {"space": job.space.to_dict(), "settings": _with_defaults(job.settings)}


def open_study(job: TuneJob, storage, first: list[tuple[dict, str]], say: Callable[[str], None]):
    """Create the study and enqueue its N trials, or load it and check that it is the same search (ConfigError)."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=job.sampler_seed, n_startup_trials=max(2, min(10, job.trials // 3)))
    kw = dict(storage=storage, study_name=job.study, sampler=sampler,
              pruner=make_pruner(job.pruner, job.settings["steps"]))
    try:
        study = optuna.create_study(direction="minimize", **kw)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kw)
        _check_same(study, job, say)
        return study
    from .suggest import with_warmup

    with_warmup(job.settings)
    for key, value in _fingerprint(job).items():
        study.set_user_attr(key, value)
    for params, mark in first[:job.trials]:
        study.enqueue_trial(params, user_attrs={"mark": mark})
    for _ in range(job.trials - min(len(first), job.trials)):
        study.enqueue_trial({})  # parameters drawn by TPE when a worker takes it
    study.set_user_attr("trials", job.trials)
    say(f"study {job.study!r} created in {_shown_url(job.url)}: {job.trials} trials enqueued")
    return study


def _check_same(study, job: TuneJob, say: Callable[[str], None]) -> None:
    """A reopened study must be the same search; more --trials than it holds enqueues the difference."""
    deadline = time.time() + 30
    while "trials" not in study.user_attrs and time.time() < deadline:  # its creator is still enqueuing
        time.sleep(0.2)
    _study_warmup(study, job, say)
    for key, want in json.loads(json.dumps(_fingerprint(job))).items():  # as stored: tuples are lists
        have = study.user_attrs.get(key)
        if key == "settings" and have is not None:  # a study from an older lorafit records fewer settings
            have = {k: v for k, v in _with_defaults(have).items() if k in have}
            want = {k: v for k, v in want.items() if k in have}
        if have is not None and have != want:  # == as numbers: a recorded 0 is the job's 0.0
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise ConfigError(f"study {job.study!r} in {_shown_url(job.url)} was created with another {key} "
                              f"(differs in {', '.join(diff)}); start a new study with --study NEW_NAME (or another "
                              "--storage / --output), or rerun with the study's own settings")
    held = study.user_attrs.get("trials", 0)
    if job.trials > held:
        for _ in range(job.trials - held):
            study.enqueue_trial({})
        study.set_user_attr("trials", job.trials)
    say(f"study {job.study!r} reopened from {_shown_url(job.url)}: {counts(study)['done']} of "
        f"{max(held, job.trials)} trials done")


def counts(study) -> dict:
    """Trials by outcome. A trial failed for a lost heartbeat is not counted: it is enqueued again."""
    from optuna.trial import TrialState

    c = {"complete": 0, "pruned": 0, "failed": 0, "waiting": 0, "running": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            c["complete"] += 1
        elif t.state == TrialState.PRUNED:
            c["pruned"] += 1
        elif t.state == TrialState.FAIL and "fail_reason" in t.user_attrs:
            c["failed"] += 1
        elif t.state == TrialState.WAITING:
            c["waiting"] += 1
        elif t.state == TrialState.RUNNING:
            c["running"] += 1
    c["done"] = c["complete"] + c["pruned"] + c["failed"]
    return c


def take_waiting(study, storage):
    """A waiting trial, now RUNNING and ours (the storage's WAITING -> RUNNING update is atomic), or None."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):  # FrozenTrial keeps the id here
            storage.record_heartbeat(t._trial_id)
            return optuna.trial.Trial(study, t._trial_id)
    return None


# --- one trial ---------------------------------------------------------------------------------------------

@dataclass
class Context:
    """What every trial of this worker shares: the meta model (shapes), the probed config, the process RSS, the
    device the trials train on (None: the CPU) and what the memory budget is (a flag, or the GPU's free memory)."""

    meta: object
    probed: Optional[LoraConfig]
    runtime: int
    device: Optional[torch.device] = None
    memory_why: str = "--memory-budget"
    tracking: Optional[StudyRuns] = None  # --report-to: the study's parent run and group (lorafit.train.trackers)


def cost(ctx: Context, lora: LoraConfig, settings: dict) -> tuple[int, int]:
    """(adapter parameters, plan's peak training memory in bytes) of one configuration."""
    from ..targets import select_targets
    from .plan import adapted_inputs, adapter_parameters, estimate_memory

    targets = select_targets(ctx.meta, lora)
    n = sum(adapter_parameters(ctx.meta, targets, lora.use_dora).values())
    mem = estimate_memory(ctx.meta, n, batch_size=settings.get("batch_size", 8),
                          max_length=settings.get("max_length", 256),
                          gradient_checkpointing=settings.get("gradient_checkpointing", False), runtime=ctx.runtime,
                          adapter_inputs=adapted_inputs(ctx.meta, targets), dropout=lora.lora_dropout,
                          device=ctx.device)
    return n, mem.total


def over_budget(job: TuneJob, n: int, mem: int) -> str:
    """Why a configuration misses the budgets ("" when it fits)."""
    if job.budget_params is not None and n > job.budget_params:
        return f"over the parameter budget: {n:,} adapter parameters > {job.budget_params:,}"
    if job.memory_budget is not None and mem > job.memory_budget:
        return f"over the memory budget: ~{mem / 2**20:,.0f} MiB > {job.memory_budget / 2**20:,.0f} MiB"
    return ""


def _trial_folder(job: TuneJob, number: int) -> Path:
    return job.output / "trials" / f"{number:04d}"


def _every(seconds: float, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` throttled to once per ``seconds`` (the watcher polls 5x a second; the database need not hear it)."""
    last = [0.0]

    def call() -> None:
        if time.time() - last[0] >= seconds:
            last[0] = time.time()
            fn()
    return call


def run_one(job: TuneJob, ctx: Context, study, storage, trial) -> str:
    """Sample, check the budgets, train in a child process with pruning at the rungs, and tell the study."""
    from optuna.trial import TrialState

    from ..train.train_config import TrainConfig
    from .suggest import lora_yaml
    from .trial import run_trial

    params = sample(trial, job.space)
    lora = trial_lora(ctx.meta, params, ctx.probed)
    n, mem = cost(ctx, lora, job.settings)
    trial.set_user_attr("trainable", n)
    trial.set_user_attr("lora", lora_yaml(lora))
    why = over_budget(job, n, mem)
    if why:
        trial.set_user_attr("prune_reason", why + " (plan's estimate; not trained)")
        study.tell(trial, state=TrialState.PRUNED)
        return f"pruned before training, {why}"
    folder = _trial_folder(job, trial.number)
    folder.mkdir(parents=True, exist_ok=True)
    steps = job.settings["steps"]
    cfg = TrainConfig.from_dict({**job.settings, "lr": params["lr"], "output": str(folder / "run"),
                                 "eval_every": max(1, steps // 4), "save_every": 0, "lora": lora.to_dict()})
    write_json(folder / "trial.json", cfg.to_dict())
    if ctx.tracking is not None:
        write_json(folder / "group.json", ctx.tracking.group(f"trial-{trial.number:04d}", trial=trial.number).to_dict())
    trial.set_user_attr("folder", str(folder))
    trial.set_user_attr("config", cfg.to_dict())  # for the seeded re-runs, which may run on another machine

    def on_eval(step: int, loss: float) -> bool:
        if not math.isfinite(loss) or step >= steps:
            return False
        trial.report(loss, step)
        return trial.should_prune()

    try:
        out = run_trial(folder, on_eval=on_eval, heartbeat=_every(job.heartbeat / 2,
                                                                lambda: storage.record_heartbeat(trial._trial_id)))
    except BaseException:
        if ctx.tracking is not None:
            ctx.tracking.mark(folder / "run", "killed")
        raise
    try:
        return _tell(study, trial, out)
    finally:  # after the study has the result: a slow tracker must not make the trial look stale
        if ctx.tracking is not None:  # a run its killed process left running ends marked
            ctx.tracking.mark(folder / "run", out.state)


def _tell(study, trial, out) -> str:
    """Tell the study how a trained trial ended; the worker's line about it."""
    import optuna
    from optuna.trial import TrialState

    if out.state == "complete":
        study.tell(trial, out.value)
        return f"eval loss {out.value:.4f}"
    if out.state == "pruned":
        trial.set_user_attr("prune_reason", f"{out.reason} (eval loss {out.value:.4f})")
        study.tell(trial, state=TrialState.PRUNED)
        return f"{out.reason} (eval loss {out.value:.4f})"
    trial.set_user_attr("fail_reason", out.reason)
    study.tell(trial, state=TrialState.FAIL)
    optuna.logging.get_logger("optuna").debug(out.reason)
    return f"failed: {out.reason}"


def drain(study, storage, run: Callable[[object], None]) -> None:
    """Take waiting trials of ``study`` and ``run`` each, until none is waiting or running (a stale running one, its
    worker killed, is failed and enqueued again). ``run`` raises optuna's UpdateFinishedTrialError when another
    worker failed its trial meanwhile (our heartbeat came late); that trial is enqueued again and left to it."""
    import optuna
    from optuna.trial import TrialState

    while True:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAIL, and enqueued again
        trial = take_waiting(study, storage)
        if trial is not None:
            run(trial)
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(1.0)  # another worker's trial runs, or a killed worker's is not yet stale
        else:
            return


def work(job: TuneJob, ctx: Context, study, storage, say: Callable[[str], None]) -> None:
    """Run this worker's share of the study's trials (``drain``), one line per trial."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    def run(trial) -> None:
        try:
            text = run_one(job, ctx, study, storage, trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            text = "taken over (its heartbeat was late, so it was enqueued again); this result is dropped"
        c = counts(study)
        try:
            best = study.best_trial
        except ValueError:
            best = None
        best_text = f"best {best.value:.4f} (trial {best.number})" if best else "best: none yet"
        total = c["done"] + c["waiting"] + c["running"]
        say(f"[trial {trial.number}] {trial_label(trial.params)}: {text} | done {c['done']}/{total}"
            f": {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed | {best_text}")

    drain(study, storage, run)


# --- seeded re-runs of the top configurations ------------------------------------------------------------

def seeded_reruns(job, study, storage, say: Callable[[str], None] = print,
                  tracking: Optional[StudyRuns] = None) -> dict[int, list[float]]:
    """{trial number: eval losses with seeds seed, seed+1, ...} of the top 3 complete trials, K values each.

    The re-runs are the trials of a second study in the same storage, ``<study>:seeds``, one per (configuration,
    seed), enqueued by the worker that creates it. Every worker takes them as it takes the study's trials, so none is
    trained twice; a killed worker's re-run loses its heartbeat and is enqueued again. Each trains in the taking
    worker's ``OUTPUT/seeds/<trial>-seed<s>-<re-run>/`` from the configuration the trial stored in the study; the
    losses come back through the storage, so every worker reports all of them.
    """
    import optuna
    from optuna.trial import TrialState

    from .tune_report import TOP

    top = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value)[:TOP]
    base = job.settings.get("seed", 0)
    wanted = [(t.number, s) for t in top for s in range(base + 1, base + job.seeds)]
    reruns = _seeds_study(job, storage, wanted)

    def run(trial) -> None:
        try:
            _rerun(job, study, storage, trial, say, tracking)
        except optuna.exceptions.UpdateFinishedTrialError:
            say(f"[seeds] re-run {trial.number} was taken over (its heartbeat was late); its result is dropped")

    drain(reruns, storage, run)
    got: dict[tuple[int, int], float] = {}
    for t in reruns.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        if t.state == TrialState.COMPLETE:
            got[(t.user_attrs["source"], t.user_attrs["seed"])] = t.value
        elif "fail_reason" in t.user_attrs:  # diverged or crashed (a lost heartbeat is re-run, not counted)
            got.setdefault((t.user_attrs["source"], t.user_attrs["seed"]), math.inf)
    return {t.number: [t.value] + [got[(t.number, s)] for n, s in wanted if n == t.number and (n, s) in got]
            for t in top}


def _seeds_study(job, storage, wanted: list[tuple[int, int]]):
    """The re-runs' study: created with ``wanted`` enqueued, or loaded, with what a rerun asks for beyond it (more
    --seeds, a new top 3) enqueued."""
    import optuna

    name = f"{job.study}:seeds"
    try:
        reruns = optuna.create_study(direction="minimize", storage=storage, study_name=name)
        have: set = set()
    except optuna.exceptions.DuplicatedStudyError:
        reruns = optuna.load_study(study_name=name, storage=storage)
        deadline = time.time() + 30
        while "enqueued" not in reruns.user_attrs and time.time() < deadline:  # its creator is still enqueuing
            time.sleep(0.2)
        have = {(t.user_attrs.get("source"), t.user_attrs.get("seed")) for t in reruns.get_trials(deepcopy=False)}
    for source, seed in wanted:
        if (source, seed) not in have:
            reruns.enqueue_trial({}, user_attrs={"source": source, "seed": seed})
    reruns.set_user_attr("enqueued", True)
    return reruns


def _rerun(job, study, storage, trial, say: Callable[[str], None], tracking: Optional[StudyRuns] = None) -> None:
    """Train one re-run (its source trial's configuration with another seed) and tell its study."""
    from optuna.trial import TrialState

    from .trial import run_trial

    source = study.trials[trial.user_attrs["source"]]
    seed = trial.user_attrs["seed"]
    cfg = source.user_attrs.get("config") or read_json(Path(source.user_attrs["folder"]) / "trial.json",
                                                       error=DataError)
    folder = job.output / "seeds" / f"{source.number:04d}-seed{seed}-{trial.number}"
    folder.mkdir(parents=True, exist_ok=True)
    # no evaluations at the rungs: nothing prunes a re-run (3 of its 5, ~25% of a 40-step run on the Amazon task)
    write_json(folder / "trial.json", {**cfg, "seed": seed, "eval_every": 0, "output": str(folder / "run")})
    if tracking is not None:
        write_json(folder / "group.json", tracking.group(f"trial-{source.number:04d}-seed{seed}",
                                                         trial=source.number, seed=seed).to_dict())
    say(f"[seeds] trial {source.number}, seed {seed}: training")
    try:
        result = run_trial(folder, on_eval=lambda step, loss: False,
                           heartbeat=_every(job.heartbeat / 2, lambda: storage.record_heartbeat(trial._trial_id)))
    except BaseException:
        if tracking is not None:  # a run its killed process left running ends marked
            tracking.mark(folder / "run", "killed")
        raise
    if tracking is not None:
        tracking.mark(folder / "run", result.state)
    if result.state == "complete":
        trial.study.tell(trial, result.value)
        say(f"[seeds] trial {source.number}, seed {seed}: eval loss {result.value:.4f}")
    else:
        trial.set_user_attr("fail_reason", result.reason)
        trial.study.tell(trial, state=TrialState.FAIL)
        say(f"[seeds] trial {source.number}, seed {seed}: {result.reason}")


# --- setup: the first configurations and the budgets ---------------------------------------------------------

def probed_lora(job: TuneJob, say: Callable[[str], None]) -> tuple[LoraConfig, str]:
    """(config, complexity) of ``lorafit probe`` on the job's model and data; OUTPUT/probed.json keeps it (written by
    ``save_probed``), so that a resumed or a second worker uses the same pattern."""
    from .probe_task import run_probe

    path = job.output / "probed.json"
    if path.is_file():
        saved = read_json(path, error=DataError)
        return LoraConfig.from_dict(saved["lora"]), saved["complexity"]
    result, _ = run_probe(job.settings, budget=job.budget_params, say=say)
    return result.config, result.complexity


def save_probed(job: TuneJob, ctx: "Context", complexity: Optional[str]) -> None:
    path = job.output / "probed.json"
    if ctx.probed is not None and not path.is_file():
        write_json(path, {"lora": ctx.probed.to_dict(), "complexity": complexity})


def first_trials(job: TuneJob, ctx: Context, complexity: Optional[str]) -> tuple[list[tuple[dict, str]], float]:
    """([(params, mark)] of suggest's and probe's configurations, in the space), and suggest's learning rate."""
    from .suggest import suggest

    s = suggest(ctx.meta, complexity=complexity, param_budget=job.budget_params, memory_budget=job.memory_budget,
                batch_size=job.settings.get("batch_size", 8), max_length=job.settings.get("max_length", 256),
                runtime=ctx.runtime, device=ctx.device)
    targets = "all-linear" if s.config.target_modules == "all-linear" else "qv"
    space = job.space.around(s.lr)
    # every knob fixed, experts included: a trial marked "suggested" or "probed" is that configuration
    first = [(within({"r": s.config.r, "targets": targets, "alpha": s.config.lora_alpha, "rslora": False,
                      "dora": s.config.use_dora, "lr": s.lr, "experts": bool(s.config.target_parameters)}, space),
              "suggested")]
    if ctx.probed is not None:
        first.append((within({"r": ctx.probed.r, "targets": "probed", "alpha": ctx.probed.lora_alpha,
                              "rslora": False, "dora": False, "lr": s.lr, "experts": False}, space), "probed"))
    return first, s.lr


def check_budgets(job: TuneJob, ctx: Context) -> None:
    """ConfigError when no configuration of the space fits a budget, naming it and the smallest one's cost."""
    if job.budget_params is None and job.memory_budget is None:
        return
    low = {"r": job.space.r[0], "alpha": job.space.alpha[0], "rslora": job.space.rslora[0],
           "dora": False if False in job.space.dora else True, "lr": 1e-3}
    sizes = []
    for targets in job.space.targets:
        if targets == "probed" and ctx.probed is None:
            continue
        try:
            lora = trial_lora(ctx.meta, {**low, "targets": targets}, ctx.probed)
        except ConfigError:  # a target set this model does not have (no attention, ...)
            continue
        sizes.append((*cost(ctx, lora, job.settings), targets))
    if not sizes:
        raise ConfigError("no target set of the search space exists in this model; widen 'targets' in --space")
    n, _, t = min(sizes)
    if job.budget_params is not None and n > job.budget_params:
        raise ConfigError(f"no configuration of the search space fits --budget-params {job.budget_params:,}: the "
                          f"smallest (r={low['r']}, {t}) has {n:,} adapter parameters")
    _, mem, t = min(sizes, key=lambda x: x[1])
    if job.memory_budget is not None and mem > job.memory_budget:
        raise ConfigError(f"no configuration of the search space fits {ctx.memory_why} "
                          f"{job.memory_budget / 2**20:,.0f} MiB: the smallest (r={low['r']}, {t}) needs "
                          f"~{mem / 2**20:,.0f} MiB (lorafit plan's estimate at batch {job.settings.get('batch_size')}"
                          f" x {job.settings.get('max_length')} tokens)")


def device_budget(job: TuneJob, ctx: Context, say: Callable[[str], None]) -> None:
    """On a CUDA device without --memory-budget, the GPU's free memory becomes the budget (said on a line). It is
    read in this process, whose CUDA context stays while the trials run, so the trials' budget leaves it out."""
    from .suggest import device_budget as gpu_budget

    if ctx.device is None:
        return
    budget, lines = gpu_budget(ctx.device, job.memory_budget)  # suggest's rule: one source
    if lines:
        job.memory_budget, ctx.memory_why = budget, f"the free memory of {ctx.device}"
        say(f"{lines[0]}; plan's GPU estimate prunes trials over it")


def prepare(job: TuneJob, say: Callable[[str], None]) -> tuple[Context, list, Optional[str]]:
    """The worker's context, the first trials and the probe's complexity; the space gets its lr range (around
    suggest's learning rate). Reads the model's shapes and probes; writes nothing."""
    from ..devices import resolve_device
    from ..hf import meta_model
    from ..train.loop import resolve_model_dir
    from ..train.train_config import TrainConfig
    from .plan import current_rss
    from .trial import preload_model_type, start_server

    runtime = current_rss()
    cfg = TrainConfig.from_dict(dict(job.settings))
    meta = meta_model(resolve_model_dir(cfg))
    if not expert_weights(meta):  # a dense model: nothing for the experts knob to switch
        job.space = replace(job.space, experts=(False,))
    ctx = Context(meta, None, runtime, resolve_device(cfg.device)[0])  # the trials' device (an absent one: exit 2)
    device_budget(job, ctx, say)
    preload_model_type(getattr(meta.config, "model_type", "") or "none")
    start_server()  # its imports overlap the probe and the study's setup
    complexity = None
    if "probed" in job.space.targets:
        ctx.probed, complexity = probed_lora(job, say)
    first, lr = first_trials(job, ctx, complexity)
    job.space = job.space.around(lr)
    check_budgets(job, ctx)
    return ctx, first, complexity


def _study_warmup(study, job: TuneJob, say: Callable[[str], None]) -> None:
    """A reopened study's trials keep training as its first ones did: with tune's default warm-up
    (``with_warmup``) unless the study predates it, i.e. its recorded settings hold no warmup_ratio."""
    from .suggest import with_warmup

    have = study.user_attrs.get("settings") or {}
    if "warmup_ratio" in have or not have:
        with_warmup(job.settings)
    elif "warmup_steps" not in job.settings and "warmup_ratio" not in job.settings:
        say(f"study {job.study!r} was created before tune gave a default warm-up: its remaining trials train "
            "without one, as its first ones did")


def tune(job: TuneJob, *, say: Callable[[str], None] = print) -> dict:
    """Run this worker's share of the study, then the seeded re-runs and every output file; returns the report
    (lorafit.advise.tune_report.report). Bad input raises ConfigError before anything is written. Trials start from a
    multiprocessing forkserver, which imports the caller's main module: call this from a script under
    ``if __name__ == "__main__":`` (the CLI and notebooks need nothing)."""
    from .tune_report import report

    if job.trials <= 0:
        raise ConfigError(f"trials={job.trials!r} is invalid: expected a positive number of trials")
    if job.seeds <= 0:
        raise ConfigError(f"seeds={job.seeds!r} is invalid: expected a positive number of seeds")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the worker prints one line per trial itself
    make_pruner(job.pruner, job.settings["steps"])
    names = parse_report_to(job.settings.get("report_to"))
    check_installed(names)  # a missing tracker library: before the probe and the first trial
    storage = open_storage(job.url, heartbeat=job.heartbeat) if job.storage else None
    ctx, first, complexity = prepare(job, say)
    job.output.mkdir(parents=True, exist_ok=True)
    save_probed(job, ctx, complexity)
    storage = storage or open_storage(job.url, heartbeat=job.heartbeat)
    study = open_study(job, storage, first, say)
    ctx.tracking = tracking(job, study, names, say)
    try:
        work(job, ctx, study, storage, say)
        seeds = seeded_reruns(job, study, storage, say, ctx.tracking) if job.seeds > 1 else {}
        result = report(job, study, seeds, say)
    except BaseException as e:
        if ctx.tracking is not None:
            ctx.tracking.finish([], None, "failed" if isinstance(e, Exception) else "killed")
        raise
    if ctx.tracking is not None:
        ctx.tracking.finish(result["files"], (result["best"] or {}).get("eval_loss"))
    return result


def tracking(job: TuneJob, study, names: tuple[str, ...], say: Callable[[str], None]) -> Optional[StudyRuns]:
    """--report-to: the study as the trackers' parent (MLflow) and group (W&B, trackio), one run per trial. Its MLflow
    parent run's id is kept in the Optuna study, so that every worker and a rerun use the same parent."""
    if not names:
        return None
    params = {**job.settings, "trials": job.trials, "seeds": job.seeds, "pruner": job.pruner,
              "study": job.study, "space": job.space.to_dict()}
    tracking_ = StudyRuns(names, job.output, "tune", params, say, parent=study.user_attrs.get("mlflow_parent"),
                          key=job.study)
    if tracking_.parent is not None and study.user_attrs.get("mlflow_parent") != tracking_.parent:
        study.set_user_attr("mlflow_parent", tracking_.parent)
    return tracking_
