"""Where an adapter's training step spends its time beyond the frozen-model floor, per kind of op (torch.profiler).

    python benchmarks/breakdown.py                                   # SmolLM2 if cached, else the random Llama
    python benchmarks/breakdown.py --model llama-1024 --config peft-dora --dropout 0.05 --steps 5

Runs the floor and one configuration of ``step.py`` (same model, batch and AdamW) in two processes, profiles a few
steps of each after a warm-up, and sorts every op's self CPU time into buckets:

    base matmul      matrix products of the model's own weights (no dimension equal to the rank r)
    adapter matmul   matrix products with a rank-r dimension: the adapter's arithmetic, x·Aᵀ, h·Bᵀ and their
                     gradients
    attention        scaled_dot_product_attention kernels
    optimizer        everything inside ``Optimizer.step`` and ``Optimizer.zero_grad``
    autograd nodes   autograd's backward nodes (MmBackward0, ...) and the bodies of custom autograd functions
                     (lorafit's LoraLinearFunction: its Python, not the ops inside it)
    other ops        elementwise, reductions, copies, allocation, autograd bookkeeping
    outside ops      step wall time not inside any op (Python, dispatch; with the profiler's own overhead)

The "adapter matmul" row is the arithmetic any exact adapter must do at this machine's speed for such thin
products; the floor plus it is the lower bound for a step. Profiling inflates the small-op rows; the step.py table
is the measurement, this is the breakdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as S  # noqa: E402  (the sibling benchmark: models, configurations, the training step)

MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_matmul"}
BUCKETS = ("base matmul", "adapter matmul", "attention", "optimizer", "autograd nodes", "other ops", "outside ops")


def bucket(event, r: int) -> str:
    """The bucket of one profiler event (by its name, input shapes and enclosing events)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    name = event.name
    if name.startswith("Optimizer."):
        return "optimizer"
    if name in MATMULS:
        shapes = event.input_shapes or []
        return "adapter matmul" if any(r in s for s in shapes if isinstance(s, list)) else "base matmul"
    if "scaled_dot_product" in name:
        return "attention"
    if "::" not in name:  # a backward node (MmBackward0) or a custom Function's body (LoraLinearFunction)
        return "autograd nodes"
    return "other ops"


def child(model_name: str, config: str, dropout: float, steps: int, threads: int) -> None:
    """Profile ``steps`` steps of ``config`` after two warm-up steps; print per-step milliseconds per bucket."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    step = S.make_step(model_name, config, dropout)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    ms = dict.fromkeys(BUCKETS, 0.0)
    ops: dict[str, float] = {}  # "bucket: op name" -> ms per step
    for e in prof.events():
        b = bucket(e, S.R)
        ms[b] += e.self_cpu_time_total / 1e3 / steps
        key = f"{b}: {e.name}"
        ops[key] = ops.get(key, 0.0) + e.self_cpu_time_total / 1e3 / steps
    ms["outside ops"] = wall * 1e3 / steps - sum(ms.values())
    ms["step"] = wall * 1e3 / steps
    print(json.dumps({"buckets": ms, "ops": ops}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(S.MODELS), default=None,
                    help="default: smollm2-135m if cached, else llama-1024")
    ap.add_argument("--config", choices=[c for c in S.CONFIGS if c != "floor"], default="lorafit-lora")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per process")
    ap.add_argument("--threads", type=int, default=S.THREADS)
    ap.add_argument("--ops", type=int, default=15, help="also list this many ops with the largest extra time")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = args.model or ("smollm2-135m" if S.smollm2_path() is not None else "llama-1024")
    if args.child:
        child(model, args.child, args.dropout, args.steps, args.threads)
        return
    if model == "smollm2-135m" and S.smollm2_path() is None:
        sys.exit("SmolLM2-135M is not cached (python -c 'import lorafit.demo.assets as a; a.smollm2()'), "
                 "or pass --model llama-1024")
    env = S.child_env(args.threads)
    rows = {}
    for config in ("floor", args.config):  # one after the other: each process has the machine to itself
        cmd = [sys.executable, __file__, "--child", config, "--model", model, "--dropout", str(args.dropout),
               "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
        rows[config] = json.loads(out.strip().splitlines()[-1])
    floor, other = rows["floor"]["buckets"], rows[args.config]["buckets"]
    print(f"# {model}, {args.config}, dropout {args.dropout:g}, r={S.R}, {args.steps} profiled steps, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d')}; ms per step")
    print(f"{'bucket':<16} {'floor':>8} {args.config:>14} {'extra':>8} {'% of floor':>10}")
    for name in BUCKETS + ("step",):
        extra = other[name] - floor[name]
        print(f"{name:<16} {floor[name]:>8.1f} {other[name]:>14.1f} {extra:>+8.1f} {extra / floor['step']:>+10.1%}")
    if args.ops:
        f_ops, o_ops = rows["floor"]["ops"], rows[args.config]["ops"]
        diff = {k: o_ops.get(k, 0.0) - f_ops.get(k, 0.0) for k in set(f_ops) | set(o_ops)}
        print(f"\n# the {args.ops} ops with the largest extra time (bucket: op), ms per step")
        for k in sorted(diff, key=lambda k: -abs(diff[k]))[:args.ops]:
            print(f"{k:<50} {f_ops.get(k, 0.0):>8.1f} {o_ops.get(k, 0.0):>14.1f} {diff[k]:>+8.1f}")


if __name__ == "__main__":
    main()
