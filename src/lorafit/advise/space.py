"""The search space of `lorafit tune`: the design note's knobs, read from ``--space space.yaml``, sampled by Optuna.

    r        rank, an integer range sampled on a log scale          default {low: 1, high: 64}
    targets  qv | attention | mlp | all-linear | probed               default all five
    alpha    lora_alpha, the same at every rank (the convention)     default [8, 16, 32]
    rslora   scale alpha/sqrt(r) instead of alpha/r                   default [false, true]
    dora     DoRA's learned magnitude                                 default [false, true]
    experts  a MoE model's expert weights too (target_parameters)     default [false, true]; [false] on dense models
    lr       AdamW peak learning rate, log-uniform                    default suggested/10 .. suggested·10

A range is ``{low: A, high: B}``; a choice is a list. ``probed`` is the probe's rank pattern, its ranks scaled so
that its most common rank is the trial's r. Under Adam, alpha and lr act alike (the step of B·A is ~alpha·lr, see
lorafit.advise.suggest), so alpha gets a few choices and lr the wide range. ``experts`` adds every expert weight
at r/k per expert (suggest's rule); a trial with experts takes no DoRA (expert weights have none), so ``dora`` is
sampled only without them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Optional

from torch import nn

from ..errors import ConfigError
from ..lora_config import LoraConfig

TARGET_SETS = ("qv", "attention", "mlp", "all-linear", "probed")
KNOBS = ("r", "targets", "alpha", "rslora", "dora", "lr", "experts")


@dataclass(frozen=True)
class Space:
    """Ranges are (low, high); choices are tuples. ``lr`` None: around the suggested learning rate."""

    r: tuple = (1, 64)
    targets: tuple = TARGET_SETS
    alpha: tuple = (8.0, 16.0, 32.0)
    rslora: tuple = (False, True)
    dora: tuple = (False, True)
    lr: Optional[tuple] = None
    experts: tuple = (False, True)

    def around(self, lr: float) -> "Space":
        """This space with the default lr range filled in: a decade either side of ``lr`` (capped below 1)."""
        return self if self.lr is not None else replace(self, lr=(lr / 10, min(lr * 10, 0.5)))

    def to_dict(self) -> dict:
        """Plain data, the study's record of its space (compared when a study is reopened)."""
        return {k: list(v) for k, v in asdict(self).items()}


def _range(key: str, value, cast, low_ok, what: str) -> tuple:
    if not isinstance(value, dict) or set(value) != {"low", "high"}:
        raise ConfigError(f"space key {key!r} is a range: write {{low: A, high: B}}, e.g. {key}: {{low: 1, high: 64}}")
    try:
        low, high = cast(value["low"]), cast(value["high"])
    except (TypeError, ValueError):
        raise ConfigError(f"space key {key!r}: low and high must be {what}") from None
    if not (low_ok(low) and low_ok(high)):
        raise ConfigError(f"space key {key!r}: low and high must be {what}, got {low} and {high}")
    if low > high:
        raise ConfigError(f"space key {key!r} is an empty range: low {low} > high {high}")
    return (low, high)


def _choices(key: str, value, ok, what: str) -> tuple:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"space key {key!r} is empty: give at least one of {what}")
    bad = [v for v in items if not ok(v)]
    if bad:
        raise ConfigError(f"space key {key!r}: {bad[0]!r} is not one of {what}")
    return tuple(dict.fromkeys(items))


def parse_space(data: dict) -> Space:
    """A Space from a mapping (a --space YAML); unknown keys and empty ranges or lists raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError("a search space must be a mapping of knob names to ranges or lists, e.g. 'r: {low: 1, "
                          "high: 64}'")
    unknown = sorted(set(data) - set(KNOBS))
    if unknown:
        raise ConfigError(f"unknown search-space key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(KNOBS)}")
    kw = {}
    if "r" in data:
        kw["r"] = _range("r", data["r"], _int, lambda v: v >= 1, "integers >= 1")
    if "lr" in data:
        kw["lr"] = _range("lr", data["lr"], float, lambda v: 0 < v < 1, "numbers in (0, 1)")
    if "targets" in data:
        kw["targets"] = _choices("targets", data["targets"], lambda v: v in TARGET_SETS, ", ".join(TARGET_SETS))
    if "alpha" in data:
        kw["alpha"] = tuple(float(a) for a in _choices("alpha", data["alpha"], _positive, "positive numbers"))
    for key in ("rslora", "dora", "experts"):
        if key in data:
            kw[key] = _choices(key, data[key], lambda v: isinstance(v, bool), "true, false")
    return Space(**kw)


def _int(v) -> int:
    if isinstance(v, bool) or not float(v).is_integer():
        raise ValueError(v)
    return int(v)


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def sample(trial, space: Space) -> dict:
    """One point of ``space`` from an Optuna trial (fixed params of an enqueued trial are taken as given)."""
    point = {"r": trial.suggest_int("r", space.r[0], space.r[1], log=True),
             "targets": trial.suggest_categorical("targets", list(space.targets)),
             "alpha": trial.suggest_categorical("alpha", list(space.alpha)),
             "rslora": trial.suggest_categorical("rslora", list(space.rslora))}
    experts = trial.suggest_categorical("experts", list(space.experts)) if space.experts != (False,) else False
    dora = trial.suggest_categorical("dora", list(space.dora)) if not experts else False
    return {**point, "dora": dora, "lr": trial.suggest_float("lr", space.lr[0], space.lr[1], log=True),
            **({"experts": True} if experts else {})}


def within(params: dict, space: Space) -> dict:
    """The values of ``params`` the space holds (ranges clipped), for enqueuing suggest's and probe's configs."""
    out = {}
    for key, value in params.items():
        bounds = getattr(space, key)
        if key in ("r", "lr"):
            out[key] = min(max(value, bounds[0]), bounds[1])
        elif value in bounds:
            out[key] = value
    return out


def scaled_pattern(probed: LoraConfig, r: int) -> LoraConfig:
    """The probed rank pattern with its most common rank set to ``r`` and the others in proportion (at least 1)."""
    factor = r / probed.r
    ranks = {k: max(1, round(v * factor)) for k, v in probed.rank_pattern.items()}
    return replace(probed, r=r, rank_pattern={k: v for k, v in ranks.items() if v != r}, alpha_pattern={})


def trial_lora(model: nn.Module, params: dict, probed: Optional[LoraConfig] = None) -> LoraConfig:
    """The LoraConfig of a sampled point for ``model`` (targets found by structure, see lorafit.advise.suggest)."""
    from .suggest import target_spec

    if params["targets"] == "probed":
        if probed is None:
            raise ConfigError("targets 'probed' needs the probe's config; it was not run")
        base = scaled_pattern(probed, params["r"])
    else:
        base = LoraConfig(r=params["r"], target_modules=target_spec(model, params["targets"]))
    if params.get("experts"):
        from .suggest import expert_weights, with_parameters

        if expert_weights(model):
            base = with_parameters(model, base, "experts")
    return replace(base, lora_alpha=float(params["alpha"]), use_rslora=bool(params["rslora"]),
                   use_dora=bool(params["dora"]) and not params.get("experts"))


def trial_label(params: dict) -> str:
    """A short line for a point: "r=8 all-linear alpha=16 lora lr=8.4e-04"."""
    variant = "+".join(v for v, on in (("dora", params.get("dora")), ("rslora", params.get("rslora")),
                                         ("experts", params.get("experts"))) if on)
    return (f"r={params.get('r')} {params.get('targets')} alpha={params.get('alpha', 0):g} {variant or 'lora'} "
            f"lr={params.get('lr', 0):.2e}")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
