"""Memory and speed of one training step on SmolLM2-135M by base precision: fp32, bf16, NF4 and int8 (lorafit.quantize,
bf16 compute) against PEFT on the same bases and PEFT + bitsandbytes 4-bit (QLoRA), side by side in one run.

    python benchmarks/memory.py                 # all rows, 5 timed rounds
    python benchmarks/memory.py --rounds 3 --rows lorafit-bf16 lorafit-nf4

All-linear r=16 alpha=32, dropout 0.05, batch 4 x 128, AdamW, 2 threads. Each row is its own process
(``benchmarks/step.py``'s children: the same model, batch and step), and the rows take turns step by step. Columns:

* step s, x floor: the median step, and its median ratio to the frozen bf16 base's step in the same round;
* peak MB: the process's peak RSS; tensor MB: the peak of live tensor memory over one profiled step (parameters,
  optimizer state, activations, temporaries: exact, allocator-independent);
* quant MB / bf16 MB: what the quantized linears' weights hold, and what the same weights take in bf16;
* saved-in-step: how much of the bytes the quantization saves on the weights the step's tensor peak actually
  saves against the same library's bf16 row (100%: no dequantized copies kept);
* plan MB: ``lorafit plan``'s estimate of the peak RSS for the row (lorafit rows), and its ratio to the measured.

The dequantization cost is measured apart: each quantized weight is dequantized alone, timed, and multiplied by the
number of times a training step dequantizes it (forward, and backward for the input gradient).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step as bench  # noqa: E402

MODEL = "smollm2-135m"
# row -> (step.py config, base dtype, quantization)
ROWS = {
    "floor-bf16": ("floor", "bfloat16", None),
    "lorafit-fp32": ("lorafit-lora", "float32", None),
    "lorafit-bf16": ("lorafit-lora", "bfloat16", None),
    "lorafit-nf4": ("lorafit-lora", "bfloat16", "nf4"),
    "lorafit-int8": ("lorafit-lora", "bfloat16", "int8"),
    "peft-fp32": ("peft-lora", "float32", None),
    "peft-bf16": ("peft-lora", "bfloat16", None),
    "lorafit-bnb-nf4": ("lorafit-lora", "bfloat16", "bnb-nf4"),
    "peft-bnb-nf4": ("peft-lora", "bfloat16", "bnb-nf4"),
}


def dequant_ms(fmt: str, repeats: int = 5) -> tuple[float, int]:
    """(ms to dequantize every quantized linear of SmolLM2 once, number of weights), bf16 NF4/int8."""
    import torch

    import lorafit
    from lorafit.tensors import dense, is_quantized

    torch.set_num_threads(bench.THREADS)
    os.environ["LORAFIT_BENCH_DTYPE"] = "bfloat16"
    model = bench.build_model(MODEL)
    lorafit.quantize(model, fmt)
    weights = [m.weight for m in model.modules() if is_quantized(getattr(m, "weight", torch.empty(0)))]
    for w in weights:
        dense(w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            dense(w)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, len(weights)


def plan_mb(dtype: str, quantize: str | None) -> float:
    """``lorafit plan``'s peak-RSS estimate for the row (the same call as ``lorafit plan --quantize``)."""
    import lorafit
    from lorafit.advise.plan import plan
    from lorafit.hf import meta_model

    model = meta_model(bench.smollm2_path(), dtype)
    cfg = lorafit.LoraConfig(r=bench.R, lora_alpha=bench.ALPHA, lora_dropout=0.05, target_modules="all-linear")
    return plan(model, cfg, batch_size=4, max_length=128, quantize=quantize)["memory"].total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--retain-heap", action="store_true", help="as benchmarks/step.py --retain-heap")
    args = ap.parse_args()
    if bench.smollm2_path() is None:
        sys.exit("SmolLM2-135M is not cached: python -c 'import lorafit.demo.assets as a; a.smollm2()'")
    rows = ["floor-bf16"] + [r for r in args.rows if r != "floor-bf16"]
    import torch

    print(f"# {time.strftime('%Y-%m-%d')}: {MODEL}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds (+{args.warmup} warmup), medians; load average {os.getloadavg()[0]:.1f} at start",
          flush=True)
    children = {}
    for r in rows:
        config, dtype, quant = ROWS[r]
        env = {"LORAFIT_BENCH_DTYPE": dtype, "LORAFIT_BENCH_QUANT": quant or ""}
        children[r] = bench.Child(MODEL, config, 0.05, bench.THREADS, args.retain_heap, "fused", env=env)
        children[r].name = r
    try:
        for c in children.values():
            c.ask()
        times = {r: [] for r in rows}
        for rnd in range(args.warmup + args.rounds):
            order = rows[rnd % len(rows):] + rows[:rnd % len(rows)]
            for r in order:
                res = children[r].ask("step")
                if rnd >= args.warmup:
                    times[r].append(res["step_s"])
            if rnd >= args.warmup:
                print(f"  [round {rnd - args.warmup + 1}] " + ", ".join(f"{r} {times[r][-1]:.2f}s" for r in rows),
                      file=sys.stderr, flush=True)
        ops = {r: children[r].ask("profile")["ops"] for r in rows if r in ("lorafit-bf16", "lorafit-nf4",
                                                                           "lorafit-int8")}
        final = {r: c.ask("quit") for r, c in children.items()}
    finally:
        for c in children.values():
            c.proc.kill() if c.proc.poll() is None else None

    lines = [f"{'row':<14} {'step s':>7} {'x floor':>8} {'peak MB':>8} {'tensor MB':>9} {'quant MB':>9} "
             f"{'bf16 MB':>8} {'saved-in-step':>13} {'plan MB':>8} {'plan/peak':>9}"]
    for r in rows:
        f = final[r]
        x = statistics.median(a / b for a, b in zip(times[r], times["floor-bf16"]))
        q, qb = f.get("quant_mb", 0), f.get("quant_bf16_mb", 0)
        saved = "-"
        ref = final.get(r.split("-")[0] + "-bf16")  # the same library over the unquantized bf16 base
        if q and ref is not None and ROWS[r][1] == "bfloat16":
            saved = f"{(ref['tensor_mb'] - f['tensor_mb']) / (qb - q):.0%}"
        # plan models lorafit's own path over torchao weights, not a bitsandbytes model's forward (the reference
        # path, which keeps more): no estimate for that row
        est = plan_mb(ROWS[r][1], ROWS[r][2]) if r.startswith("lorafit") and ROWS[r][2] != "bnb-nf4" else None
        lines.append(f"{r:<14} {statistics.median(times[r]):>7.3f} {x:>8.3f} {f['peak_mb']:>8.0f} "
                     f"{f['tensor_mb']:>9.0f} {q:>9.1f} {qb:>8.1f} {saved:>13} "
                     + (f"{est:>8.0f} {est / f['peak_mb']:>9.2f}" if est else f"{'-':>8} {'-':>9}"))
    print("\n" + "\n".join(lines))
    for fmt in ("nf4", "int8"):
        if f"lorafit-{fmt}" in rows:
            ms, n = dequant_ms(fmt)
            step_ms = statistics.median(times[f"lorafit-{fmt}"]) * 1e3
            print(f"\n{fmt}: dequantizing all {n} quantized weights once takes {ms:.1f} ms; a LoRA step dequantizes "
                  f"each twice (forward, input gradient): ~{2 * ms:.0f} ms of the {step_ms:.0f} ms step "
                  f"({2 * ms / step_ms:.0%})")
    for r, top in ops.items():
        print(f"\n{r}: one profiled step's most expensive ops (self CPU ms, calls)")
        for name, ms, calls in top:
            print(f"  {name:<40} {ms:>9.1f} {calls:>6}")
    print(f"\n# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
