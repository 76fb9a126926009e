"""`lorafit tune`: an Optuna study over rank, targets, alpha, variant and learning rate (a thin layer over
lorafit.advise.tune).

    lorafit tune --model DIR --data FILE --trials N [--storage URL] [--study NAME] [--budget-params P]
                 [--memory-budget 8GB] [--steps S] [--seeds K] [--space space.yaml] [--output DIR]

Rerun the same command to resume; start it on several machines with one --storage URL to share the study.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ..advise.tune_report import SEEDS
from ..errors import ConfigError
from .common import RUN_NEEDS, add_output_flag, add_target_parameters_flag, positive_int, read_yaml
from .train import RUN_FLAGS, add_run_flags, run_settings

TUNE_NEEDS = RUN_NEEDS + ("optuna",)


def cmd_tune(args: argparse.Namespace) -> int:
    from ..advise.space import Space, parse_space
    from ..advise.suggest import parse_bytes, parse_count
    from ..advise.tune import TuneJob, tune

    settings = run_settings(args)
    settings.setdefault("steps", 100)
    for key in ("model", "data"):  # every worker and trial process reads the same files, wherever it starts
        if settings.get(key):
            settings[key] = str(Path(settings[key]).expanduser().resolve())
    space = parse_space(read_yaml(args.space)) if args.space else Space()
    if args.target_parameters is not None:
        if args.target_parameters != "experts":
            raise ConfigError("tune --target-parameters takes 'experts' (every trial adapts the expert weights, at "
                              "r/k per expert); name other parameters in `lorafit sweep --target-parameters` or "
                              "`lorafit train`")
        space = dataclasses.replace(space, experts=(True,))
    out = Path(args.output or Path("runs") / time.strftime("tune-%Y%m%d-%H%M%S"))
    job = TuneJob(settings=settings, output=out, trials=args.trials, space=space, storage=args.storage,
                  study=args.study, budget_params=parse_count(args.budget_params),
                  memory_budget=parse_bytes(args.memory_budget), seeds=args.seeds, pruner=args.pruner,
                  heartbeat=args.heartbeat, sampler_seed=args.sampler_seed)
    result = tune(job)
    best = result["best"]
    if best is None:
        print("no trial completed: see the notes in results.md")
        return 1
    print(f"best: {result['reason']}; train it with `lorafit train --config {out / 'best.yaml'}`")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="search rank, targets, alpha, variant and learning rate with Optuna "
                       "(resumable, many workers on one database)",
                       description="Run an Optuna study (TPE sampler, successive-halving or Hyperband pruning on "
                                   "the eval loss at rungs of the step budget) over the LoRA configuration. The "
                                   "first trials are suggest's and probe's configs. Rerun to resume; start more "
                                   "workers with the same --storage and --study to share it.")
    add_run_flags(p, RUN_FLAGS + ("steps", "eval_max", "device", "report_to"))
    p.add_argument("--trials", type=positive_int, required=True, help="trials in the study, all workers together")
    p.add_argument("--storage", help="an Optuna database URL, e.g. postgresql://user:pw@host/db (default: "
                   "sqlite:///OUTPUT/study.db)")
    p.add_argument("--study", default="lorafit", help="study name in the storage (default: lorafit)")
    p.add_argument("--budget-params", help="most adapter parameters, e.g. 2M (default: none)")
    p.add_argument("--memory-budget", help="peak training memory allowed (lorafit plan's estimate), e.g. 8GB "
                   "(default: none)")
    p.add_argument("--seeds", type=positive_int, default=SEEDS, help="re-train the top 3 configs with K seeds, "
                   "rank them by their mean and pick the smallest, steadiest one within noise of the best (1: no "
                   f"re-training, pick by one seed's eval loss) (default: {SEEDS})")
    add_target_parameters_flag(p, "in every trial ('experts' only: the space's experts knob fixed on)",
                               "the space's experts knob decides")
    p.add_argument("--space", help="search-space YAML: r, targets, alpha, rslora, dora, lr, experts (default: the full "
                   "space, see docs/guidance.md)")
    p.add_argument("--pruner", choices=["halving", "hyperband"], default="halving", help="successive halving or "
                   "Hyperband (default: halving)")
    p.add_argument("--heartbeat", type=positive_int, default=30, help="seconds between a running trial's heartbeats; "
                   "a trial silent for two is failed and re-run (default: 30)")
    p.add_argument("--sampler-seed", type=int, help="seed of the TPE sampler (default: random per worker, so "
                   "that workers do not draw the same trials)")
    add_output_flag(p, "the folder for study.db, trials/ and the results; rerun with it to resume",
                    default="runs/tune-<timestamp>")
    p.set_defaults(func=cmd_tune, needs=TUNE_NEEDS)
