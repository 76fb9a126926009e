"""`lorafit sweep`: train a grid of LoRA configurations for the same step budget and compare them.

Each grid point is one ``lorafit.train.run`` in its own folder ``<output>/<point>/``; a point whose folder holds a
finished ``trainer_state.json`` is read back, never retrained, so an interrupted sweep continues where it stopped.
The results are ``results.csv``, ``results.md`` and ``pareto.png`` (``lorafit.advise.results``, tune's writer too):
eval loss against trainable parameters, with the Pareto front (no other point has both fewer parameters and a lower
loss) and the suggested / probed points marked. With ``report_to`` in the settings, each point is one experiment
tracker run, grouped under the sweep (``lorafit.train.trackers.StudyRuns``).

Grid syntax: ``"r=4,8,16;targets=qv,all-linear;variant=lora,dora"`` (the product of all values). Keys:
``r`` (ranks), ``targets`` (qv | attention | mlp | all-linear | module names joined by '+'), ``variant``
(lora | dora | rslora), ``alpha`` (numbers, or ``2r``: alpha = 2·r), ``experts`` (off | on: a mixture-of-experts
model's expert weights too, at r/k per expert as ``suggest`` advises; no DoRA there). The default is the one alpha
convention of ``suggest``, ``probe`` and ``tune`` (``suggest.LORA_ALPHA`` = 16 at every rank): with Adam an update
moves by about alpha·lr whatever the rank, so one learning rate serves the whole grid (docs/guidance.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, DataError
from ..files import read_json
from ..lora_config import LoraConfig
from ..train.trackers import StudyRuns, check_installed, parse_report_to
from .results import Column, markdown, number, pareto_front, with_mark, write_results
from .suggest import LORA_ALPHA

GRID_KEYS = ("r", "targets", "variant", "alpha", "experts")
VARIANTS = ("lora", "dora", "rslora")


def parse_grid(spec: str) -> list[dict]:
    """The grid points of a spec like "r=4,8;targets=qv,all-linear;variant=lora,dora", in product order."""
    axes: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in GRID_KEYS:
            raise ConfigError(f"grid entry {part!r} is invalid: expected key=v1,v2 with key one of "
                              f"{', '.join(GRID_KEYS)} (e.g. r=4,8,16)")
        if key in axes:
            raise ConfigError(f"grid key {key!r} is given twice")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise ConfigError(f"grid key {key!r} has no values")
        axes[key] = [_grid_value(key, v) for v in items]
    if not axes:
        raise ConfigError(f"grid {spec!r} is empty; write e.g. 'r=4,8,16;targets=qv,all-linear'")
    axes.setdefault("r", [8])
    axes.setdefault("targets", ["qv"])
    axes.setdefault("variant", ["lora"])
    axes.setdefault("alpha", [float(LORA_ALPHA)])
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _grid_value(key: str, value: str):
    if key == "r":
        if not value.isdigit() or int(value) <= 0:
            raise ConfigError(f"grid r={value!r} is invalid: expected positive integers, e.g. r=4,8,16")
        return int(value)
    if key == "variant":
        if value not in VARIANTS:
            raise ConfigError(f"grid variant={value!r} is invalid: expected {', '.join(VARIANTS)}")
        return value
    if key == "experts":
        if value not in ("off", "on"):
            raise ConfigError(f"grid experts={value!r} is invalid: expected off or on")
        return value == "on"
    if key == "alpha":
        if value == "2r":
            return value
        try:
            alpha = float(value)
        except ValueError:
            alpha = -1.0
        if alpha <= 0:
            raise ConfigError(f"grid alpha={value!r} is invalid: expected positive numbers or 2r")
        return alpha
    return value  # targets: resolved against the model by point_config


def point_name(point: dict) -> str:
    """A folder name for a grid point, e.g. "r8-qv-lora" (alpha added when not the default LORA_ALPHA)."""
    targets = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(point["targets"]))
    alpha = "" if point["alpha"] == LORA_ALPHA else "-a2r" if point["alpha"] == "2r" else f"-a{point['alpha']:g}"
    return f"r{point['r']}-{targets}-{point['variant']}{alpha}" + ("-experts" if point.get("experts") else "")


def point_config(model, point: dict) -> LoraConfig:
    """The LoraConfig of a grid point for ``model`` (targets found by structure, see lorafit.suggest)."""
    from .suggest import target_spec

    targets = point["targets"]
    spec = targets.split("+") if "+" in targets or targets not in ("qv", "attention", "mlp", "all-linear") \
        else target_spec(model, targets)
    r = point["r"]
    alpha = 2 * r if point["alpha"] == "2r" else point["alpha"]
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=spec, use_rslora=point["variant"] == "rslora",
                     use_dora=point["variant"] == "dora")
    if not point.get("experts"):
        return cfg
    from .suggest import expert_weights, with_parameters

    if not expert_weights(model):
        raise ConfigError("grid experts=on: this model has no mixture-of-experts weights")
    return with_parameters(model, cfg, "experts")  # a DoRA point is refused there (no DoRA on parameters)


# --- running ---------------------------------------------------------------------------------------------

def _finished(folder: Path) -> Optional[dict]:
    """The point's trainer_state.json when its run finished; None when absent, unreadable or not finished."""
    try:
        summary = read_json(folder / "trainer_state.json", error=DataError)
    except DataError:
        return None
    return summary if isinstance(summary, dict) and summary.get("finished") else None


