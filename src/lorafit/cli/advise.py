"""The guidance commands: `lorafit suggest`, `lorafit probe` and `lorafit sweep` (a thin layer over
lorafit.advise).

    lorafit suggest --model DIR [--complexity simple|complex] [--memory-budget 8GB] [--param-budget N]
                    [--goal quality|efficiency] [--device auto] [--output cfg.yaml]
    lorafit probe   [--model DIR --data FILE] [--budget PARAMS] [--batches 4] [--output DIR]
    lorafit sweep   [--model DIR --data FILE] --grid "r=4,8;targets=qv,all-linear" [--include-suggested]
                    [--include-probed [probe.yaml]] [--steps 30] [--output DIR]

Where neither model nor data is set (by a flag or in --config's YAML), probe and sweep run the embedded demo
(SmolLM2-135M-Instruct, movie-review sentiment) with the demo's settings (``lorafit.train.settings``). Every YAML
written here is taken by ``lorafit train --config``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import ConfigError
from ..files import read_json, write_json
from .common import (
    EMBEDDED_MODEL,
    RUN_NEEDS,
    add_device_flag,
    add_max_length_flag,
    add_model_flag,
    add_output_flag,
    add_target_parameters_flag,
    device_line,
    non_negative_int,
    positive_int,
    read_yaml,
    require_demo,
    target_modules_arg,
    write_yaml,
)
from .train import RUN_FLAGS, add_run_flags, run_settings

# --- suggest ---------------------------------------------------------------------------------------------

def cmd_suggest(args: argparse.Namespace) -> int:
    from ..advise.plan import current_rss
    from ..advise.suggest import suggest
    from ..devices import resolve_device
    from ..hf import meta_model

    device, why = resolve_device(args.device)  # an absent device: exit 2 before any work
    model_dir = args.model
    require_demo("suggest", model_dir)
    print(device_line(device, why=why))
    if model_dir is None:
        from ..demo.assets import smollm2
        model_dir = smollm2()
    model = meta_model(model_dir)
    s = suggest(model, complexity=args.complexity, memory_budget=args.memory_budget,
                param_budget=args.param_budget, goal=args.goal, batch_size=args.batch_size,
                max_length=args.max_length, runtime=current_rss(), device=device,
                target_parameters=args.target_parameters)
    cfg = s.config
    print(f"suggested LoRA config for {model_dir}: r={cfg.r} lora_alpha={cfg.lora_alpha:g} "
          f"target_modules={cfg.target_modules!r}" + (" use_dora=true" if cfg.use_dora else "")
          + (f" target_parameters={cfg.target_parameters!r}" if cfg.target_parameters else "")
          + (f" rank_pattern={cfg.rank_pattern}" if cfg.rank_pattern else "")
          + f"  ({s.trainable:,} adapter parameters)")
    for line in s.reasons:
        print(f"  - {line}")
    if args.output:
        data = {"model": str(model_dir), **s.to_yaml_dict()}
        write_yaml(Path(args.output), data, "# lorafit suggest: train with `lorafit train --config THIS --data ...`\n")
        print(f"config written to {args.output} (lorafit train --config {args.output} --data FILE)")
    return 0 if s.fits else 1


# --- probe -----------------------------------------------------------------------------------------------

def cmd_probe(args: argparse.Namespace) -> int:
    from ..advise.probe import plot_spectra, probe_summary, probe_table
    from ..advise.probe_task import run_probe
    from ..advise.suggest import lora_yaml

    settings = run_settings(args)
    result, model_dir = run_probe(settings, batches=args.batches, budget=args.budget, energy=args.energy,
                                  candidates=args.candidates, sketch=args.sketch, max_rank=args.max_rank,
                                  curvature=not args.no_curvature, newton=args.newton)
    out = Path(args.output or Path("runs") / time.strftime("probe-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    print(probe_table(result, top=args.top))
    train_yaml = {k: settings[k] for k in ("model", "data") if settings.get(k) is not None}
    write_yaml(out / "probe.yaml", {**train_yaml, "lora": lora_yaml(result.config)},
                f"# lorafit probe: complexity score {result.score:.1f} ({result.complexity}), "
                f"{result.trainable:,} adapter parameters\n"
                f"# train with `lorafit train --config {out / 'probe.yaml'}`\n")
    write_json(out / "probe.json", probe_summary(result), indent=1)
    plot_spectra(result, out / "spectra.png")
    print(f"\nwrote {out / 'probe.yaml'} (lorafit train --config), {out / 'probe.json'} and {out / 'spectra.png'}")
    return 0


# --- sweep -----------------------------------------------------------------------------------------------

def _probed_point(args: argparse.Namespace, settings: dict, out: Path):
    """(LoraConfig, complexity) of the probed point: from --include-probed's YAML, or probed now (and kept in
    OUT/probed.yaml, so that a resumed sweep sweeps the same point)."""
    from ..advise.probe_task import run_probe
    from ..advise.suggest import lora_yaml
    from ..lora_config import LoraConfig

    probed_file = out / "probed.yaml" if args.include_probed == "" else Path(args.include_probed)
    if args.include_probed == "" and not probed_file.is_file():
        result, _ = run_probe(settings, budget=args.budget)
        write_yaml(probed_file, {"lora": lora_yaml(result.config), "complexity": result.complexity})
    probed = read_yaml(str(probed_file))
    if not isinstance(probed.get("lora"), dict):
        raise ConfigError(f"{probed_file} has no 'lora:' section; pass a YAML written by lorafit probe")
    complexity = args.complexity
    report = probed_file.with_name("probe.json")  # lorafit probe writes the complexity there
    if complexity is None and report.is_file():
        complexity = read_json(report, error=ConfigError).get("complexity")
    return LoraConfig.from_dict(probed["lora"]), complexity or probed.get("complexity")


def sweep_points(args: argparse.Namespace, settings: dict, out: Path, meta) -> tuple[dict, dict]:
    """({point name: LoraConfig}, {point name: mark}) for --grid, --include-probed and --include-suggested."""
    from ..advise.suggest import suggest, with_parameters
    from ..advise.sweep import parse_grid, point_config, point_name
    from ..train.train_config import TrainConfig

    grid = parse_grid(args.grid) if args.grid else []
    if not grid and not args.include_suggested and args.include_probed is None:
        raise ConfigError("nothing to sweep: give --grid (e.g. 'r=4,8;targets=qv,all-linear') and/or "
                          "--include-suggested / --include-probed")
    points = {point_name(p): point_config(meta, p) for p in grid}
    marked: dict[str, str] = {}
    complexity = args.complexity
    if args.include_probed is not None:
        points["probed"], complexity = _probed_point(args, settings, out)
        marked["probed"] = "probed"
    if args.include_suggested:
        cfg = TrainConfig.from_dict(dict(settings))
        s = suggest(meta, complexity=complexity, param_budget=args.budget, goal="quality",
                    batch_size=cfg.batch_size, max_length=cfg.max_length, runtime=0,
                    target_parameters=args.target_parameters)
        points["suggested"] = s.config
        marked["suggested"] = "suggested"
        print("suggested: " + "; ".join(s.reasons[:3]))
    if args.target_parameters is not None:  # in every point
        points = {n: with_parameters(meta, cfg, args.target_parameters) for n, cfg in points.items()}
    return points, marked


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..advise.sweep import results_markdown, sweep
    from ..hf import meta_model
    from ..train.loop import resolve_model_dir
    from ..train.trackers import check_installed, parse_report_to
    from ..train.train_config import TrainConfig

    settings = run_settings(args)
    check_installed(parse_report_to(settings.get("report_to")))  # before the probe and the first point
    out = Path(args.output or Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    meta = meta_model(resolve_model_dir(TrainConfig.from_dict(dict(settings))))
    points, marked = sweep_points(args, settings, out, meta)
    rows = sweep(points, settings, out, marked=marked, quiet=not args.verbose)
    print(results_markdown(rows))
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.md'} and {out / 'pareto.png'}")
    return 0


# --- parsers ---------------------------------------------------------------------------------------------

def add_suggest_parser(sub) -> None:
    p = sub.add_parser("suggest", help="suggest a LoRA config from the rules of thumb, checked against a memory "
                       "and parameter budget",
                       description="Suggest a LoRA configuration (rank, alpha, targets, variant) with one line of "
                                   "reasoning per choice. Exit code 1 when nothing fits the budget.")
    add_model_flag(p, default=EMBEDDED_MODEL)
    p.add_argument("--complexity", choices=["simple", "complex"], help="task complexity (default: unknown, "
                   "treated as simple; `lorafit probe` measures it)")
    p.add_argument("--memory-budget", help="peak training memory allowed, e.g. 8GB or 512MB (default: the GPU's "
                   "free memory on CUDA, else none)")
    p.add_argument("--param-budget", help="most adapter parameters, e.g. 2M or 500k (default: none)")
    p.add_argument("--goal", choices=["quality", "efficiency"], default="quality", help="what matters more "
                   "(default: quality)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="training batch for the memory check "
                   "(default: 8)")
    add_max_length_flag(p, "what the memory check assumes")
    add_device_flag(p, "the memory check estimates its memory (a GPU's, or the CPU's peak RSS)")
    add_target_parameters_flag(p, "in the suggested config", "a MoE model's expert weights with all linear layers")
    add_output_flag(p, "a YAML config for `lorafit train --config`", default="print only")
    p.set_defaults(func=cmd_suggest, needs=("transformers", "yaml"))


def add_probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="measure per-module gradient spectra on the data and allocate ranks "
                       "(rank_pattern) under a parameter budget",
                       description="Accumulate each candidate module's full fine-tuning gradient over a few "
                                   "batches, derive its effective rank and allocate LoRA ranks greedily by "
                                   "predicted loss decrease per parameter. Writes probe.yaml (for lorafit train "
                                   "--config), probe.json and spectra.png.")
    add_run_flags(p, RUN_FLAGS + ("device",))
    p.add_argument("--budget", help="most adapter parameters, e.g. 500k (default: none; stop at --energy)")
    p.add_argument("--batches", type=positive_int, default=4, help="batches to accumulate (default: 4)")
    p.add_argument("--energy", type=float, default=0.9, help="share of the spectral energy / predicted gain to "
                   "cover (default: 0.9)")
    p.add_argument("--candidates", type=target_modules_arg, default="all-linear", help="candidate modules: "
                   "all-linear, comma-separated names or a regex (default: all-linear)")
    p.add_argument("--sketch", type=positive_int, help="keep a randomised rank-K sketch of each gradient instead "
                   "of the full matrix, O((in+out)K) memory (default: exact)")
    p.add_argument("--max-rank", type=positive_int, default=64, help="highest rank given to one module "
                   "(default: 64)")
    p.add_argument("--no-curvature", action="store_true", help="rank by raw gradient energy instead of the "
                   "Fisher-scaled gain (default: off)")
    p.add_argument("--newton", type=non_negative_int, default=0, metavar="STEPS", help="rank the joint "
                   "Gauss-Newton step of all candidates instead of each one's gradient, solved by STEPS "
                   "conjugate-gradient steps (each about three passes over the batches; 40-80 typical): separates "
                   "modules whose gradients overlap (v/o projections, residual-stream writers). 0 = off (default: 0)")
    p.add_argument("--top", type=positive_int, default=25, help="table rows to print (default: 25)")
    add_output_flag(p, "the folder for probe.yaml, probe.json and spectra.png", default="runs/probe-<timestamp>")
    p.set_defaults(func=cmd_probe, needs=RUN_NEEDS)


def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of LoRA configs for the same steps; table and Pareto plot",
                       description="Train every grid point (plus the suggested and probed configs) for the same "
                                   "number of steps and compare eval loss against trainable parameters. Resumable: "
                                   "rerun with the same --output and finished points are read back.")
    add_run_flags(p, RUN_FLAGS + ("steps", "lr", "eval_max", "device", "report_to"))
    p.add_argument("--grid", help="e.g. 'r=4,8,16;targets=qv,all-linear;variant=lora,dora' (keys r, targets, "
                   "variant, alpha; default: none)")
    p.add_argument("--include-suggested", action="store_true", help="add `lorafit suggest`'s config "
                   "(default: off)")
    p.add_argument("--include-probed", nargs="?", const="", metavar="PROBE_YAML", help="add the probed config: "
                   "from a probe.yaml, or probe now when no file is given (default: off)")
    p.add_argument("--complexity", choices=["simple", "complex"], help="task complexity for the suggestion "
                   "(default: the probe's, else simple)")
    p.add_argument("--budget", help="adapter parameter budget for the probed and suggested points (default: none)")
    p.add_argument("--verbose", action="store_true", help="show each run's progress (default: log lines only)")
    add_target_parameters_flag(p, "in every point", "none; the grid key experts=off,on switches them")
    add_output_flag(p, "the sweep folder; rerun with it to resume", default="runs/sweep-<timestamp>")
    p.set_defaults(func=cmd_sweep, needs=RUN_NEEDS)


def add_parsers(sub) -> None:
    """The suggest, probe and sweep subcommands."""
    add_suggest_parser(sub)
    add_probe_parser(sub)
    add_sweep_parser(sub)
