"""`lorafit inspect`: what an adapter folder holds, and which layers it moved most."""

from __future__ import annotations

from pathlib import Path

import torch

from ..ops import lora_product, scaling
from ..peft_format import read_factors
from ..targets import pattern_key


def adapter_modules(path: str | Path) -> tuple[object, list[dict]]:
    """(config, one row per adapted module: name, kind, r, alpha, scaling, shape, params, ||s·B·A||_F), most
    moved first."""
    cfg, modules = read_factors(path)
    rows = []
    for name, f in modules.items():
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
             f"  {len(rows)} adapted modules, {total:,} adapter parameters "
             f"({total * 4 / 2**20:.2f} MiB as float32)", "",
             f"  {'module (most moved first)':<52} {'r':>4} {'alpha':>6} {'scale':>7} {'out x in':>12} "
             f"{'||s·B·A||_F':>11}"]
    for r in rows:
        lines.append(f"  {r['name']:<52} {r['r']:>4} {r['alpha']:>6g} {r['scaling']:>7.3g} "
                     f"{r['shape'][0]:>5}x{r['shape'][1]:<6} {r['delta_norm']:>11.4g}")
    return "\n".join(lines)
