"""Does warm-up keep a LoRA learning rate from spiking? The evidence for suggest's warm-up and schedule advice
(docs/guidance.md, "Warm-up and schedule").

    python benchmarks/warmup.py --config task.yaml --output runs/warmup --seeds 3 \
        --variants "constant:0,cosine:0.1" [--lr-factors 1,0.5]

Trains the task's config (a `lorafit train --config` file: model, data, steps, batch size, LoRA) with seeds
0..K-1 under each schedule:warm-up-share variant (and each learning-rate factor), and prints per variant the final
eval loss per seed, mean ± std, and the largest training loss (one batch) after the first quarter of the steps,
the largest of the seeds: a spike like issue 36's (0.89 at step 13 of 40) shows there. Resumable: a finished run is
read back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run(cfg: Path, out: Path, seed: int, schedule: str, warmup: float, factor: float) -> tuple[float, list[float]]:
    import yaml

    if not (out / "trainer_state.json").is_file():
        data = yaml.safe_load(cfg.read_text())
        data.update(seed=seed, schedule=schedule, warmup_steps=0, warmup_ratio=warmup, eval_every=0,
                    lr=data["lr"] * factor)
        out.mkdir(parents=True, exist_ok=True)
        (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        subprocess.run([sys.executable, "-m", "lorafit", "train", "--config", str(out.parent / f"{out.name}.yaml"),
                        "--output", str(out), "--quiet"], check=True)
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in m and m.get("kind") != "eval"]
    return state["after"]["eval_loss"], losses


def spike(losses: list[float]) -> float:
    return max(losses[len(losses) // 4:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--output", type=Path, default=Path("runs/warmup"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default="constant:0,cosine:0.1", help="schedule:warm-up share, comma-separated")
    p.add_argument("--lr-factors", default="1", help="multiples of the config's lr, comma-separated")
    args = p.parse_args()
    lines = ["| schedule | warm-up | lr | eval loss per seed | mean ± std | largest late batch loss |",
             "|---|---:|---:|---|---:|---:|"]
    for factor in map(float, args.lr_factors.split(",")):
        for variant in args.variants.split(","):
            schedule, warmup = variant.split(":")
            results = [run(args.config, args.output / f"{schedule}-w{warmup}-x{factor:g}" / f"seed{s}", s, schedule,
                           float(warmup), factor) for s in range(args.seeds)]
            evals = [e for e, _ in results]
            lines.append(f"| {schedule} | {float(warmup):.0%} | x{factor:g} | " +
                         " / ".join(f"{e:.3f}" for e in evals) +
                         f" | {statistics.fmean(evals):.4f} ± {statistics.stdev(evals) if len(evals) > 1 else 0:.4f}"
                         f" | {max(spike(losses) for _, losses in results):.2f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
