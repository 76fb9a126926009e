"""One training step (forward, backward, AdamW) of PEFT and lorafit side by side, against the frozen-model floor.

    python benchmarks/step.py                        # random Llama + SmolLM2-135M if cached, dropout 0.05 and 0
    python benchmarks/step.py --models llama-1024 --dropouts 0.05 --rounds 5
    python benchmarks/step.py --retain-heap          # glibc keeps its heap: no per-step page faults (see --help)

The floor is what any adapter must pay at least: the same frozen model (nothing requires grad) run forward and
backward to its input embeddings on the same batch, without an optimizer.

Each configuration lives in its own process (so its peak RSS, ru_maxrss, is its own), and the processes take turns:
one round runs one step in each, in rotating order, so a slow spell of the machine hits every configuration alike.
The table gives each configuration's median step time, the median over rounds of its ratio to the floor step of the
same round, and, for lorafit, of its ratio to PEFT's step ("cpu x floor": the same ratio in process CPU time, less
sensitive to other processes on the machine; "min x floor": the fastest step over the fastest floor step, since
noise on a shared machine only adds time); "extra" is peak RSS minus the floor's peak RSS: what the adapter's
training costs on top of running the model. RSS also holds what the allocator keeps, so "tensor extra" gives the
same difference for the peak of live tensor memory (parameters, optimizer state, saved activations, temporaries),
from one more step per process profiled with torch.profiler's memory events: exact, and the same in every run.
Configurations of one dropout value run together, and the floor runs with each group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

THREADS = 2
R, ALPHA = 16, 32
# glibc keeps freed memory in the heap instead of returning it to the OS (no mmap'd chunks, no trimming), so a step's
# large temporaries stop costing a page fault per 4 KB every step: the same environment for every configuration
RETAIN_HEAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"

# name -> (description, batch, seq)
MODELS = {
    "llama-1024": ("random Llama (LlamaConfig defaults, vocab 32000): hidden 1024, 2 layers, 16 heads, "
                   "intermediate 2816", 4, 256),
    "smollm2-135m": ("SmolLM2-135M-Instruct, real weights, float32", 4, 128),
}
CONFIGS = ("floor", "peft-lora", "lorafit-lora", "peft-dora", "lorafit-dora")


def smollm2_path():
    """The cached SmolLM2 folder, or None (the benchmark never downloads)."""
    try:
        from lorafit.demo import assets
    except ImportError:
        return None
    path = assets.cache_dir() / "models" / assets.SMOLLM2_NAME
    return path if (path / "model.safetensors").is_file() else None


def BASE_DTYPE():  # noqa: N802 - the base weights' dtype (--dtype; children read it from the environment)
    import torch

    return getattr(torch, os.environ.get("LORAFIT_BENCH_DTYPE", "float32"))


def QUANTIZE():  # noqa: N802 - the base quantization (--quantize; children read it from the environment)
    return os.environ.get("LORAFIT_BENCH_QUANT") or None


def bnb_4bit(model):
    """PEFT's QLoRA base: every linear but the head as a bitsandbytes NF4 Linear4bit (double-quantized scales, blocks
    of 64, bfloat16 compute), as transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True) builds it."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    head = model.get_output_embeddings()
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and m is not head:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(m.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            if m.bias is not None:
                q.bias = m.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q.to("cpu"))
    return model


def quantize_base(model, kind: str, fmt: str):
    """The base of a ``--quantize`` run: lorafit.quantize for lorafit; for PEFT, bitsandbytes NF4 (QLoRA) or torchao
    int8 weight-only (PEFT's torchao support); "bnb-nf4": bitsandbytes NF4 for both."""
    if fmt == "bnb-nf4" or (kind == "peft" and fmt == "nf4"):
        bnb_4bit(model)
    elif kind == "lorafit":
        import lorafit

        lorafit.quantize(model, fmt)
    else:
        from torch import nn
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        head = model.get_output_embeddings()
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m is not head)
    return model


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes held by the quantized linears' weights, bytes the same weights take in bfloat16)."""
    from lorafit import quant
    from lorafit.tensors import is_quantized

    held = bf16 = 0
    seen = set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None or id(w) in seen:  # PEFT's wrappers show their base layer's weight too
            continue
        seen.add(id(w))
        state = getattr(w, "quant_state", None)
        if state is not None:  # bitsandbytes: packed 4-bit data + the (nested) scales
            held += w.data.nbytes + sum(t.nbytes for t in _state_tensors(state))
            bf16 += 2 * math.prod(state.shape)  # the unpacked (out, in)
        elif is_quantized(w):
            held += quant.weight_bytes(w)
            bf16 += 2 * w.numel()
    return held, bf16


