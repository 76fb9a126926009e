"""One training step of LoRA on a mixture-of-experts model: lorafit and PEFT side by side, against the frozen floor.

    python benchmarks/moe.py                          # float32 and bfloat16 bases, 5 rounds
    python benchmarks/moe.py --dtypes float32 --rounds 3 --experts 32 --hidden 512

The model is a random Qwen3-MoE built with transformers' own classes (hidden 512, 32 experts, top-4, expert width
256, 2 layers, vocab 4096, transformers' default grouped_mm experts kernel), the batch 4 x 256 tokens, the adapter
r=16, alpha=32 on q_proj, v_proj and both expert weights (``target_parameters``: gate_up_proj, down_proj).

- floor: the frozen model (nothing requires grad) run forward and backward to its input embeddings: what any adapter
  pays at least.
- peft: ``get_peft_model`` with ``target_parameters`` (PEFT's ParamWrapper: W + ΔW for every expert in every forward).
- lorafit: ``lorafit.attach`` with the same config (each expert's s·B·A·x on its own rows).

All three run in one process, taking turns each round in rotating order, so a slow spell of the machine hits each
alike; a step is forward, backward and (for the adapters) a fused AdamW step. The table gives the median step time,
the median over rounds of its ratio to that round's floor step, the overhead over the floor, lorafit's overhead as a
share of PEFT's, and the extra peak tensor memory over the floor's (torch.profiler's memory events, as
benchmarks/step.py measures it). Before timing, lorafit's and PEFT's first-step loss and factor gradients are
compared (the same adapter weights, through PEFT's file).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step import tensor_peak_mb  # noqa: E402

THREADS = 2
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build_base(args, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         moe_intermediate_size=args.expert_width, num_experts=args.experts,
                         num_experts_per_tok=args.top_k, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=args.hidden // 8, max_position_embeddings=args.seq)
    return Qwen3MoeForCausalLM(cfg).to(dtype).train()


def make_step(model, batch, trainable: bool):
    """A training step closure; ``live_tensors`` gives what stays alive between steps (for the memory peak)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if trainable else None
    embed = model.get_input_embeddings()

    def step():
        x = embed(batch).detach().requires_grad_()
        loss = model(inputs_embeds=x, labels=batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    def live_tensors():
        state = [t for s in (opt.state.values() if opt else []) for t in s.values() if torch.is_tensor(t)]
        return [*model.parameters(), *model.buffers(), *state]

    step.live_tensors = live_tensors
    return step


def build(args, dtype: torch.dtype, batch):
    """(steps by name, the first-step parity of lorafit and PEFT)."""
    import peft

    import lorafit

    base = build_base(args, dtype)
    floor = copy.deepcopy(base).requires_grad_(False)
    cfg = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj"], target_parameters=TARGETS)
    ours = lorafit.attach(copy.deepcopy(base), lorafit.LoraConfig(**cfg, init_lora_weights=False))
    with tempfile.TemporaryDirectory() as tmp:
        lorafit.save(ours, tmp)
        exact = lorafit.load(copy.deepcopy(base).float(), tmp) if dtype != torch.float32 else None
        theirs = peft.PeftModel.from_pretrained(base, tmp, is_trainable=True)
    parity = first_step_parity(ours, theirs, batch, exact)
    steps = {"floor": make_step(floor, batch, False), "peft": make_step(theirs, batch, True),
             "lorafit": make_step(ours, batch, True)}
    return steps, parity


def first_step_parity(ours, theirs, batch, exact=None) -> dict:
    """After one forward and backward: |loss difference| and the largest relative difference of a factor's
    gradient between lorafit and PEFT; with ``exact`` (the same adapter on the base upcast to float32), each one's
    largest relative gradient error against it."""
    from lorafit.peft_format import adapter_parameters

    models = [m for m in (ours, theirs, exact) if m is not None]
    losses = [m(batch, labels=batch).loss for m in models]
    for loss in losses:
        loss.backward()
    named = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if p.requires_grad}
    grads = [{k: p.grad.float() for k, p in adapter_parameters(m).items()} for m in (ours, exact) if m is not None]
    grads.insert(1, {k: named[k].grad.float() for k in grads[0]})

    def worst(got: dict, want: dict) -> float:
        return max(((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30)).item() for k in want)

    out = {"loss": abs(losses[0].item() - losses[1].item()), "grad": worst(grads[0], grads[1])}
    if exact is not None:
        out.update(lorafit_vs_fp32=worst(grads[0], grads[2]), peft_vs_fp32=worst(grads[1], grads[2]))
    for m in models:
        m.zero_grad(set_to_none=True)
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(args, dtype: torch.dtype) -> dict:
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    steps, parity = build(args, dtype, batch)
    names = list(steps)
    for _ in range(args.warmup):
        for n in names:
            steps[n]()
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(timed(steps[n]))
    peak = {n: tensor_peak_mb(steps[n]) for n in names}
    return {"times": times, "peak": peak, "parity": parity}


def table(dtype: str, res: dict) -> str:
    times, peak = res["times"], res["peak"]
    floor = times["floor"]
    ratio = {n: statistics.median(t / f for t, f in zip(times[n], floor)) for n in times}
    over = {n: ratio[n] - 1 for n in times}
    par = res["parity"]
    exact = (f"; against the float32 reference (the same adapter on the base upcast), lorafit's worst is "
             f"{par['lorafit_vs_fp32']:.2e} and PEFT's {par['peft_vs_fp32']:.2e}") if "peft_vs_fp32" in par else ""
    lines = [f"base {dtype}: first-step |loss lorafit - PEFT| {par['loss']:.2e}, worst factor-gradient relative "
             f"difference {par['grad']:.2e}{exact}",
             "| | median step | x floor | overhead | share of PEFT's overhead | peak tensors | extra over floor "
             "| share of PEFT's extra |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in times:
        extra = peak[n] - peak["floor"]
        share = f"{over[n] / over['peft']:.2f}" if n == "lorafit" and over["peft"] > 0 else ""
        mshare = f"{extra / (peak['peft'] - peak['floor']):.2f}" if n == "lorafit" else ""
        lines.append(f"| {n} | {statistics.median(times[n]) * 1e3:,.0f} ms | {ratio[n]:.3f} | {over[n]:+.1%} | {share} "
                     f"| {peak[n]:,.0f} MB | {extra:+,.0f} MB | {mshare} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{THREADS} threads; Qwen3-MoE hidden {args.hidden}, {args.experts} experts (top {args.top_k}, width "
          f"{args.expert_width}), batch {args.batch} x {args.seq}, r={args.rank} on q, v and the experts")
    for name in args.dtypes.split(","):
        print(table(name, run(args, getattr(torch, name))), flush=True)


if __name__ == "__main__":
    main()
