"""What `lorafit tune` writes from its study and the seeded re-runs (``tune.seeded_reruns``): results.csv /
results.md, pareto.png (eval loss against trainable parameters, seeded error bars, suggest's / probe's / the best
config marked), importances.png (Optuna's parameter importances) and best.yaml, which ``lorafit train --config``
takes.

Every file is derived from the study and its re-runs' study (``tune.seeded_reruns``) alone, so any worker, or a
rerun, writes the same ones.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Callable

from .space import trial_label

TOP = 3  # configurations re-trained with --seeds K
COLUMNS = ("trial", "mark", "state", "r", "targets", "alpha", "variant", "lr", "trainable", "eval_loss",
           "seeds", "mean", "std", "note")


def _done(study) -> list:
    """Finished trials: complete, pruned, failed for a reason (a trial failed for a lost heartbeat was re-run)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs)]


def rows(study, seeds: dict[int, list[float]]) -> list[dict]:
    """One row per finished trial, in trial order."""
    out = []
    for t in _done(study):
        p = t.params
        vals = seeds.get(t.number, [])
        variant = "+".join(v for v, on in (("dora", p.get("dora")), ("rslora", p.get("rslora"))) if on) or "lora"
        loss = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                    if t.intermediate_values else None)
        out.append({"trial": t.number, "mark": t.user_attrs.get("mark", ""), "state": t.state.name.lower(),
                    "r": p.get("r"), "targets": p.get("targets"), "alpha": p.get("alpha"), "variant": variant,
                    "lr": p.get("lr"), "trainable": t.user_attrs.get("trainable"), "eval_loss": loss,
                    "seeds": len(vals), "mean": statistics.fmean(vals) if vals else None,
                    "std": statistics.stdev(vals) if len(vals) > 1 else None,
                    "note": t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason", ""),
                    "params": p})
    return out


def best_row(table: list[dict]):
    """The complete trial with the lowest seeded mean (where re-trained) or eval loss."""
    complete = [r for r in table if r["state"] == "complete"]
    return min(complete, key=lambda r: r["mean"] if r["mean"] is not None else r["eval_loss"], default=None)


def markdown(table: list[dict]) -> str:
    lines = ["| trial | config | state | trainable | eval loss | mean ± std (seeds) | note |",
             "|---:|---|---|---:|---:|---:|---|"]
    order = sorted(table, key=lambda r: (r["state"] != "complete", r["eval_loss"] is None, r["eval_loss"] or 0.0))
    for r in order:
        name = trial_label(r["params"]) + (f" ({r['mark']})" if r["mark"] else "")
        seeded = f"{r['mean']:.4f} ± {r['std']:.4f} ({r['seeds']})" if r["std"] is not None else ""
        loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        lines.append(f"| {r['trial']} | {name} | {r['state']} | {r['trainable'] or 0:,} | {loss} | {seeded} | "
                     f"{r['note'].replace('|', '/')} |")
    return "\n".join(lines)


def write_table(table: list[dict], out: Path) -> None:
    from ..files import write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    write_text(out / "results.csv", buf.getvalue())
    write_text(out / "results.md", markdown(table) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_pareto(table: list[dict], best, path: Path, title: str) -> None:
    """Eval loss against trainable parameters (log x); seeded configs with ±std bars; marked configs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for state, color in (("complete", "#2a7ab0"), ("pruned", "#bbbbbb")):
        pts = [r for r in table if r["state"] == state and r["eval_loss"] is not None and r["trainable"]]
        ax.scatter([r["trainable"] for r in pts], [r["eval_loss"] for r in pts], s=26, color=color, zorder=3,
                   label=f"{state} (last eval)" if state == "pruned" else state)
    for r in (r for r in table if r["std"] is not None):
        ax.errorbar([r["trainable"]], [r["mean"]], yerr=[r["std"]], fmt="_", color="k", capsize=4, zorder=4)
    styles = {"suggested": ("*", "#ff7f0e", 260), "probed": ("D", "#2ca02c", 110)}
    marked = [(r, r["mark"]) for r in table if r["mark"] in styles and r["eval_loss"] is not None]
    if best is not None:
        marked.append((best, "best"))
        styles["best"] = ("o", "none", 300)
    for r, mark in marked:
        marker, color, size = styles[mark]
        y = r["mean"] if mark == "best" and r["mean"] is not None else r["eval_loss"]
        ax.scatter([r["trainable"]], [y], marker=marker, s=size, color=color, zorder=5, edgecolor="#d62728"
                   if mark == "best" else "k", linewidths=2 if mark == "best" else 1, label=mark)
    if any(r["trainable"] and r["eval_loss"] is not None for r in table):
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no trial has an eval loss yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="trainable parameters", ylabel="eval loss", title=title)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def importances(study) -> dict[str, float]:
    """Optuna's parameter importances over the complete trials, by its default evaluator (PED-ANOVA in Optuna 5,
    Watanabe et al. 2023, https://arxiv.org/abs/2304.10255); {} when the trials are too few to say."""
    import warnings

    import optuna

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            imp = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError, ZeroDivisionError):
            return {}
    too_few = any("too small" in str(w.message) for w in caught)  # it then returns equal importances
    return {} if too_few else imp


def plot_importances(imp: dict[str, float], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if imp:
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="#2a7ab0")
        ax.set(xlabel="importance (Optuna's default evaluator, normalised)")
    else:
        ax.text(0.5, 0.5, "too few complete trials with varied parameters", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("lorafit tune: parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_yaml(job, study, best) -> dict:
    """The best configuration as a ``lorafit train --config`` mapping: the study's settings, its lr, its LoRA."""
    trial = study.trials[best["trial"]]
    settings = {k: v for k, v in job.settings.items() if k not in ("output", "save_every")}
    return {**settings, "lr": best["lr"], "lora": trial.user_attrs["lora"]}


def report(job, study, seeds: dict[int, list[float]], say: Callable[[str], None] = print) -> dict:
    """Write every output file; returns {"rows", "best", "importances", "files"}."""
    import yaml

    from ..files import write_text

    out = job.output
    table = rows(study, seeds)
    best = best_row(table)
    write_table(table, out)
    plot_pareto(table, best, out / "pareto.png", f"lorafit tune: {job.settings.get('steps')} steps per trial")
    imp = importances(study)
    plot_importances(imp, out / "importances.png")
    files = [out / n for n in ("results.csv", "results.md", "pareto.png", "importances.png")]
    if best is not None:
        write_text(out / "best.yaml", f"# lorafit tune: best of study {job.study!r} (trial {best['trial']}); train "
                   f"with `lorafit train --config {out / 'best.yaml'}`\n"
                   + yaml.safe_dump(best_yaml(job, study, best), sort_keys=False))
        files.append(out / "best.yaml")
    say(markdown(table))
    say("wrote " + ", ".join(str(f) for f in files))
    return {"rows": table, "best": best, "importances": imp, "files": files}