def _state_tensors(state):
    import torch

    for v in vars(state).values():
        if isinstance(v, torch.Tensor):
            yield v
        elif hasattr(v, "absmax"):  # the nested state of double quantization
            yield from _state_tensors(v)


def build_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "llama-1024":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
        return LlamaForCausalLM(cfg).to(BASE_DTYPE())
    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=BASE_DTYPE())


def make_step(model_name: str, config: str, dropout: float, adamw: str = "fused"):
    """The model with the adapter of ``config`` attached, and a function running one training step."""
    import torch

    model = build_model(model_name).train()
    _, batch, seq = MODELS[model_name]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    kind = config.partition("-")[0]
    if QUANTIZE() and kind in ("lorafit", "peft"):  # the floor stays the unquantized base
        quantize_base(model, kind, QUANTIZE())
    return training_step(adapted(model, config, dropout), ids, adamw)


def adapted(model, config: str, dropout: float):
    """``model`` as configuration ``config`` trains it: "floor" (frozen), "peft-lora|dora", "lorafit-lora|dora"
    (the fused path) or "lorafitref-lora|dora" (the reference path); r=R, alpha=ALPHA on all linear layers."""
    kind, _, method = config.partition("-")
    if kind == "floor":
        return model.requires_grad_(False)
    if kind == "peft":
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules="all-linear",
                              use_dora=method == "dora")
        return peft.get_peft_model(model, cfg).train()
    import lorafit
    import lorafit.layers

    lorafit.layers.FUSED = kind == "lorafit"  # "lorafitref-..." runs the reference path
    cfg = lorafit.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules="all-linear",
                             use_dora=method == "dora")
    return lorafit.attach(model, cfg).train()


def training_step(model, ids, adamw: str = "fused"):
    """One training step of ``model`` on ``ids`` as a function (``step.live_tensors``: what it keeps between steps;
    ``step.model``). A frozen model (the floor) runs backward to its input embeddings, without an optimizer."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    kind_kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[adamw]
    opt = torch.optim.AdamW(params, lr=1e-4, **kind_kw) if params else None
    embed = model.get_input_embeddings()

    def step() -> None:
        if opt is None:  # floor: backward reaches the (grad-requiring) input embeddings
            x = embed(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=x, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def live_tensors() -> list:
        """What lives between steps: the model's parameters and buffers, the optimizer state, the batch."""
        state = [t for s in (opt.state.values() if opt else ()) for t in s.values() if torch.is_tensor(t)]
        return [*model.parameters(), *model.buffers(), *state, ids]

    step.live_tensors = live_tensors
    step.model = model
    return step


def _plain_tensors(tensors):
    """The tensors holding storage: a quantized tensor subclass (torchao) is the tensors it flattens to."""
    for t in tensors:
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is None:
            yield t
        else:
            yield from _plain_tensors(getattr(t, n) for n in flatten()[0] if getattr(t, n) is not None)


def tensor_peak_mb(step) -> float:
    """Peak memory of live tensors over one step, independent of the allocator: the storages alive between steps
    plus the highest running total of the step's allocations (torch.profiler's memory events)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in _plain_tensors(step.live_tensors())}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]  # CPU
    return (sum(storages.values()) + max(totals, default=0)) / 2**20


def top_ops(step, n: int = 12) -> list[tuple[str, float, int]]:
    """(op, self CPU ms, calls) of one profiled step's most expensive operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events[:n]]


