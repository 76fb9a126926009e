"""What mixed-adapter batches buy a server: 16 concurrent requests over 4 adapters on SmolLM2-135M-Instruct, 64 new
tokens each (greedy, stop tokens ignored so every answer has 64), three ways in one process:

- **mixed**: lorafit serve's engine, all 16 rows in one decoding batch (``lorafit.per_row``);
- **one adapter at a time**: what a server without mixed batches does: for each adapter, make it the active one and
  run its 4 requests as one batch through transformers' ``generate`` (left-padded), then the next adapter;
- **one adapter at a time, lorafit's engine**: the same, through lorafit serve's engine (so the difference to
  "mixed" is the mixing alone);
- **sequential**: one request after another, each alone (``lorafit generate``).

Prints throughput (new tokens per second over the whole run) and per-request latency (p50, p95: from the moment all
16 arrive to the request's last token), and the ratios, and how many answers equal the sequential ones up to the
model's first stop token (after it, the random adapters' distributions are flat enough for float rounding to flip
a greedy pick in any batched run, transformers' own included).

    python benchmarks/serve.py [--requests 16 --adapters 4 --tokens 64 --rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import lorafit
    from lorafit.demo import assets
    from lorafit.generate import load_for_inference, render, stop_token_ids
    from lorafit.serve.engine import Engine, Row

    model_dir = assets.smollm2(progress=False)
    model, tok = load_for_inference(model_dir)
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):  # random non-zero adapters: each answers differently
        lorafit.attach(model, lorafit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), name=name)
        torch.manual_seed(100 + i)
        for key, param in model.named_parameters():
            if f".{name}." in key or key.endswith(f".{name}"):
                param.data.normal_(0, 0.02)
    model.eval()
    prompts = [f"Write a short note about topic {i}: the weather, a book, or a trip." for i in range(args.requests)]
    ids = [render(tok, prompt=text) for text in prompts]
    adapter_of = [names[i % len(names)] for i in range(args.requests)]
    engine = Engine(model, tok, max_batch=args.requests).start()

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def fixed_length(pad_id: int):
        """Greedy, no stop token (as the engine's rows here): every answer has exactly --tokens tokens."""
        from transformers import GenerationConfig

        return GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_id)

    def through_engine(which: list[int], t0: float, latency: list[float], out: dict) -> None:
        """Submit requests ``which`` to the engine together and wait for all of them."""
        left, done, rows = [len(which)], threading.Event(), {}
        for i in which:
            def emit(text, finish, i=i):  # called on the engine's thread
                if finish is not None:
                    latency[i] = time.perf_counter() - t0
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            rows[i] = Row(prompt=ids[i], adapter=adapter_of[i], max_tokens=args.tokens, emit=emit)
        for row in rows.values():
            engine.submit(row)
        done.wait()
        out.update({i: row.tokens for i, row in rows.items()})

    def mixed() -> tuple[dict, list[float]]:
        out, latency = {}, [0.0] * args.requests
        through_engine(list(range(args.requests)), time.perf_counter(), latency, out)
        return out, latency

    def engine_one_adapter_at_a_time() -> tuple[dict, list[float]]:
        """The same engine, fed one adapter's requests at a time (a batch never mixes adapters)."""
        out, latency = {}, [0.0] * args.requests
        t0 = time.perf_counter()
        for name in names:
            through_engine([i for i in range(args.requests) if adapter_of[i] == name], t0, latency, out)
        return out, latency

    def one_adapter_at_a_time() -> tuple[dict, list[float]]:
        out, latency = {}, [0.0] * args.requests
        t0 = time.perf_counter()
        for name in names:
            which = [i for i in range(args.requests) if adapter_of[i] == name]
            width = max(len(ids[i]) for i in which)
            batch = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in which])
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in which])
            lorafit.set_active(model, name)
            with torch.inference_mode():
                got = model.generate(batch, attention_mask=mask, generation_config=fixed_length(pad))
            for j, i in enumerate(which):
                out[i] = got[j, width:].tolist()
                latency[i] = time.perf_counter() - t0
        return out, latency

    def sequential() -> tuple[dict, list[float]]:
        out, latency = {}, [0.0] * args.requests
        t0 = time.perf_counter()
        for i in range(args.requests):
            lorafit.set_active(model, adapter_of[i])
            x = torch.tensor([ids[i]])
            with torch.inference_mode():
                got = model.generate(x, attention_mask=torch.ones_like(x), generation_config=fixed_length(pad))
            out[i] = got[0, x.shape[1]:].tolist()
            latency[i] = time.perf_counter() - t0
        return out, latency

    ways = {"mixed (lorafit serve)": mixed, "one adapter at a time": one_adapter_at_a_time,
            "one adapter at a time, lorafit's engine": engine_one_adapter_at_a_time, "sequential": sequential}
    results = {name: [] for name in ways}
    answers = {}
    mixed()  # warm-up
    for _ in range(args.rounds):
        for name, fn in ways.items():
            t = time.perf_counter()
            out, latency = fn()
            wall = time.perf_counter() - t
            results[name].append((wall, latency))
            answers[name] = out
    engine.stop()
    stops = set(stop_token_ids(model, tok))

    def answer(tokens: list[int]) -> list[int]:  # up to the model's first stop token: what a client would get
        return tokens[:next((k + 1 for k, t in enumerate(tokens) if t in stops), len(tokens))]
    same = {name: sum(answer(answers[name][i]) == answer(answers["sequential"][i]) for i in range(args.requests))
            for name in ways}
    print(f"{args.requests} requests over {args.adapters} adapters, {args.tokens} new tokens each, SmolLM2-135M, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} rounds")
    print("| way | tokens/s | p50 latency | p95 latency | throughput vs one adapter at a time | answers equal to "
          "sequential (to the first stop token) |")
    print("|---|---:|---:|---:|---:|---:|")
    best = {name: min(runs, key=lambda r: r[0]) for name, runs in results.items()}
    total = args.requests * args.tokens
    ref = total / best["one adapter at a time"][0]
    for name, (wall, latency) in best.items():
        print(f"| {name} | {total / wall:.0f} | {statistics.median(latency):.2f} s | {percentile(latency, 0.95):.2f} s "
              f"| {total / wall / ref:.2f}x | {same[name]}/{args.requests} |")


if __name__ == "__main__":
    main()
