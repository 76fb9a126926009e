"""The evidence for docs/guidance.md's `lorafit tune` section: does the search beat the advice, by how much, and is
the difference more than seed noise?

    python benchmarks/guidance.py --output runs/guidance                 # 40 trials x 60 steps, 3 seeds (hours)
    python benchmarks/guidance.py --output runs/guidance --trials 10 --seeds 3      # what docs/guidance.md shows
    python benchmarks/guidance.py --output runs/guidance-chat --trials 8 --config chat.yaml   # another task
    python benchmarks/guidance.py --output runs/guidance-lr --grid-only --no-grid --lr-scan 0.333,1,3  # tuned lr

On the embedded task (SmolLM2-135M-Instruct, movie-review sentiment; the `lorafit train` demo job's data and
settings) or the task of ``--config``: (1) `lorafit tune` with its default seeded re-runs (``--seeds``), timed;
(2) the suggested and the probed configurations (the study's trials 0 and 1)
and tune's best, each trained with seeds 0..K-1 for the full step budget (tune's own full-length runs of a
configuration are read back, not trained again); (3) the uniform grid (GRID: alpha 16,
suggest's learning rate for all), K seeds each, timed; (4) one Markdown table with the zero-shot row, mean ± std of
the eval loss and accuracy over the seeds, to paste into docs/guidance.md. Resumable: rerun the same command.

With ``--lr-scan F1,F2,...`` the grid is also trained at each configuration's own learning rate: seed 0 at suggest's
learning rate times each factor (and, while the lowest seed-0 eval loss is at the lowest or the highest factor, one
more step beyond it, up to 5 factors), then seeds 0..K-1 at the factor whose seed-0 eval loss is lowest. ``--grid-only``
skips the study's advice rows (suggest's configuration, the grid's base, comes from a 1-trial study without the
probe).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def sh(*argv) -> None:
    print("+", " ".join(map(str, argv)), flush=True)
    subprocess.run([sys.executable, "-m", "lorafit", *map(str, argv)], check=True)


def _key(cfg: dict) -> str:
    """A training config as train reads it (defaults filled in, 16.0 == 16), to find runs of the same
    configuration."""
    from lorafit.train.train_config import TrainConfig

    def canon(v):
        if isinstance(v, dict):
            return {k: canon(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        return int(v) if isinstance(v, float) and v.is_integer() else v

    d = {k: v for k, v in TrainConfig.from_dict(cfg).to_dict().items() if k != "output"}
    return json.dumps(canon(d), sort_keys=True, default=str)


TRAINED: dict[str, Path] = {}  # config key -> the finished run's trainer_state.json, shared by identical rows
WALL: dict[Path, list[float]] = {}  # a row's folder -> its seeds' training wall times


def register_tune_runs(study_dir: Path) -> None:
    """tune's full-length runs (its complete trials and seeded re-runs) as if retrain() had trained them, so a row
    repeating one (tune's pick, seeds 0..K-1) reads it back: the evaluations a trial makes on the way (its rungs)
    do not change its training."""
    for trial_json in sorted([*study_dir.glob("trials/*/trial.json"), *study_dir.glob("seeds/*/trial.json")]):
        state = trial_json.parent / "run" / "trainer_state.json"
        cfg = json.loads(trial_json.read_text())
        if not state.is_file() or json.loads(state.read_text()).get("steps") != cfg["steps"]:
            continue  # pruned, failed or not run
        cfg.pop("output")
        TRAINED.setdefault(_key({**cfg, "eval_every": 0}), state)


def retrain(cfg: dict, out: Path, seeds: int) -> tuple[list[dict], dict]:
    """Train ``cfg`` (a train config mapping) with seeds 0..K-1 in out/seed<s>; the finished runs' eval dicts and
    seed 0's trainer state. A seed already trained with the identical configuration by another row is read back,
    not trained again (suggest's pick is also a grid point; tune's best may be suggest's or probe's)."""
    import yaml

    results, first = [], None
    for s in range(seeds):
        run = out / f"seed{s}"
        state = run / "trainer_state.json"
        key = _key({**cfg, "seed": s})
        if not state.is_file() and key in TRAINED:
            state = TRAINED[key]
        if not state.is_file():
            out.mkdir(parents=True, exist_ok=True)
            cfg_file = out / f"seed{s}.yaml"
            cfg_file.write_text(yaml.safe_dump({**cfg, "seed": s}, sort_keys=False))
            if run.exists():
                sh("train", "--resume", run, "--quiet")
            else:
                sh("train", "--config", cfg_file, "--output", run, "--quiet")
        TRAINED.setdefault(key, state)
        summary = json.loads(state.read_text())
        WALL.setdefault(out, []).append(summary["wall_time_s"])
        first = first or summary
        results.append(summary["after"])
    return results, first


def summary(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


# the uniform grid, alpha = the one convention (16) and one learning rate (suggest's) for all
GRID = {"q,v r=8": dict(r=8, target_modules=["q_proj", "v_proj"]),
        "all-linear r=1": dict(r=1, target_modules="all-linear"),
        "all-linear r=8": dict(r=8, target_modules="all-linear"),
        "all-linear r=32": dict(r=32, target_modules="all-linear"),
        "attention r=16": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "MLP r=8": dict(r=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
        "DoRA all-linear r=4": dict(r=4, target_modules="all-linear", use_dora=True)}


MEASURED: dict[str, dict] = {}  # row name -> mean, std, trainable: for the targets


def row(name: str, cfg: dict, results: list[dict], trainable: int, seeds: int) -> str:
    acc = [r["eval_accuracy"] for r in results if "eval_accuracy" in r]
    losses = [r["eval_loss"] for r in results]
    MEASURED[name] = {"mean": statistics.fmean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                      "trainable": trainable, "seeds": len(losses)}
    return (f"| {name}: r={cfg['lora'].get('r')}, alpha={cfg['lora'].get('lora_alpha')}, lr={cfg['lr']:.2g} | "
            f"{trainable:,} | {summary([r['eval_loss'] for r in results])} | {summary(acc) if acc else '-'} |")


def grid_config(base: dict, lora: dict) -> dict:
    """The grid point ``lora`` (r, target_modules, use_dora) over ``base``'s settings, alpha 16, no patterns."""
    return {**base, "lora": {**base["lora"], "r": lora["r"], "lora_alpha": 16, "alpha_pattern": {},
                             "target_modules": lora["target_modules"], "rank_pattern": {},
                             "use_dora": lora.get("use_dora", False), "use_rslora": False}}


def grid_folder(out: Path, name: str) -> Path:
    return out / ("grid-" + name.replace(" ", "_").replace(",", "").replace("=", ""))


def lr_scan(base: dict, out: Path, factors: list[float], seeds: int,
            most: int = 5) -> tuple[list[str], list[str], dict]:
    """Each grid point at its own learning rate: seed 0 at base lr x each factor (while the best is the lowest or
    the highest factor, one more step beyond it, up to ``most`` factors), then ``seeds`` seeds at the best factor.
    Returns the table rows, the scan's lines (every factor's seed-0 eval loss) and the zero-shot evaluation."""
    rows, scanned, zero = [], {}, {}
    for name, lora in GRID.items():
        fs, losses = sorted(factors), {}
        while True:
            for f in fs:
                if f not in losses:
                    cfg = {**grid_config(base, lora), "lr": base["lr"] * f}
                    losses[f] = retrain(cfg, grid_folder(out, name) / f"lr{f:.3g}", 1)[0][0]["eval_loss"]
            best = min(losses, key=losses.get)
            if len(fs) >= most or len(fs) < 2 or best not in (fs[0], fs[-1]):
                break
            fs = [fs[0] ** 2 / fs[1], *fs] if best == fs[0] else [*fs, fs[-1] ** 2 / fs[-2]]
        cfg = {**grid_config(base, lora), "lr": base["lr"] * best}
        results, state = retrain(cfg, grid_folder(out, name) / f"lr{best:.3g}", seeds)
        rows.append(row(f"grid {name}, own lr (x{best:.3g})", cfg, results, state["trainable"], seeds))
        scanned[name], zero = (losses, best), zero or state.get("before")
    columns = sorted({f for losses, _ in scanned.values() for f in losses})
    scan = ["| configuration | " + " | ".join(f"lr x{f:.3g}" for f in columns) + " | chosen |",
            "|---|" + "---:|" * (len(columns) + 1)]
    for name, (losses, best) in scanned.items():
        scan.append(f"| {name} | " + " | ".join(f"{losses[f]:.4f}" if f in losses else "-" for f in columns) +
                    f" | x{best:.3g} |")
    return rows, scan, zero


def targets(tune_s: float, grid_s: float | None) -> list[str]:
    """issue 36's targets, against the grid's best row (the own-lr grid when there is one): suggest's or tune's pick
    has a mean within one std (the best's) of the best's, at most half its parameters, at most twice its spread;
    tune takes less wall time than the grid."""
    full = max(m["seeds"] for m in MEASURED.values()) if MEASURED else 0  # rows with every seed
    grid = {n: m for n, m in MEASURED.items() if n.startswith("grid") and "own lr" in n and m["seeds"] == full} or \
        {n: m for n, m in MEASURED.items() if n.startswith("grid") and m["seeds"] == full}
    if not grid:
        return []
    name = min(grid, key=lambda n: grid[n]["mean"])
    b = grid[name]
    out = [f"grid's best: {name}, {b['mean']:.4f} ± {b['std']:.4f}, {b['trainable']:,} parameters"]
    for pick in ("suggested", "best (tune)"):
        m = MEASURED.get(pick)
        if m:
            checks = {"mean within the best's std": m["mean"] <= b["mean"] + b["std"],
                      "<= 50% of its parameters": m["trainable"] <= b["trainable"] / 2,
                      "spread <= 2x its": m["std"] <= 2 * b["std"]}
            out.append(f"{pick}: {m['mean']:.4f} ± {m['std']:.4f}, {m['trainable'] / b['trainable']:.0%} of the "
                       "parameters; " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))
    if grid_s:
        out.append(f"tune {tune_s:.0f} s against the grid's {grid_s:.0f} s: {'less' if tune_s < grid_s else 'MORE'}")
    return out


