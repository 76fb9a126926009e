"""report.png: the training loss curve and the evaluation before and after, written atomically."""

from __future__ import annotations

from pathlib import Path

from ..files import write_figure


def plot_run(metrics: list[dict], path: Path, title: str = "lorafit") -> Path:
    """Two panels: loss per optimizer step (with a moving average), and eval accuracy or loss before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics if "loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    ax1.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax1.plot(steps, smooth, lw=2, label=f"moving average ({k})")
    ax1.set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    ax1.grid(alpha=0.3)
    ax1.legend()
    key = "eval_accuracy" if evals and all("eval_accuracy" in e for e in evals) else "eval_loss"
    if evals and all(key in e for e in evals):
        shown = [evals[0], evals[-1]] if len(evals) > 1 else evals
        labels = ["before", "after"][:len(shown)]
        bars = ax2.bar(labels, [e[key] for e in shown], color=["#999999", "#2a7ab0"][:len(shown)])
        for b, e in zip(bars, shown):
            ax2.annotate(f"{e[key]:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
        ax2.set(title=key.replace("_", " "), ylim=(0, 1.05) if key == "eval_accuracy" else None)
    else:
        ax2.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        write_figure(path, fig)
    finally:
        plt.close(fig)
    return path
