"""The evidence for docs/guidance.md's `lorafit tune` section: does the search beat the advice, by how much, and is
the difference more than seed noise?

    python benchmarks/guidance.py --output runs/guidance                 # 40 trials x 60 steps, 3 seeds (hours)
    python benchmarks/guidance.py --output runs/guidance --trials 12 --steps 30 --seeds 3

On the embedded task (SmolLM2-135M-Instruct, movie-review sentiment; the `lorafit train` demo job's data and
settings): (1) `lorafit tune` with --seeds K, which re-trains its top 3 configurations with K seeds; (2) the
suggested and the probed configurations (the study's trials 0 and 1) and the best one, each re-trained with seeds
0..K-1 for the full step budget (a pruned trial 0 or 1 is trained out here); (3) one Markdown table, mean ± std of
the eval loss and accuracy over the seeds, to paste into docs/guidance.md. Resumable: rerun the same command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def sh(*argv) -> None:
    print("+", " ".join(map(str, argv)), flush=True)
    subprocess.run([sys.executable, "-m", "lorafit", *map(str, argv)], check=True)


def retrain(cfg: dict, out: Path, seeds: int) -> list[dict]:
    """Train ``cfg`` (a train config mapping) with seeds 0..K-1 in out/seed<s>; the finished runs' eval dicts."""
    import yaml

    results = []
    for s in range(seeds):
        run = out / f"seed{s}"
        state = run / "trainer_state.json"
        if not state.is_file():
            out.mkdir(parents=True, exist_ok=True)
            cfg_file = out / f"seed{s}.yaml"
            cfg_file.write_text(yaml.safe_dump({**cfg, "seed": s}, sort_keys=False))
            if run.exists():
                sh("train", "--resume", run, "--quiet")
            else:
                sh("train", "--config", cfg_file, "--output", run, "--quiet")
        results.append(json.loads(state.read_text())["after"])
    return results


def summary(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("runs/guidance"))
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    study_dir = args.output / "tune"
    sh("tune", "--trials", args.trials, "--steps", args.steps, "--seeds", args.seeds, "--output", study_dir,
       "--sampler-seed", 0)

    import optuna
    import yaml

    study = optuna.load_study(study_name="lorafit", storage=f"sqlite:///{(study_dir / 'study.db').resolve()}")
    best = yaml.safe_load((study_dir / "best.yaml").read_text())
    configs = {"best (tune)": best}
    for t in study.trials[:2]:  # suggest's and probe's, enqueued first
        cfg = json.loads((Path(t.user_attrs["folder"]) / "trial.json").read_text())
        cfg.pop("output")
        cfg["eval_every"] = 0
        configs[t.user_attrs.get("mark", f"trial {t.number}")] = cfg
    lines = [f"| configuration | trainable | eval loss, mean ± std ({args.seeds} seeds) | accuracy |",
             "|---|---:|---:|---:|"]
    for name, cfg in configs.items():
        results = retrain(cfg, args.output / name.split()[0], args.seeds)
        state = args.output / name.split()[0] / "seed0" / "trainer_state.json"
        trainable = json.loads(state.read_text())["trainable"]
        acc = [r["eval_accuracy"] for r in results if "eval_accuracy" in r]
        lines.append(f"| {name}: r={cfg['lora'].get('r')}, lr={cfg['lr']:.2g} | {trainable:,} | "
                     f"{summary([r['eval_loss'] for r in results])} | {summary(acc) if acc else '-'} |")
    table = "\n".join(lines)
    (args.output / "guidance.md").write_text(table + "\n")
    print(table)
    print(f"\nalso: {study_dir / 'results.md'}, {study_dir / 'pareto.png'}, {study_dir / 'importances.png'}")


if __name__ == "__main__":
    main()