def run_tune(args, study_dir: Path) -> float:
    """The study (with its default seeded re-runs), timed once: a rerun of the benchmark reads the time back."""
    timing = study_dir / "benchmark_wall_s.json"
    if timing.is_file():
        register_tune_runs(study_dir)
        return json.loads(timing.read_text())["tune_s"]
    extra = ()
    if args.grid_only:  # trial 0 alone is suggest's configuration, and a space without "probed" skips the probe
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "space.yaml").write_text("targets: [qv, attention, mlp, all-linear]\n")
        args.trials, extra = 1, ("--space", args.output / "space.yaml")
    t0 = time.perf_counter()
    sh("tune", "--trials", args.trials, "--steps", args.steps, "--seeds", 1 if args.grid_only else args.seeds,
       "--output", study_dir, "--sampler-seed", 0, *(("--config", args.config) if args.config else ()), *extra)
    tune_s = time.perf_counter() - t0
    timing.write_text(json.dumps({"tune_s": tune_s}))
    register_tune_runs(study_dir)
    return tune_s


def study_configs(study_dir: Path, grid_only: bool) -> dict[str, dict]:
    """suggest's and probe's configurations (the study's trials 0 and 1) and tune's pick, as train configs."""
    import optuna
    import yaml

    study = optuna.load_study(study_name="lorafit", storage=f"sqlite:///{(study_dir / 'study.db').resolve()}")
    configs = {}
    for t in study.trials[:2]:  # suggest's and probe's, enqueued first
        cfg = json.loads((Path(t.user_attrs["folder"]) / "trial.json").read_text())
        cfg.pop("output")
        cfg["eval_every"] = 0
        configs[t.user_attrs.get("mark", f"trial {t.number}")] = cfg
    if not grid_only:
        configs["best (tune)"] = {**yaml.safe_load((study_dir / "best.yaml").read_text()), "eval_every": 0}
    return configs


