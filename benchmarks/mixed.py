"""Mixed-adapter batches: lorafit.per_row against PEFT's adapter_names=, side by side in one process.

    python benchmarks/mixed.py                       # SmolLM2-135M if cached (else its shape, random), 3 rounds
    python benchmarks/mixed.py --rounds 5 --batch 32 --seq 128 --adapters 8 --rank 16

Setup (issue 14): 8 adapters, all-linear, r=16, random factors; batch 32 x 128 tokens, rows assigned to random
adapters and 1/8 of them to the base. Forward latency (a prefill: every layer on all tokens, the logits of the last
position only, ``logits_to_keep=1``), under torch.inference_mode, of
  (a) the base model alone, (b) one adapter unmerged, (c) one adapter merged, (d) lorafit per_row,
  (e) PEFT adapter_names= (and PEFT's one adapter unmerged, for reference);
and (f) decode: per-token latency of greedy generation, 32 new tokens for a batch of 16 mixed rows, lorafit vs PEFT
(time of 33 generated tokens minus time of 1, over 32). Each round runs every configuration once, in rotating order;
the table gives medians over rounds, and the overheads over (a) of the same round.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch

THREADS = 2
# glibc keeps freed memory instead of returning it to the OS, so large temporaries do not page-fault every call (as
# benchmarks/step.py --retain-heap); the process re-executes itself once with this set
RETAIN_HEAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def build_base(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
    from step import smollm2_path

    path = smollm2_path()
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), "SmolLM2-135M-Instruct"
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), "random Llama shaped like SmolLM2-135M"


def build_models(n: int, r: int, seed: int = 0):
    """(base, lorafit model with n adapters, PEFT model with the same n adapters, names)."""
    import peft

    import lorafit
    from lorafit.peft_format import adapter_state_dict

    base, label = build_base(seed)
    names = [f"ad{i}" for i in range(n)]
    ours = copy.deepcopy(base)
    for name in names:
        lorafit.attach(ours, lorafit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                init_lora_weights=False), name=name)
    with torch.no_grad():  # random B too: every adapter changes the output
        g = torch.Generator().manual_seed(seed)
        for pname, p in ours.named_parameters():
            if ".adapters." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ours.eval()
    ref = None
    for name in names:
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
        if ref is None:
            ref = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            ref.add_adapter(name, cfg)
        peft.set_peft_model_state_dict(ref, adapter_state_dict(ours, name), adapter_name=name)
    return base, ours, ref.eval(), names, label


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length of the decode rows")
    ap.add_argument("--profile", action="store_true", help="per-op breakdown of decoding (printed anyway when a "
                    "target is missed)")
    args = ap.parse_args(argv)
    if os.environ.get("GLIBC_TUNABLES") != RETAIN_HEAP:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": RETAIN_HEAP})
    torch.set_num_threads(THREADS)
    import peft  # noqa: F401

    import lorafit

    base, ours, ref, names, label = build_models(args.adapters, args.rank)
    merged = lorafit.merge(copy.deepcopy(ours).eval(), names=[names[0]])
    lorafit.set_active(merged, None)
    rng = random.Random(0)
    rows = [None if rng.random() < 1 / 8 else rng.choice(names) for _ in range(args.batch)]
    peft_rows = ["__base__" if n is None else n for n in rows]
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    lorafit.set_active(ours, names[0])
    ref.set_adapter(names[0])

    def fwd(model, **kw):  # logits of the last position only: the 32x128x49152 logits would dominate
        return lambda: model(input_ids=ids, logits_to_keep=1, **kw)

    def per_row():
        with lorafit.per_row(ours, rows):
            ours(input_ids=ids, logits_to_keep=1)

    configs = {
        "a base": fwd(base),
        "b one adapter, unmerged (lorafit)": fwd(ours),
        "c one adapter, merged": fwd(merged),
        "d lorafit per_row": per_row,
        "e PEFT adapter_names=": fwd(ref, adapter_names=peft_rows),
        "  PEFT one adapter, unmerged": fwd(ref),
    }
    drows = [None if rng.random() < 1 / 8 else rng.choice(names) for _ in range(args.decode_batch)]
    prompt = torch.randint(0, base.config.vocab_size, (args.decode_batch, args.prompt),
                           generator=torch.Generator().manual_seed(2))
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def decode_ours(k):
        def run():
            with lorafit.per_row(ours, drows):
                return ours.generate(input_ids=prompt, max_new_tokens=k, min_new_tokens=k, **gen)
        return run
    decode_ours.prompt = prompt

    def decode_base(k):
        return lambda: base.generate(input_ids=prompt, max_new_tokens=k, min_new_tokens=k, **gen)

    def decode_peft(k):
        return lambda: ref.generate(input_ids=prompt, max_new_tokens=k, min_new_tokens=k,
                                    adapter_names=["__base__" if n is None else n for n in drows], **gen)

    with torch.inference_mode():  # warm up, and check that both give the same numbers
        with lorafit.per_row(ours, rows):
            got = ours(input_ids=ids[:, :16]).logits
        want = ref(input_ids=ids[:, :16], adapter_names=peft_rows).logits
        diff = (got - want).abs().max().item() / want.abs().max().item()
        t_ours, t_peft = decode_ours(4)(), decode_peft(4)()
        same_tokens = torch.equal(t_ours, t_peft)
        times = {k: [] for k in configs}
        decode = {"base": [], "lorafit": [], "PEFT": []}
        order = list(configs)
        for rnd in range(args.rounds):
            for k in order[rnd % len(order):] + order[:rnd % len(order)]:
                times[k].append(timed(configs[k]))
            for who, make in (("base", decode_base), ("lorafit", decode_ours),
                              ("PEFT", decode_peft))[::(1 if rnd % 2 else -1)]:
                long, short = timed(make(args.decode_tokens + 1)), timed(make(1))
                decode[who].append((long - short) / args.decode_tokens)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    a = times["a base"]
    over = {k: statistics.median([t - t0 for t, t0 in zip(v, a)]) for k, v in times.items()}
    print(f"\n{label}: {args.adapters} adapters all-linear r={args.rank}, batch {args.batch} x {args.seq} tokens, "
          f"{sum(n is None for n in rows)} base rows; {args.rounds} rounds, {THREADS} threads, float32, "
          f"torch {torch.__version__}, peft {peft.__version__}")
    print(f"per_row vs PEFT logits: max diff {diff:.2e} of the largest |logit|; decode tokens equal: {same_tokens}\n")
    print("| configuration | forward (s) | overhead over (a) (s) | overhead / b's |")
    print("|---|---:|---:|---:|")
    for k in configs:
        ratio = over[k] / over["b one adapter, unmerged (lorafit)"] if k != "a base" else float("nan")
        print(f"| {k.strip()} | {med[k]:.3f} | {over[k]:+.3f} | {ratio:.2f} |")
    d, e = over["d lorafit per_row"], over["e PEFT adapter_names="]
    dec = {k: statistics.median(v) * 1e3 for k, v in decode.items()}
    print(f"\n(f) decode, {args.decode_batch} mixed rows, {args.decode_tokens} new tokens after a {args.prompt}-token "
          f"prompt: base model {dec['base']:.1f} ms/token, lorafit per_row {dec['lorafit']:.1f} ms/token, PEFT "
          f"{dec['PEFT']:.1f} ms/token (overheads {dec['lorafit'] - dec['base']:+.1f} vs "
          f"{dec['PEFT'] - dec['base']:+.1f}), "
          f"PEFT / lorafit = {dec['PEFT'] / dec['lorafit']:.2f}x")
    b = over["b one adapter, unmerged (lorafit)"]
    print(f"\ntargets: d's overhead / b's = {d / b:.2f} (<= 1.5); d's overhead / e's = {d / e:.2f} (<= 0.5); "
          f"decode speed-up {dec['PEFT'] / dec['lorafit']:.2f}x (>= 1.5)")
    if args.profile or d > 1.5 * b or d > 0.5 * e or dec["PEFT"] < 1.5 * dec["lorafit"]:
        breakdown(base, decode_ours, decode_peft)


def breakdown(base, decode_ours, decode_peft, tokens: int = 8) -> None:
    """Self CPU time per op of ``tokens`` greedy decode steps (after the same prompt), base vs lorafit vs PEFT."""
    from torch.profiler import ProfilerActivity, profile

    def ops(run) -> dict:
        with torch.inference_mode():
            run(1)()  # warm
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(tokens + 1)()
            with profile(activities=[ProfilerActivity.CPU]) as first:
                run(1)()
        long = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
        short = {e.key: (e.self_cpu_time_total, e.count) for e in first.key_averages()}
        return {k: ((t - short.get(k, (0, 0))[0]) / tokens / 1e3, (c - short.get(k, (0, 0))[1]) / tokens)
                for k, (t, c) in long.items()}

    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def decode_base(k):
        return lambda: base.generate(input_ids=decode_ours.prompt, max_new_tokens=k, min_new_tokens=k, **gen)

    runs = {"base": ops(decode_base), "lorafit": ops(decode_ours), "PEFT": ops(decode_peft)}
    keys = sorted(set().union(*runs.values()), key=lambda k: -max(r.get(k, (0, 0))[0] for r in runs.values()))[:14]
    print(f"\nper-op breakdown of one decode step (self CPU ms per token, calls per token; {tokens} tokens):")
    print("| op | " + " | ".join(runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r.get(k, (0, 0))[0]:.1f} ({r.get(k, (0, 0))[1]:.0f})"
                                       for r in runs.values()) + " |")
    print("| total | " + " | ".join(f"{sum(t for t, _ in r.values()):.1f}" for r in runs.values()) + " |")


if __name__ == "__main__":
    main()