def serve(model_name: str, config: str, dropout: float, threads: int, adamw: str) -> None:
    """Child process: build, then run one step per "step" line on stdin; "quit" reports the peak RSS and, from one
    more (profiled) step, the peak tensor memory."""
    import torch

    torch.set_num_threads(threads)
    step = make_step(model_name, config, dropout, adamw)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "profile":
            print(json.dumps({"ops": top_ops(step)}), flush=True)
        elif line.strip() == "step":
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            print(json.dumps({"step_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}), flush=True)
        else:
            break
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the profiled step adds its own
    held, bf16 = quantized_bytes(step.model) if QUANTIZE() else (0, 0)
    print(json.dumps({"peak_mb": peak_rss, "tensor_mb": tensor_peak_mb(step), "quant_mb": held / 2**20,
                      "quant_bf16_mb": bf16 / 2**20}), flush=True)


def child_env(threads: int) -> dict[str, str]:
    """The environment of a measured process: ``threads`` intra-op threads for every BLAS/OpenMP library."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


class Child:
    def __init__(self, model_name: str, config: str, dropout: float, threads: int, retain_heap: bool,
                 adamw: str, env: dict | None = None) -> None:
        cmd = [sys.executable, __file__, "--serve", config, "--models", model_name, "--dropouts", str(dropout),
               "--threads", str(threads), "--adamw", adamw]
        env = dict(child_env(threads), **(env or {}))
        if retain_heap:
            env["GLIBC_TUNABLES"] = RETAIN_HEAP
        self.name = config
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} process died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)


def run_group(model_name: str, dropout: float, configs: list[str], rounds: int, warmup: int,
              threads: int, retain_heap: bool = False, adamw: str = "fused") -> dict[str, dict]:
    """Run ``configs`` (with the floor) in lock step; per config: step times, ratios to floor and PEFT, peak RSS."""
    names = ["floor"] + [c for c in configs if c != "floor"]
    children = [Child(model_name, c, dropout, threads, retain_heap, adamw) for c in names]
    try:
        for child in children:
            child.ask()  # ready
        times: dict[str, list[float]] = {c: [] for c in names}
        cpu: dict[str, list[float]] = {c: [] for c in names}
        for rnd in range(warmup + rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for child in sorted(children, key=lambda ch: order.index(ch.name)):
                res = child.ask("step")
                if rnd >= warmup:
                    times[child.name].append(res["step_s"])
                    cpu[child.name].append(res["cpu_s"])
            if rnd >= warmup:
                print(f"  [{model_name} p={dropout:g} round {rnd - warmup + 1}] "
                      + ", ".join(f"{c} {times[c][-1]:.2f}s" for c in names), file=sys.stderr, flush=True)
        final = {child.name: child.ask("quit") for child in children}
        peaks = {c: f["peak_mb"] for c, f in final.items()}
        tensors = {c: f["tensor_mb"] for c, f in final.items()}
    finally:
        for child in children:
            child.proc.kill() if child.proc.poll() is None else None
    result = {}
    for c in names:
        peer = "peft-" + c.partition("-")[2] if c.startswith("lorafit") else None
        result[c] = {
            "step_s": statistics.median(times[c]),
            "x_floor": statistics.median(a / f for a, f in zip(times[c], times["floor"])),
            "min_x_floor": min(times[c]) / min(times["floor"]),  # best step against best step: noise only adds
            "cpu_x_floor": statistics.median(a / f for a, f in zip(cpu[c], cpu["floor"])),
            "x_peft": statistics.median(a / b for a, b in zip(times[c], times[peer])) if peer in times else None,
            "peak_mb": peaks[c],
            "extra_mb": peaks[c] - peaks["floor"],
            "extra_vs_peft": _share_of_peer(peaks, c, peer),
            "tensor_extra_mb": tensors[c] - tensors["floor"],
            "tensor_extra_vs_peft": _share_of_peer(tensors, c, peer),
        }
    return result


def _share_of_peer(mb: dict[str, float], config: str, peer: str | None) -> float | None:
    """config's memory above the floor as a share of its PEFT peer's (None without a peer above the floor)."""
    if peer not in mb or mb[peer] <= mb["floor"]:
        return None
    return (mb[config] - mb["floor"]) / (mb[peer] - mb["floor"])


def table(model_name: str, results: dict[float, dict[str, dict]], threads: int, adamw: str) -> str:
    desc, batch, seq = MODELS[model_name]
    lines = [f"## {model_name}: {desc}; batch {batch} x {seq}, r={R}, alpha={ALPHA}, all-linear, AdamW ({adamw}), "
             f"{threads} threads",
             f"{'config':<14} {'dropout':>7} {'step s':>7} {'x floor':>8} {'x PEFT':>7} {'cpu x floor':>11} "
             f"{'min x floor':>11} {'peak MB':>8} {'extra MB':>9} {'extra/PEFT':>10} {'tensor extra':>12} "
             f"{'/PEFT':>6}"]

    def share(x):
        return f"{x:.1%}" if x is not None else "-"

    for p, group in results.items():
        for c, r in group.items():
            x_peft = f"{r['x_peft']:.3f}" if r["x_peft"] else "-"
            lines.append(f"{c:<14} {p:>7g} {r['step_s']:>7.3f} {r['x_floor']:>8.3f} {x_peft:>7} "
                         f"{r['cpu_x_floor']:>11.3f} {r['min_x_floor']:>11.3f} {r['peak_mb']:>8.0f} "
                         f"{r['extra_mb']:>9.0f} {share(r['extra_vs_peft']):>10} {r['tensor_extra_mb']:>12.0f} "
                         f"{share(r['tensor_extra_vs_peft']):>6}")
    return "\n".join(lines)


def head_matmul(dtype, threads: int) -> tuple[float, float]:
    """(ms, GFLOP/s) of the random Llama's output-layer product, the best of 4 calls. Forward and input gradient of
    that one layer are ~48% of the bf16 floor step on an EPYC (2026-12-07: 190 + 174 ms of 0.76 s), so machines whose
    small matmuls time alike (``bf16_speed``) can still differ 2x in the floor, and in every ratio to it."""
    import torch

    torch.set_num_threads(threads)
    x, w = torch.randn(1024, 1024, dtype=dtype), torch.randn(32000, 1024, dtype=dtype)
    best = math.inf
    for _ in range(4):  # the first call also pays for oneDNN's kernel choice (min drops it)
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best, 2 * 1024 * 1024 * 32000 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS),
                    help=f"any of {', '.join(CONFIGS)}, lorafitref-lora, lorafitref-dora (lorafit's reference path)")
    ap.add_argument("--dropouts", nargs="+", type=float, default=[0.05, 0.0])
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (one step per configuration each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="base weights' dtype; adapters stay float32 (lorafit computes their products in bfloat16 "
                         "over a bfloat16 base, LORAFIT_BF16_COMPUTE=0 turns that off; PEFT computes them in float32)")
    ap.add_argument("--quantize", choices=("nf4", "int8"), help="quantize the adapted runs' base: lorafit.quantize "
                    "for lorafit; bitsandbytes NF4 (nf4) or torchao int8 weight-only (int8) for PEFT; the floor "
                    "stays unquantized (use with --dtype bfloat16 for QLoRA's recipe)")
    ap.add_argument("--retain-heap", action="store_true", help="run every configuration with glibc's heap kept "
                    f"(GLIBC_TUNABLES={RETAIN_HEAP}): large temporaries stop page-faulting every step")
    ap.add_argument("--adamw", choices=("fused", "foreach", "for-loop"), default="fused",
                    help="torch's AdamW implementation, the same for PEFT and lorafit (default: fused, one kernel "
                    "for all tensors; for-loop is torch's CPU default)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:  # a child: the dtype comes from the parent's environment
        serve(args.models[0], args.serve, args.dropouts[0], args.threads, args.adamw)
        return

    os.environ["LORAFIT_BENCH_DTYPE"] = args.dtype  # the children inherit it
    if args.quantize:
        os.environ["LORAFIT_BENCH_QUANT"] = args.quantize
    import torch
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    print(f"# {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft_version}, {os.cpu_count()} CPUs, base {args.dtype}"
          + (f" quantized {args.quantize} (floor unquantized)" if args.quantize else "") + f"; {args.rounds} rounds "
          f"(+{args.warmup} warmup), medians; "
          f"load average {os.getloadavg()[0]:.1f} at start"
          + (f"; GLIBC_TUNABLES={RETAIN_HEAP}" if args.retain_heap else "; default malloc"), flush=True)
    if args.dtype != "float32":  # what the CPU's half matmuls are worth: every ratio to the floor depends on it
        from lorafit.hf import bf16_speed, native_bf16
        torch.set_num_threads(args.threads)
        print(f"# {native_bf16('cpu')[1]}; 256x256 bf16 matmuls run {bf16_speed():.2f}x as fast as float32 "
              f"({args.threads} threads)", flush=True)
    if "llama-1024" in args.models:
        ms, gflops = head_matmul(getattr(torch, args.dtype), args.threads)
        print(f"# llama-1024's output layer, (1024 x 1024) @ (1024 x 32000) in {args.dtype}: {ms:.0f} ms "
              f"({gflops:.0f} GFLOP/s), twice per floor step", flush=True)
    for model_name in args.models:
        if model_name == "smollm2-135m" and smollm2_path() is None:
            print(f"\n## {model_name}: skipped, not cached (python -c 'import lorafit.demo.assets as a; a.smollm2()')")
            continue
        results = {p: run_group(model_name, p, args.configs, args.rounds, args.warmup, args.threads,
                                args.retain_heap, args.adamw) for p in args.dropouts}
        print()
        print(table(model_name, results, args.threads, args.adamw), flush=True)
    print(f"\n# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
