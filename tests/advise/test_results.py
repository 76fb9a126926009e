"""lorafit.advise.results: the one results.csv / results.md / pareto.png writer of sweep and tune."""

from __future__ import annotations

import csv

from lorafit.advise.results import Column, markdown, number, pareto_front, plot_pareto, with_mark, write_results

ROWS = [{"name": "a", "trainable": 100, "eval_loss": 1.0, "mark": "", "state": "complete"},
        {"name": "b|c", "trainable": 200, "eval_loss": 0.8, "mark": "suggested", "state": "complete", "mean": 0.85,
         "std": 0.05},
        {"name": "p", "trainable": 50, "eval_loss": 0.5, "mark": "", "state": "pruned"},
        {"name": "f", "trainable": 400, "eval_loss": None, "mark": "probed", "state": "failed"}]
TABLE = (Column("point", lambda r: with_mark(r["name"], r)),
         Column("trainable", lambda r: f"{r['trainable']:,}", "---:"),
         Column("eval loss", lambda r: number(r["eval_loss"]), "---:"))


def test_markdown_orders_complete_rows_by_loss_and_escapes_pipes():
    assert markdown(ROWS, TABLE).splitlines() == [
        "| point | trainable | eval loss |", "|---|---:|---:|",
        "| b/c (suggested) | 200 | 0.8000 |", "| a | 100 | 1.0000 |", "| p | 50 | 0.5000 |",
        "| f (probed) | 400 | - |"]


def test_pareto_front_by_any_key():
    rows = [{"trial": n, "trainable": t, "eval_loss": loss} for n, t, loss in
            [(0, 100, 1.0), (1, 200, 0.8), (2, 300, 0.9), (3, 50, None)]]
    assert pareto_front(rows, key="trial") == {0, 1}


def test_write_results_writes_the_callers_columns_and_a_png(tmp_path):
    paths = write_results(ROWS, tmp_path, columns=("name", "eval_loss", "mark"), table=TABLE, title="t",
                          best=ROWS[1], label=lambda r: r["name"])
    assert [p.name for p in paths] == ["results.csv", "results.md", "pareto.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png", "results.csv", "results.md"]  # no temp files
    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert list(table[0]) == ["name", "eval_loss", "mark"] and [r["name"] for r in table] == ["a", "b|c", "p", "f"]
    assert (tmp_path / "results.md").read_text().endswith("| f (probed) | 400 | - |\n")
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_pareto_without_any_eval_loss(tmp_path):
    out = plot_pareto([{"trainable": 10, "eval_loss": None}], tmp_path / "p.png", title="empty")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_far_pruned_trial_does_not_flatten_the_completed_ones(tmp_path):
    """tune's pareto.png on a real study: one trial pruned at eval loss 4.26 squashed seven near 0.1 into a line.
    The loss axis now spans the completed trials; the pruned one sits at the top edge with its value."""
    from lorafit.advise.results import loss_limits

    rows = [{"trainable": 10_000 * (i + 1), "eval_loss": 0.08 + 0.01 * i, "state": "complete"} for i in range(7)]
    rows.append({"trainable": 50_000, "eval_loss": 4.26, "state": "pruned"})
    low, high, above = loss_limits(rows)
    assert low < 0.08 and 0.14 < high < 0.25 and [r["eval_loss"] for r in above] == [4.26]
    assert loss_limits(rows[:7]) is None  # nothing beyond: matplotlib's own limits
    near = rows[:7] + [{"trainable": 1, "eval_loss": 0.16, "state": "pruned"}]
    assert loss_limits(near) is None  # a pruned trial within reach stays on the plot as it is
    assert plot_pareto(rows, tmp_path / "p.png", title="study").stat().st_size > 1000


# --- tune's pick (lorafit.advise.tune_report.pick) --------------------------------------------------------------

def _row(trial, trainable, losses):
    import statistics

    return {"trial": trial, "state": "complete", "trainable": trainable, "eval_loss": losses[0],
            "seeds": len(losses), "mean": statistics.fmean(losses),
            "std": statistics.stdev(losses) if len(losses) > 1 else None}


def test_a_noisy_configuration_loses_to_a_stable_one_of_equal_mean():
    from lorafit.advise.tune_report import pick

    noisy = _row(0, 2_440_000, [0.186, 0.210, 0.317])  # the all-linear r=8: one seed in three spikes
    stable = _row(1, 2_440_000, [0.236, 0.238, 0.240])  # the same mean, 30x less spread
    best, reason = pick([noisy, stable])
    assert best is stable, reason
    assert "within noise of the lowest mean (trial 0" in reason and "spread" in reason


def test_a_smaller_configuration_within_noise_wins_and_one_outside_noise_does_not():
    from lorafit.advise.tune_report import pick

    big = _row(0, 9_770_000, [0.168, 0.219, 0.174])  # 0.187 ± 0.028
    small = _row(1, 1_840_000, [0.193, 0.194, 0.191])  # 0.193 ± 0.002: within noise, 19% of the parameters
    tiny = _row(2, 310_000, [0.252, 0.250, 0.242])  # 0.248: outside noise
    best, reason = pick([big, small, tiny])
    assert best is small and "19% of its parameters" in reason, reason
    best, reason = pick([big, tiny])
    assert best is big and reason.endswith("the lowest mean"), reason


def test_a_configuration_that_fails_on_one_seed_is_never_picked():
    """seeded_reruns records a diverged or crashed re-run as inf: the row's mean and spread are inf, and the pick
    goes to a configuration that finished every seed, however good the failed one's other seeds were."""
    import math

    from lorafit.advise.tune_report import _mean, _std, pick

    losses = [0.05, math.inf, 0.06]
    failed = {**_row(0, 300_000, [0.05, 0.06]), "seeds": 3, "mean": _mean(losses), "std": _std(losses)}
    assert failed["mean"] == failed["std"] == math.inf
    steady = _row(1, 2_440_000, [0.09, 0.10, 0.11])
    best, reason = pick([failed, steady])
    assert best is steady and reason.endswith("the lowest mean"), reason
    best, reason = pick([failed])
    assert best is None and "failed (diverged or crashed) on one of its seeds" in reason
    assert math.isclose(_mean([0.1, 0.2]), 0.15)
    assert _mean([]) is None and _std([0.1]) is None


def test_without_seeded_reruns_the_lowest_eval_loss_is_picked():
    from lorafit.advise.tune_report import pick

    rows = [_row(0, 100, [0.3]), _row(1, 50, [0.2]), {**_row(2, 10, [0.1]), "state": "pruned"}]
    best, reason = pick(rows)
    assert best["trial"] == 1 and "one seed" in reason
    assert pick([rows[2]]) == (None, "no trial completed")