def _check_same(folder: Path, cfg) -> None:
    """A folder that already holds a run must hold this point's run, or the sweep would mix two experiments."""
    import yaml

    from ..train.train_config import setting_defaults

    saved_file = folder / "config.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    # a setting an older lorafit did not write is its default (warmup_ratio before 2026-12-08)
    saved = {**setting_defaults(), **saved}
    want = cfg.to_dict()
    diff = sorted(k for k in want if k != "output" and saved.get(k) != want[k])
    if diff:
        # the demo's dtype is timed at startup (train.train_config.default_dtype), so a rerun can land on the other side
        hint = f" (or name the saved dtype: 'dtype: {saved.get('dtype')}' in --config)" if "dtype" in diff else ""
        if diff == ["warmup_ratio"]:  # a sweep from before the default warm-up (suggest.with_warmup)
            hint = f" (or name the saved warm-up: 'warmup_ratio: {saved.get('warmup_ratio')}' in --config)"
        raise ConfigError(f"{folder} holds a run with different settings ({', '.join(diff)}); use another --output "
                          f"for a different sweep{hint}")


def run_point(name: str, lora: LoraConfig, settings: dict, out: Path, *, quiet: bool = True, say=print,
              tracking: Optional[StudyRuns] = None) -> dict:
    """Train one point in ``out/name`` (or read it back when finished) and return its result row; with
    ``tracking`` (--report-to) its tracker run is one of the sweep's."""
    from ..train import TrainConfig, run

    folder = out / name
    cfg = TrainConfig.from_dict({**settings, "output": str(folder), "lora": lora.to_dict()})
    _check_same(folder, cfg)
    summary = _finished(folder)
    if summary is None:
        say(f"[{name}] training {cfg.steps} steps: r={lora.r}, targets {_targets_text(lora)}, {_variant(lora)}")
        group = tracking.group(name, point=name) if tracking is not None else None
        summary = run(cfg, resume=folder.exists(), quiet=quiet, group=group)
    else:
        say(f"[{name}] finished earlier: read back")
    after, before = summary.get("after", {}), summary.get("before", {})
    return {"name": name, "r": lora.r, "targets": _targets_text(lora), "variant": _variant(lora),
            "trainable": summary["trainable"], "eval_loss": after.get("eval_loss"),
            "eval_accuracy": after.get("eval_accuracy"), "eval_loss_before": before.get("eval_loss"),
            "wall_time_s": summary.get("wall_time_s")}


def _targets_text(lora: LoraConfig) -> str:
    t = lora.target_modules
    if lora.target_parameters:
        return _targets_text(dataclasses.replace(lora, target_parameters=None, rank_pattern={})) + "+experts"
    if isinstance(t, str):
        return t
    if lora.rank_pattern or len(t) > 6:
        return f"{len(t)} modules" + (f", r {min([lora.r, *lora.rank_pattern.values()])}-"
                                      f"{max([lora.r, *lora.rank_pattern.values()])}" if lora.rank_pattern else "")
    return "+".join(t)


def _variant(lora: LoraConfig) -> str:
    return "dora" if lora.use_dora else "rslora" if lora.use_rslora else "lora"


def sweep(points: dict[str, LoraConfig], settings: dict, out: Path, *, marked: Optional[dict[str, str]] = None,
          quiet: bool = True, say=print) -> list[dict]:
    """Train (or read back) every point, then write results.csv, results.md and pareto.png into ``out``.

    ``settings``: TrainConfig fields shared by all points (model, data, steps, lr, ...). ``marked``: point name ->
    label ("suggested", "probed") shown in the table and the plot. A job naming no warm-up trains with suggest's,
    as tune's trials do (``suggest.with_warmup``).
    """
    from .suggest import with_warmup

    settings = dict(settings)
    with_warmup(settings)
    names = parse_report_to(settings.get("report_to"))
    check_installed(names)  # a missing tracker library: before the first point
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marked = marked or {}
    tracking = StudyRuns(names, out, "sweep", {**settings, "points": list(points)}, say) if names else None
    try:
        rows = [run_point(name, cfg, settings, out, quiet=quiet, say=say, tracking=tracking)
                for name, cfg in points.items()]
        front = pareto_front(rows)
        for row in rows:
            row["pareto"] = row["name"] in front
            row["mark"] = marked.get(row["name"], "")
        files = write_results(rows, out, columns=COLUMNS, table=TABLE, label=lambda r: r["name"],
                              title=f"lorafit sweep: {settings.get('steps')} steps each")
    except BaseException as e:
        if tracking is not None:
            tracking.finish([], None, "failed" if isinstance(e, Exception) else "killed")
        raise
    if tracking is not None:
        losses = [r["eval_loss"] for r in rows if r["eval_loss"] is not None]
        tracking.finish(files, min(losses) if losses else None)
    return rows


# --- results ---------------------------------------------------------------------------------------------

COLUMNS = ("name", "mark", "r", "targets", "variant", "trainable", "eval_loss", "eval_accuracy", "eval_loss_before",
           "pareto", "wall_time_s")
TABLE = (Column("point", lambda r: with_mark(r["name"], r)), Column("r", lambda r: str(r["r"]), "---:"),
         Column("targets", lambda r: r["targets"]), Column("variant", lambda r: r["variant"]),
         Column("trainable", lambda r: f"{r['trainable']:,}", "---:"),
         Column("eval loss", lambda r: number(r["eval_loss"]), "---:"),
         Column("accuracy", lambda r: number(r.get("eval_accuracy"), ".3f"), "---:"),
         Column("Pareto", lambda r: "yes" if r.get("pareto") else "", ":---:"))


def results_markdown(rows: list[dict]) -> str:
    """The results as a Markdown table, best eval loss first."""
    return markdown(rows, TABLE)