def run_grid(base: dict, out: Path, seeds: int, top: int | None) -> tuple[list[str], float, int]:
    """The uniform grid at suggest's learning rate: every point with seeds 0..K-1, or (``top``) seed 0 for every
    point and seeds 0..K-1 for the ``top`` lowest seed-0 eval losses. Rows, the runs' summed wall time, runs."""
    done = {}
    for name, lora in GRID.items():
        cfg = grid_config(base, lora)
        done[name] = (cfg, *retrain(cfg, grid_folder(out, name), 1 if top else seeds))
    if top:
        for name in sorted(done, key=lambda n: done[n][1][0]["eval_loss"])[:top]:
            done[name] = (done[name][0], *retrain(done[name][0], grid_folder(out, name), seeds))
    rows, wall, runs = [], 0.0, 0
    for name, (cfg, results, state) in done.items():
        rows.append(row(f"grid {name}", cfg, results, state["trainable"], seeds))
        walls = WALL[grid_folder(out, name)][-len(results):]  # the last retrain's seeds
        wall, runs = wall + sum(walls), runs + len(walls)
    return rows, wall, runs


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("runs/guidance"))
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-grid", action="store_true", help="skip the uniform grid at suggest's learning rate")
    p.add_argument("--grid-top", type=int, metavar="K", help="the uniform grid with seed 0 only, and all seeds "
                   "for its K best points (a cheaper grid; its full cost is extrapolated)")
    p.add_argument("--no-warmup-row", action="store_true",
                   help="also suggest's configuration without warm-up, at a constant learning rate")
    p.add_argument("--lr-scan", type=lambda v: [float(x) for x in v.split(",")], metavar="F1,F2,...",
                   help="also the grid at each configuration's own learning rate, chosen among suggest's x F")
    p.add_argument("--grid-only", action="store_true",
                   help="no study beyond suggest's configuration (1 trial, no probe): the grid rows only")
    p.add_argument("--config", type=Path, help="training settings YAML of another task (model, data, max_length, "
                   "...), given to tune, whose trials carry them to every run (default: the embedded task)")
    return p.parse_args()


