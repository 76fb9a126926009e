"""`lorafit inspect`: what an adapter folder holds, and which layers it moved most."""

from __future__ import annotations

from pathlib import Path

import torch

from ..ops import lora_product, scaling
from ..peft_format import read_factors
from ..targets import pattern_key

# The order transformers' experts modules register their weights in: PEFT's nesting of a module's targeted
# parameters follows it (peft_format.param_paths), which a file alone does not record.
REGISTRATION_ORDER = ("gate_up_proj", "up_proj", "down_proj")


def _parameter_files(cfg) -> dict[str, str]:
    """{PEFT module path in the file: parameter name} of an adapter's target_parameters (their registration order
    taken as transformers' experts modules have it, else alphabetical)."""
    by_owner: dict[str, list[str]] = {}
    for name in cfg.target_parameters or ():
        owner, _, leaf = name.rpartition(".")
        by_owner.setdefault(owner, []).append(leaf)
    out = {}
    for owner, leaves in by_owner.items():
        leaves = sorted(leaves, key=lambda x: (REGISTRATION_ORDER.index(x) if x in REGISTRATION_ORDER else 9, x))
        for i, leaf in enumerate(leaves):
            out[owner + ".base_layer" * (len(leaves) - 1 - i)] = f"{owner}.{leaf}"
    return out


def _expert_row(name: str, f: dict, cfg) -> dict:
    """One row for an expert-weight adapter: per-expert rank, E x out x in, ||s·ΔW||_F over all experts."""
    A, B = f["A"].float(), f["B"].float()  # (r·E, in), (out, r·E), PEFT's layout (lorafit.experts)
    k = pattern_key(cfg.rank_pattern, name)
    r = cfg.rank_pattern[k] if k is not None else cfg.r
    k = pattern_key(cfg.alpha_pattern, name)
    alpha = cfg.alpha_pattern[k] if k is not None else cfg.lora_alpha
    s = scaling(r, alpha, cfg.use_rslora)
    e = A.shape[0] // r
    delta = s * torch.bmm(B.view(B.shape[0], r, e).permute(2, 0, 1), A.view(e, r, -1))  # (E, out, in)
    return dict(name=name, kind="experts", r=r, alpha=alpha, scaling=s, shape=(e, B.shape[0], A.shape[1]),
                params=A.numel() + B.numel(), delta_norm=float(delta.norm()), dora=False)


def adapter_modules(path: str | Path) -> tuple[object, list[dict]]:
    """(config, one row per adapted module or parameter: name, kind, r, alpha, scaling, shape, params,
    ||s·B·A||_F), most moved first."""
    cfg, modules = read_factors(path)
    params = _parameter_files(cfg) if isinstance(cfg.target_parameters, list) else {}
    rows = [_expert_row(params[name], f, cfg) for name, f in modules.items() if name in params]
    for name, f in modules.items():
        if name in params:
            continue
        A, B, m = f["A"].float(), f["B"].float(), f.get("m")  # (r, in...), (out, r), (out,)
        r = A.shape[0]
        k = pattern_key(cfg.alpha_pattern, name)
        alpha = cfg.alpha_pattern[k] if k is not None else cfg.lora_alpha
        s = scaling(r, alpha, cfg.use_rslora)
        delta = s * lora_product(A, B)  # (out, in)
        rows.append(dict(name=name, kind=f["kind"], r=r, alpha=alpha, scaling=s, shape=(B.shape[0], A[0].numel()),
                         params=A.numel() + B.numel() + (m.numel() if m is not None else 0),
                         delta_norm=float(torch.linalg.matrix_norm(delta)), dora=m is not None))
    return cfg, sorted(rows, key=lambda row: -row["delta_norm"])


def inspect_report(path: str | Path) -> str:
    cfg, rows = adapter_modules(path)
    total = sum(r["params"] for r in rows)
    lines = [f"adapter {path}",
             f"  r={cfg.r} lora_alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} use_rslora={cfg.use_rslora} "
             f"use_dora={cfg.use_dora} bias={cfg.bias} modules_to_save={cfg.modules_to_save}",
             f"  {len(rows)} adapted modules and parameters, {total:,} adapter parameters "
             f"({total * 4 / 2**20:.2f} MiB as float32)", "",
             f"  {'module (most moved first)':<52} {'r':>4} {'alpha':>6} {'scale':>7} {'out x in':>12} "
             f"{'||s·B·A||_F':>11}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"  {r['name']:<52} {r['r']:>4} {r['alpha']:>6g} {r['scaling']:>7.3g} {shape:>12} "
                     f"{r['delta_norm']:>11.4g}")
    return "\n".join(lines)
