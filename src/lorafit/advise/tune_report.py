"""What `lorafit tune` writes from its study and the seeded re-runs (``tune.seeded_reruns``): results.csv /
results.md, pareto.png (eval loss against trainable parameters, seeded error bars, suggest's / probe's / the best
config marked; ``lorafit.advise.results``, sweep's writer too), importances.png (Optuna's parameter importances)
and best.yaml, which ``lorafit train --config`` takes.

Every file is derived from the study and its re-runs' study (``tune.seeded_reruns``) alone, so any worker, or a
rerun, writes the same ones.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable, Optional

from ..files import write_figure, write_text
from . import results
from .results import Column, number, with_mark
from .space import trial_label

TOP = 3  # configurations re-trained with --seeds K
# K by default: the fewest seeds that give a spread. Cost: up to TOP·(K-1) = 6 more full-length runs after the study
# (on an 8-trial study where most trials are pruned early, about as much again as the study itself); one seed picked
# a configuration whose third seed spiked (issue 36: 0.238 ± 0.069 against 0.193 ± 0.002 within noise).
SEEDS = 3
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
                    "seeds": len(vals), "mean": _mean(vals), "std": _std(vals),
                    "note": t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason", "") or (
                        "a seeded re-run failed (diverged or crashed)" if not all(map(math.isfinite, vals)) else ""),
                    "params": p})
    return out


def _mean(vals: list[float]) -> Optional[float]:
    """The seeds' mean eval loss; inf when one of them failed (``seeded_reruns`` records it as inf)."""
    return statistics.fmean(vals) if vals and all(map(math.isfinite, vals)) else (math.inf if vals else None)


def _std(vals: list[float]) -> Optional[float]:
    if len(vals) < 2:
        return None
    return statistics.stdev(vals) if all(map(math.isfinite, vals)) else math.inf


SPREAD_LIMIT = 2.0  # a pick's seed spread is at most this many times the calmest near-best configuration's


def pick(table: list[dict]) -> tuple[Optional[dict], str]:
    """The configuration tune picks, and the reason line.

    With seeded re-runs (``--seeds K`` > 1), the finalists are ranked by their mean eval loss over the K seeds, not
    by one run. Those within noise of the lowest mean (their means differ by at most the larger of the two seed
    standard deviations) are the candidates. A candidate whose spread is more than SPREAD_LIMIT times the calmest
    candidate's is dropped (a configuration that diverges on one seed in three is not good advice). Of the rest, the
    one with the fewest trainable parameters wins, then the smaller spread, then the lower mean. Without re-runs:
    the lowest eval loss of one seed.
    """
    complete = [r for r in table if r["state"] == "complete"]
    if not complete:
        return None, "no trial completed"
    seeded = [r for r in complete if r.get("std") is not None]
    if not seeded:
        best = min(complete, key=lambda r: r["eval_loss"])
        return best, (f"trial {best['trial']}: the lowest eval loss, {best['eval_loss']:.4f}, of one seed (--seeds K "
                      f"re-trains the top {TOP} with K seeds and ranks them by their mean)")
    finite = [r for r in seeded if math.isfinite(r["mean"])]
    if not finite:
        return None, ("every re-trained configuration failed (diverged or crashed) on one of its seeds: lower the lr "
                      "range (--space) or raise warmup_ratio")
    seeded = finite  # a configuration that fails on one seed is not advice, whatever its other seeds scored
    lead = min(seeded, key=lambda r: r["mean"])
    near = [r for r in seeded if r["mean"] - lead["mean"] <= max(lead["std"], r["std"])]
    calmest = max(min(r["std"] for r in near), 1e-4)  # a floor: equal losses to 4 places are no spread to beat
    calm = [r for r in near if r["std"] <= SPREAD_LIMIT * calmest] or near
    best = min(calm, key=lambda r: (r["trainable"] or 0, r["std"], r["mean"]))
    what = f"trial {best['trial']}: mean eval loss {best['mean']:.4f} ± {best['std']:.4f} over {best['seeds']} seeds"
    if best is lead:
        return best, what + ", the lowest mean"
    why = []
    if (best["trainable"] or 0) < (lead["trainable"] or 0):
        why.append(f"{100 * best['trainable'] / lead['trainable']:.0f}% of its parameters")
    if best["std"] < lead["std"]:
        why.append(f"{best['std'] / lead['std']:.2g}x its spread" if lead["std"] > 0 else "a smaller spread")
    return best, (what + f", within noise of the lowest mean (trial {lead['trial']}: {lead['mean']:.4f} ± "
                  f"{lead['std']:.4f}) with " + " and ".join(why or ["the same parameters and spread"]))


TABLE = (Column("trial", lambda r: str(r["trial"]), "---:"),
         Column("config", lambda r: with_mark(trial_label(r["params"]), r)), Column("state", lambda r: r["state"]),
         Column("trainable", lambda r: f"{r['trainable'] or 0:,}", "---:"),
         Column("eval loss", lambda r: number(r["eval_loss"]), "---:"),
         Column("mean ± std (seeds)", lambda r: f"{r['mean']:.4f} ± {r['std']:.4f} ({r['seeds']})"
                if r["std"] is not None else "", "---:"),
         Column("note", lambda r: r["note"]))


def markdown(table: list[dict]) -> str:
    """The study's table in Markdown (complete trials first, best eval loss first)."""
    return results.markdown(table, TABLE)


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
    """A bar per parameter, its importance (``importances``); written atomically."""
    plt = results.pyplot()
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
    try:
        write_figure(path, fig)
    finally:
        plt.close(fig)


def best_yaml(job, study, best) -> dict:
    """The best configuration as a ``lorafit train --config`` mapping: the study's settings, its lr, its LoRA."""
    trial = study.trials[best["trial"]]
    settings = {k: v for k, v in job.settings.items() if k not in ("output", "save_every")}
    return {**settings, "lr": best["lr"], "lora": trial.user_attrs["lora"]}


def report(job, study, seeds: dict[int, list[float]], say: Callable[[str], None] = print) -> dict:
    """Write every output file; returns {"rows", "best", "importances", "files"}."""
    import yaml

    out = job.output
    table = rows(study, seeds)
    best, reason = pick(table)
    files = results.write_results(table, out, columns=COLUMNS, table=TABLE, best=best,
                                  title=f"lorafit tune: {job.settings.get('steps')} steps per trial")
    imp = importances(study)
    plot_importances(imp, out / "importances.png")
    files.append(out / "importances.png")
    if best is not None:
        seeded = (f"# seeded eval loss: {best['mean']:.4f} ± {best['std']:.4f} over {best['seeds']} seeds\n"
                  if best.get("std") is not None else "# one seed (--seeds 1): no spread measured\n")
        write_text(out / "best.yaml", f"# lorafit tune: best of study {job.study!r} (trial {best['trial']}); train "
                   f"with `lorafit train --config {out / 'best.yaml'}`\n{seeded}# why: {reason}\n"
                   + yaml.safe_dump(best_yaml(job, study, best), sort_keys=False))
        files.append(out / "best.yaml")
    say(markdown(table))
    say(f"picked {reason}")
    say("wrote " + ", ".join(str(f) for f in files))
    return {"rows": table, "best": best, "reason": reason, "importances": imp, "files": files}