def main() -> None:
    args = arguments()
    study_dir = args.output / "tune"
    tune_s = run_tune(args, study_dir)
    configs = study_configs(study_dir, args.grid_only)
    base = dict(configs[next(iter(configs))])  # suggest's settings and learning rate: the grids' base
    if args.no_warmup_row:  # issue 36's setting: suggest's configuration at a constant lr, no warm-up
        configs = {"suggested": configs["suggested"],
                   "suggested, no warm-up, constant lr": {**base, "warmup_ratio": 0.0, "warmup_steps": 0,
                                                          "schedule": "constant"},
                   **{k: v for k, v in configs.items() if k != "suggested"}}
    header = [f"| configuration | trainable | eval loss, mean ± std ({args.seeds} seeds) | accuracy |",
              "|---|---:|---:|---:|"]
    lines, zero = list(header), None
    order = [k for k in configs if k != "probed"] + [k for k in configs if k == "probed"]  # probe's row last
    grid_rows, grid_s, runs = [], None, 0
    for name in ([] if args.grid_only else order):
        if name == "probed" and not args.no_grid:
            grid_rows, grid_s, runs = run_grid(base, args.output, args.seeds, args.grid_top)
        folder = args.output / name.split()[0].rstrip(",") if "no warm-up" not in name else args.output / "no-warmup"
        results, state = retrain(configs[name], folder, args.seeds)
        zero = zero or state.get("before")
        lines.append(row(name, configs[name], results, state["trainable"], args.seeds))
    if not args.no_grid and grid_s is None:
        grid_rows, grid_s, runs = run_grid(base, args.output, args.seeds, args.grid_top)
    lines += grid_rows
    full_grid_s = grid_s * len(GRID) * args.seeds / runs if runs else None  # every point with every seed
    scan, scan_s = [], None
    if args.lr_scan:
        t0 = time.perf_counter()
        rows, scan, scan_zero = lr_scan(base, args.output, args.lr_scan, args.seeds)
        scan_s = time.perf_counter() - t0
        lines += rows
        zero = zero or scan_zero
    if zero:
        lines.insert(2, f"| zero-shot | 0 | {zero['eval_loss']:.4f} | {zero.get('eval_accuracy', float('nan')):.3f} |")
    table = "\n".join(lines) + ("\n\nseed 0's eval loss at each learning rate (suggest's x F):\n\n" +
                                 "\n".join(scan) if scan else "")
    times = f"tune ({args.trials} trials x {args.steps} steps, {args.seeds} seeds for its top 3): {tune_s:.0f} s" + \
        (f"; grid ({runs} runs): {grid_s:.0f} s of training, {full_grid_s:.0f} s for all {len(GRID)} configs x "
         f"{args.seeds} seeds" if grid_s else "") + \
        (f"; lr scan ({len(GRID)} configs x {len(args.lr_scan)}+ lrs, then {args.seeds} seeds at the best): "
         f"{scan_s:.0f} s" if scan_s else "")
    verdict = "\n".join(f"- {line}" for line in targets(tune_s, scan_s or full_grid_s))
    (args.output / "guidance.md").write_text(table + "\n\n" + times + "\n\n" + verdict + "\n")
    print(table)
    print("\n" + times + "\n\n" + verdict)
    print(f"\nalso: {study_dir / 'results.md'}, {study_dir / 'pareto.png'}, {study_dir / 'importances.png'}")


if __name__ == "__main__":
    main()
