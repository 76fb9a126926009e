"""`lorafit suggest`: a LoRA configuration from the rules of thumb, checked against the memory estimate of `plan`.

The rules (the design note behind lorafit, with the papers that motivate them):

    simple task        r = 4-8                               LoRA §7.2: r = 1-8 already suffices on GPT-3
    complex task       r = 16-64, or DoRA at a lower rank    DoRA (Liu et al. 2024): its gain is largest at low r
    memory-constrained attention query and value only        LoRA §7.1, Table 5: W_q, W_v is the best single pair
    best quality       all linear layers at moderate rank    QLoRA §4 (Dettmers et al. 2023): all layers are needed

One alpha convention (``LORA_ALPHA``), shared by ``suggest``, ``probe`` and ``tune``: lora_alpha = 16 at every rank,
so the scale is alpha/r = 16/r (2 at lorafit's default r=8). With Adam the size of the adapter's step is about
s·r·lr (B moves by ~lr per entry whatever its gradient's size, and B·A sums r such terms), = alpha·lr: a fixed alpha
keeps one learning rate right for every rank and every module of a probed rank pattern. LoRA §4.1: "we simply set
alpha to the first r we try and do not tune it ... this scaling helps to reduce the need to retune hyperparameters
when we vary r"; Schulman et al. 2025 ("LoRA Without Regret", Thinking Machines) measure the best learning rate
nearly independent of rank at fixed alpha. Scaling alpha with r (alpha = 2r) would instead grow the step with r.

The learning rate (``learning_rate``): about the pretraining learning rate of a model of that width,

    lr(d) = 1.5 · 3.6e-4 · (1024 / d)^0.77 · 16 / (s·r)       d = hidden size, s·r = alpha (alpha·sqrt(r) RSLoRA)

3.6e-4·(1024/d)^0.77 fits GPT-3's pretraining learning rates against width (Brown et al. 2020, Table 2.1); the
factor 1.5 matches QLoRA's LoRA learning rates at alpha 16 (2e-4 for 7B/13B, 1e-4 for 33B/65B; Dettmers et al.
2023, App. B); that is ~10x full fine-tuning's, the ratio LoRA's best learning rate is found at (Biderman et al.
2024, https://arxiv.org/abs/2405.09673; Schulman et al. 2025). The last factor keeps alpha·lr, what Adam's step
depends on, at the convention's.

Warm-up and schedule (``WARMUP_RATIO``, ``SCHEDULE``): linear warm-up over the first 10% of the steps, then cosine
decay. With B = 0 at the start, Adam's first updates move every entry of B by about lr whatever its gradient's size
(its second-moment estimate rests on a few samples), so the adapter's first steps are its largest: Ma & Yarats
2021 (AAAI, "On the adequacy of untuned warmup for adaptive optimization") trace warm-up's benefit to that update
size and give linear warm-up over 2/(1 - beta2) steps (2,000 at AdamW's beta2 = 0.999) as the untuned default. A
LoRA job is often shorter than that, so the share is what is given; 10% is at the long end of what LoRA recipes use
(QLoRA's and Alpaca's scripts: 3%). Measured on a development task none of the evidence tasks (the VADER NYT
editorials, all-linear r=8 at suggest's lr, 40 steps of 16, 3 seeds): 10% warm-up and cosine gave a lower eval loss
than a constant lr without warm-up on two seeds and the same on the third (docs/guidance.md, "Warm-up and
schedule"); issue 36 saw one seed in three spike without warm-up.

``suggest`` picks the preferred configuration for (complexity, goal), then shrinks it until it fits the budgets:
fewer targets (all-linear -> q, v), a lower rank, gradient checkpointing, a smaller micro-batch (gradient
accumulation keeps the effective batch). When nothing fits, ``fits`` is False and the last reason says why. On a
CUDA device the estimate is the GPU's (``plan``'s module docstring), and without a memory budget the GPU's free
memory is the budget.

Modules are found by structure and name, so any transformers model works (``attention_roles``).

Mixture-of-experts models (``experts_rule``): "all linear layers" includes the expert weights
(``target_parameters="experts"``), at r/k per expert, k the experts per token (``num_experts_per_tok``): a token
passes through k experts, so k·(r/k) gives each token the adapter capacity a dense layer has at rank r, and each
expert, which sees about k/E of the tokens, has less data to fit a larger update. This is lorafit's reasoning, not
a published rule; no DoRA then (expert weights take none). q, v only (efficiency) leaves them out and says so.

Papers: LoRA https://arxiv.org/abs/2106.09685, DoRA https://arxiv.org/abs/2402.09353,
QLoRA https://arxiv.org/abs/2305.14314, GPT-3 https://arxiv.org/abs/2005.14165,
LoRA Without Regret https://thinkingmachines.ai/blog/lora/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..experts import expert_weights, left_out_note
from ..layers import layer_kind
from ..lora_config import LoraConfig
from ..ops import scaling
from ..targets import output_layer_names, select_targets
from .plan import MemoryEstimate, adapter_parameters, as_device, cuda_memory, estimate_memory

COMPLEXITIES = ("simple", "complex")
GOALS = ("quality", "efficiency")

# (complexity, goal) -> preferred targets and rank; the lowest rank the rule allows before it is broken.
RULES = {
    ("simple", "efficiency"): dict(targets="qv", r=4, r_min=4),
    ("simple", "quality"): dict(targets="all-linear", r=8, r_min=4),
    ("complex", "efficiency"): dict(targets="qv", r=16, r_min=16),
    ("complex", "quality"): dict(targets="all-linear", r=32, r_min=16),
}
LORA_ALPHA = 16  # the one alpha convention: this alpha at every rank (module docstring); lorafit's default r=8
LR_MIN, LR_MAX = 1e-5, 1e-2  # the rule's range: beyond its fitted widths it extrapolates

# --- which module does what --------------------------------------------------------------------------------

_ATTN_SCOPE = re.compile(r"attn|attention", re.IGNORECASE)
_QUERY = re.compile(r"^(q|q_proj|query|q_lin|wq|to_q|query_proj)$", re.IGNORECASE)
_VALUE = re.compile(r"^(v|v_proj|value|v_lin|wv|to_v|value_proj)$", re.IGNORECASE)
_FUSED = re.compile(r"^(c_attn|qkv|qkv_proj|query_key_value|wqkv|w_pack|in_proj)$", re.IGNORECASE)


@dataclass
class Roles:
    """Full names of the linear layers of a model by role (the output layer is in none of them)."""

    query: list[str] = field(default_factory=list)
    value: list[str] = field(default_factory=list)
    fused_qkv: list[str] = field(default_factory=list)  # one projection computing q, k and v (GPT-2's c_attn)
    attention: list[str] = field(default_factory=list)  # every linear inside attention (q, k, v, o, fused)
    mlp: list[str] = field(default_factory=list)  # every other linear layer: MLP / feed-forward (and poolers)

    @property
    def qv(self) -> list[str]:
        """The query and value projections, or the fused qkv projections that contain them."""
        return self.query + self.value + self.fused_qkv


def _in_attention(model: nn.Module, name: str) -> bool:
    """Inside attention: a path segment says so (attn, attention) or an ancestor's class is an *Attention*."""
    parts = name.split(".")
    if any(_ATTN_SCOPE.search(p) for p in parts[:-1]):
        return True
    for i in range(1, len(parts)):
        if "Attention" in type(model.get_submodule(".".join(parts[:i]))).__name__:
            return True
    return False


def attention_roles(model: nn.Module) -> Roles:
    """Classify every nn.Linear / Conv1D (but the output layer) as query, value, fused qkv, other attention or MLP.

    Names decide first (q_proj, query, c_attn, query_key_value, ...). An attention block whose linears carry no
    known names falls back to structure: with four linears (registration order q, k, v, o, as every transformers
    implementation) the first is the query and the third the value; with two, the first is a fused qkv.
    """
    heads = output_layer_names(model)
    linears = [n for n, m in model.named_modules() if n and n not in heads and layer_kind(m) in ("linear", "linear_t")]
    roles = Roles()
    blocks: dict[str, list[str]] = {}
    for n in linears:
        if not _in_attention(model, n):
            roles.mlp.append(n)
            continue
        roles.attention.append(n)
        blocks.setdefault(n.rpartition(".")[0], []).append(n)
    for parent, names in blocks.items():
        leaf = {n: n.rpartition(".")[2] for n in names}
        q = [n for n in names if _QUERY.match(leaf[n])]
        v = [n for n in names if _VALUE.match(leaf[n])]
        fused = [n for n in names if _FUSED.match(leaf[n])]
        if not (q or v or fused):
            if len(names) == 4:
                q, v = [names[0]], [names[2]]
            elif len(names) == 2:
                fused = [names[0]]
        roles.query += q
        roles.value += v
        roles.fused_qkv += fused
    return roles


def minimal_names(model: nn.Module, wanted: list[str]) -> list[str]:
    """The shortest target_modules list (dot-suffix entries, PEFT's list rule) that selects exactly ``wanted``."""
    all_names = [n for n, _ in model.named_modules() if n]
    wanted_set = set(wanted)
    entries: list[str] = []
    for n in wanted:
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            hits = {m for m in all_names if m == suffix or m.endswith("." + suffix)}
            if hits <= wanted_set:
                if suffix not in entries:
                    entries.append(suffix)
                break
    return entries


def target_spec(model: nn.Module, which: str, roles: Optional[Roles] = None) -> Union[str, list[str]]:
    """target_modules for a named set: "qv", "attention", "mlp" or "all-linear"."""
    if which == "all-linear":
        return "all-linear"
    roles = roles or attention_roles(model)
    names = {"qv": roles.qv, "attention": roles.attention, "mlp": roles.mlp}.get(which)
    if names is None:
        raise ConfigError(f"unknown target set {which!r}; expected qv, attention, mlp or all-linear")
    if not names:
        raise ConfigError(f"found no {which} linear layers in {type(model).__name__}; name the target modules "
                          "yourself (e.g. target_modules=['q_proj', 'v_proj'])")
    return minimal_names(model, names)


# --- sizes -------------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(value: Union[int, float, str, None]) -> Optional[int]:
    """Bytes from an int or a string like "8GB", "512MiB", "1.5G". GB and GiB both mean 2**30 (how device memory
    is sold and reported: an "8 GB" GPU holds 8 GiB)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"memory budget {value!r} is not a size; write e.g. 8GB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_count(value: Union[int, str, None]) -> Optional[int]:
    """A parameter count from an int or a string like "2M", "500k", "1.5e6"."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbB]?)\s*", str(value))
    try:
        n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()] if m else None
    except ValueError:
        n = None
    if n is None or n <= 0:
        raise ConfigError(f"parameter budget {value!r} is not a count; write e.g. 500k, 2M or 1500000")
    return int(n)


def _gib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# --- the learning rate ------------------------------------------------------------------------------------

def model_width(model: nn.Module) -> int:
    """The hidden size (config's hidden_size / n_embd / d_model), else the most common input width of the linears."""
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    return max(sorted(set(widths)), key=widths.count) if widths else 1024


def learning_rate(model: nn.Module, *, r: int = 8, alpha: float = LORA_ALPHA, use_rslora: bool = False) -> float:
    """AdamW peak learning rate for a LoRA adapter of ``model`` (the module docstring's rule, clipped to
    [LR_MIN, LR_MAX]): lr(d) = 1.5 · 3.6e-4 · (1024/d)^0.77 · 16 / (s·r)."""
    d = model_width(model)
    step_scale = scaling(r, alpha, use_rslora) * r  # what Adam's step of B·A is proportional to (alpha for LoRA)
    lr = 1.5 * 3.6e-4 * (1024 / d) ** 0.77 * LORA_ALPHA / step_scale
    return float(f"{min(max(lr, LR_MIN), LR_MAX):.2g}")


WARMUP_RATIO = 0.1  # linear warm-up over this share of the steps (module docstring)
SCHEDULE = "cosine"  # after warm-up


def warmup_reason() -> str:
    """The reason line for the warm-up and schedule ``suggest`` gives."""
    return (f"warmup_ratio={WARMUP_RATIO:g}, schedule={SCHEDULE}: Adam's first steps move every entry of B by ~lr "
            "whatever its gradient, and linear warm-up keeps those first updates small (Ma & Yarats 2021; their "
            "untuned 2/(1-beta2) = 2,000 steps outlasts a short LoRA job, so a share of the steps; the cosine decay is "
            "the measured gain, in docs/guidance.md, 'Warm-up and schedule')")


def with_warmup(settings: dict) -> None:
    """tune's and sweep's default: a job that names no warm-up trains every trial and point with suggest's
    (``WARMUP_RATIO``, then the job's schedule), so a pick is trained as it was measured and as it is advised. A
    job's own warmup_steps or warmup_ratio, 0 included, is kept."""
    if "warmup_steps" not in settings and "warmup_ratio" not in settings:
        settings["warmup_ratio"] = WARMUP_RATIO


def lr_reason(model: nn.Module, lr: float) -> str:
    """The reason line for the learning rate ``suggest`` gives."""
    return (f"lr={lr:g}: about the pretraining learning rate of a width-{model_width(model)} model (a fit to GPT-3's, "
            "Brown et al. 2020, Table 2.1, matching QLoRA's 2e-4 at 7B/13B and 1e-4 at 33B/65B), ~10x full "
            "fine-tuning's, where LoRA's best learning rate is found (Biderman et al. 2024; Schulman et al. 2025)")


# --- the suggestion ----------------------------------------------------------------------------------------

@dataclass
class Suggestion:
    """A LoRA config, one line of reasoning per choice, and whether it fits the budgets."""

    config: LoraConfig
    reasons: list[str]
    fits: bool
    estimate: MemoryEstimate  # lorafit plan's peak-memory estimate for ``train`` settings
    trainable: int  # adapter parameters
    train: dict = field(default_factory=dict)  # TrainConfig settings: lr, and what the fit depends on (batch, ...)

    @property
    def lr(self) -> float:
        return self.train["lr"]

    def to_yaml_dict(self) -> dict:
        """A ``lorafit train --config`` mapping: the training settings and the LoRA fields under ``lora:``."""
        return {**self.train, "lora": lora_yaml(self.config)}


def lora_yaml(cfg: LoraConfig) -> dict:
    """The LoRA fields that differ from LoraConfig's defaults (r, alpha and targets always), for a YAML file."""
    defaults = LoraConfig()
    d = cfg.to_dict()
    keep = {"r", "lora_alpha", "target_modules"}
    return {k: v for k, v in d.items() if k in keep or v != getattr(defaults, k)}


def experts_rule(model: nn.Module, r: int) -> Optional[dict]:
    """For a mixture-of-experts model: the rank per expert for a dense rank r, and the facts behind it (module
    docstring: 'Mixture-of-experts models'); None for a dense model."""
    weights = expert_weights(model)
    if not weights:
        return None
    first = next(iter(weights.values()))
    n_experts = first.shape[0] if first.dim() == 3 else 1
    config = getattr(model, "config", None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(getattr(config, "text_config", None),
                                                                     "num_experts_per_tok", None)  # multimodal
    top_k = int(top_k or 1)
    r_expert = max(1, r // top_k)
    leaves = sorted({".".join(n.split(".")[-2:]) for n in weights})  # e.g. experts.gate_up_proj
    pattern = {"|".join(re.escape(x) for x in leaves): r_expert} if r_expert != r else {}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    share = sum(p.numel() for p in weights.values()) / max(total, 1)
    return dict(rank_pattern=pattern, r_expert=r_expert, top_k=top_k, n_experts=n_experts, count=len(weights),
                share=share)


def with_parameters(model: nn.Module, cfg: LoraConfig, spec) -> LoraConfig:
    """``cfg`` with ``spec`` (target_parameters: names, or 'experts') added; expert weights at r/k per expert
    (``experts_rule``), other parameters at r."""
    moe = experts_rule(model, cfg.r)
    pattern = {**cfg.rank_pattern, **(moe["rank_pattern"] if moe else {})}
    return replace(cfg, target_parameters=spec, rank_pattern=pattern)


def _count(model: nn.Module, cfg: LoraConfig) -> int:
    return sum(adapter_parameters(model, select_targets(model, cfg), cfg.use_dora).values())


@dataclass
class _Fit:
    """A candidate configuration as the budgets shape it: targets ("qv" | "all-linear" | ...), rank, and the
    training settings that change its memory (checkpointing, micro-batch, accumulation)."""

    model: nn.Module
    roles: Roles
    complexity: str
    max_length: int
    runtime: Optional[int]
    targets: str
    r: int
    batch: int
    gc: bool = False
    accum: int = 1
    targets_why: str = ""
    params: Union[list[str], str, None] = None  # target_parameters the user gave: in every candidate
    notes: list[str] = field(default_factory=list)  # what the budgets changed, in order
    device: torch.device = torch.device("cpu")  # whose memory the estimate is of (the CPU's RSS, or a GPU's)

    def config(self) -> LoraConfig:
        spec = target_spec(self.model, self.targets, self.roles)
        alpha = LORA_ALPHA  # the convention: the same alpha at every rank (module docstring)
        params = self.params or ("experts" if self.targets == "all-linear" and expert_weights(self.model) else None)
        # a complex task pushed below the rule's rank range by a budget: DoRA recovers most at low rank (but
        # parameters take no DoRA)
        cfg = LoraConfig(r=self.r, lora_alpha=alpha, target_modules=spec,
                         use_dora=self.complexity == "complex" and self.r < 16 and params is None)
        return cfg if params is None else with_parameters(self.model, cfg, params)

    def size(self) -> tuple[int, MemoryEstimate]:
        n = _count(self.model, self.config())
        return n, estimate_memory(self.model, n, batch_size=self.batch, max_length=self.max_length,
                                  gradient_checkpointing=self.gc, runtime=self.runtime, device=self.device)

    def ok(self, n_budget: Optional[int], mem_budget: Optional[int]) -> bool:
        n, mem = self.size()
        return (n_budget is None or n <= n_budget) and (mem_budget is None or mem.total <= mem_budget)


def _fit_params(fit: _Fit, rule: dict, n_budget: int) -> None:
    """Parameter budget: rank down to the rule's floor, then q,v only, then below the floor. A simple task keeps
    every linear layer down to r=1 first: measured on two tasks, all-linear r=1 did at least as well as q,v r=8 with
    fewer parameters (``EVIDENCE``)."""
    floor = 1 if fit.complexity == "simple" else rule["r_min"]
    while fit.size()[0] > n_budget:
        if fit.r > floor:
            fit.r //= 2
        elif fit.targets != "qv" and fit.roles.qv:
            fit.targets, fit.r = "qv", rule["r"]
            fit.targets_why = f"the parameter budget ({n_budget:,}) rules out all linear layers"
        elif fit.r > 1:
            fit.r //= 2
        else:
            break


def _fit_memory(fit: _Fit, rule: dict, n_budget: Optional[int], mem_budget: int, batch_size: int) -> None:
    """Memory budget: the note's memory-constrained rule (q, v only), a lower rank, checkpointing, smaller batch."""
    if fit.ok(n_budget, mem_budget):
        return
    if fit.targets != "qv" and fit.roles.qv:  # q, v at the rule's rank again: the parameter budget may have
        fit.targets, fit.r = "qv", max(fit.r, rule["r"])  # lowered all-linear's below what q, v alone can afford
        fit.targets_why = f"memory-constrained ({_gib(mem_budget)} budget)"
    def lower() -> bool:  # to the rule's floor for memory, below it only for the parameter budget
        return fit.r > rule["r_min"] or (fit.r > 1 and n_budget is not None and fit.size()[0] > n_budget)

    while not fit.ok(n_budget, mem_budget) and lower():
        fit.r //= 2
    if not fit.ok(n_budget, mem_budget):
        fit.gc = True
        fit.notes.append("gradient_checkpointing: on, keeping one activation per layer instead of ~20 (recomputed "
                         "in backward, ~30% slower)")
    while not fit.ok(n_budget, mem_budget) and fit.batch > 1:
        fit.batch //= 2
        fit.accum = batch_size // fit.batch
    if fit.batch != batch_size:
        fit.notes.append(f"batch_size={fit.batch}, grad_accum={fit.accum}: a smaller micro-batch holds fewer "
                         f"activations; accumulation keeps the effective batch of {fit.batch * fit.accum}")


def _choice_reasons(fit: _Fit, cfg: LoraConfig, goal: str) -> list[str]:
    """One line per choice (targets, rank, alpha, DoRA) with the rule and the paper behind it."""
    names = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules)
    n_modules, r = len([t for t in select_targets(fit.model, cfg) if t.kind != "param"]), fit.r
    if fit.targets == "all-linear":
        out = [f"target_modules=all-linear ({n_modules} layers): goal {goal}; the best quality comes from "
               "adapting every linear layer at moderate rank (QLoRA §4)"]
    else:
        out = [f"target_modules={names} ({n_modules} layers): {fit.targets_why}; attention query and value are "
               "the best single pair under a fixed parameter budget (LoRA §7.1, Table 5)"]
    alpha = (f"lora_alpha={cfg.lora_alpha:g}: the same alpha at every rank (scaling alpha/r = "
             f"{cfg.lora_alpha / r:g}): Adam's step of the update is ~alpha·lr whatever r is, so one learning "
             "rate serves every rank (LoRA §4.1 sets alpha once; Schulman et al. 2025)")
    if fit.complexity == "simple":
        below = "; below 4 for the parameter budget: " + EVIDENCE["budget"] if r < 4 and fit.targets != "qv" else ""
        return out + [f"r={r}: a simple task needs little capacity (rule: r=4-8; LoRA §7.2 finds r=1-8 enough)"
                      + below, alpha] + _experts_reasons(fit, cfg) + _evidence(fit)
    out += [f"r={r}: a complex task needs capacity (rule: r=16-64)" + (f"; the budget allows only r={r}" if r < 16
                                                                        else ""), alpha]
    out += _experts_reasons(fit, cfg)
    if cfg.use_dora:
        out.append("use_dora=true: below r=16 DoRA's learned magnitude recovers most of the quality a "
                   "complex task loses (DoRA's gain over LoRA is largest at low rank)")
    return out


# What lorafit measured where it disagrees with a rule of thumb: SmolLM2-135M-Instruct, 3 seeds each, the
# movie-review and chat-JSON tasks (60 steps) and the tweets (40 steps of 16) (docs/guidance.md, "Evidence").
EVIDENCE = {
    "rank": "measured (docs/guidance.md, 4 tasks): all-linear r=1 tied r=8 on three tasks (the fourth with one "
            "seed) and beat it on the chat task, at 1/8 of the parameters; on that fourth task DoRA r=4 beat both, so "
            "no one rank wins: `lorafit tune` measures, and prefers the smaller configuration within noise",
    "budget": "measured on 2 tasks, all-linear r=1 did at least as well as q,v r=8 with fewer parameters (305k vs "
              "461k): 0.1355 vs 0.1418 eval loss on the chat task (2.5 seed std apart), 0.372 vs 0.396 on the "
              "movie reviews (within one std)",
    "qv": "measured (docs/guidance.md): at suggest's lr, q,v only trailed every all-linear run on the chat task by "
          "0.003-0.006 eval loss (1.3-2.5 of its seed std), and all-linear r=1 and r=8 by about 0.02, within noise, "
          "on the movie reviews; it saves memory at a small cost in quality",
}


def _evidence(fit: _Fit) -> list[str]:
    """The measured caveat to the chosen rule, where lorafit's measurements disagree with it."""
    if fit.targets == "qv":
        return ["evidence: " + EVIDENCE["qv"]]
    return ["evidence: " + EVIDENCE["rank"]] if fit.r > 1 else []


def _experts_reasons(fit: _Fit, cfg: LoraConfig) -> list[str]:
    """On a mixture-of-experts model: why the expert weights are in (at which rank per expert) or left out."""
    moe = experts_rule(fit.model, fit.r)
    if fit.params is not None and fit.params != "experts":
        return [f"target_parameters={fit.params}: as given" + (f", expert weights at r={moe['r_expert']} (r/k)"
                                                              if moe and moe["rank_pattern"] else "")]
    if moe is None:
        return []
    if not cfg.target_parameters:
        return [left_out_note(fit.model, [t.name for t in select_targets(fit.model, cfg)]) +
                f" ({fit.targets_why or 'the goal'} keeps to q, v)"]
    k, e, r_e = moe["top_k"], moe["n_experts"], moe["r_expert"]
    why = "as given" if fit.params else ("'all linear layers' on a MoE model means its experts too, which are 3D "
                                         "parameters, not linear layers")
    return [f"target_parameters=experts ({moe['count']} expert weights, {moe['share']:.0%} of the parameters): {why}",
            f"r={r_e} per expert (rank_pattern): each token passes through k={k} of the {e} experts, so r/k per "
            f"expert gives a token the adapter capacity of a dense layer at r={fit.r} (k x r/k), while each "
            f"expert, seeing about k/E = {k}/{e} of the tokens, has less data to fit a larger update; lorafit's "
            "reasoning, not a published rule: `lorafit tune` can switch the experts off or on to check it"]


def _budget_reason(fit: _Fit, n: int, mem: MemoryEstimate, fits: bool, n_budget: Optional[int],
                   mem_budget: Optional[int]) -> str:
    """The line that says whether the config fits the budgets, and what would be needed when nothing does."""
    checks = []
    if n_budget is not None:
        checks.append(f"{n:,} adapter parameters {'<=' if n <= n_budget else '>'} budget {n_budget:,}")
    if mem_budget is not None:
        checks.append(f"peak training memory ~{_gib(mem.total)} {'<=' if mem.total <= mem_budget else '>'} budget "
                      f"{_gib(mem_budget)} (lorafit plan's estimate, batch {fit.batch} x {fit.max_length} tokens)")
    if fits:
        return ("fits: " + "; ".join(checks) if checks else
                f"no budget given: {n:,} adapter parameters, peak training memory ~{_gib(mem.total)} "
                f"(batch {fit.batch} x {fit.max_length} tokens)")
    floor = estimate_memory(fit.model, 0, batch_size=1, max_length=fit.max_length, gradient_checkpointing=True,
                            runtime=fit.runtime, device=fit.device).total
    fixed = "CUDA context" if fit.device.type == "cuda" else "runtime"
    return ("NOTHING FITS: even the smallest configuration tried misses the budget: " + "; ".join(checks)
            + (f"; the base weights and {fixed} alone need ~{_gib(floor)} at batch 1 with checkpointing"
               if mem_budget is not None and floor > mem_budget else "")
            + ". Raise the budget, shorten max_length, or use a smaller model / lower-precision weights")


def device_budget(device: torch.device, memory_budget: Optional[int]) -> tuple[Optional[int], list[str]]:
    """(the memory budget, the reason line when it was not given): on CUDA without one, the GPU's free memory."""
    if memory_budget is not None or device.type != "cuda":
        return memory_budget, []
    free, total = cuda_memory(device)
    return free, [f"memory budget: the {_gib(free)} free of {_gib(total)} on {device} (torch.cuda.mem_get_info), "
                  "as none was given; the estimate is of the GPU's memory"]


def suggest(model: nn.Module, complexity: Optional[str] = "simple", *, memory_budget: Union[int, str, None] = None,
            param_budget: Union[int, str, None] = None, goal: str = "quality", batch_size: int = 8,
            max_length: int = 256, runtime: Optional[int] = None,
            device: Union[torch.device, str, None] = None,
            target_parameters: Union[list[str], str, None] = None) -> Suggestion:
    """The LoRA configuration the rules of thumb give for ``model`` and the task, within the budgets.

    Args:
        model: the model; it may live on the meta device (only shapes are read).
        complexity: "simple" | "complex"; None means unknown, treated as simple (``lorafit probe`` measures it).
        memory_budget: bytes or a size string ("8GB"), compared with ``lorafit plan``'s peak training estimate for
            ``batch_size`` x ``max_length`` tokens.
        param_budget: most adapter parameters (a number or "500k").
        goal: "quality" (all linear layers) or "efficiency" (q, v only).
        batch_size, max_length: the training batch the memory check assumes.
        runtime: the process baseline in bytes (default this process's peak RSS, as ``plan``).
        device: where the run trains: None or the CPU estimates its peak RSS; CUDA estimates the GPU's memory, and
            without ``memory_budget`` the GPU's free memory is the budget (a name is resolved as ``--device``).
        target_parameters: parameters (names, or 'experts') every candidate adapts; by default a mixture-of-experts
            model's expert weights join "all linear layers" (module docstring).
    """
    if complexity is not None and complexity not in COMPLEXITIES:
        raise ConfigError(f"complexity={complexity!r} is invalid: expected simple or complex")
    if goal not in GOALS:
        raise ConfigError(f"goal={goal!r} is invalid: expected quality or efficiency")
    device = as_device(device)
    mem_budget, reasons = device_budget(device, parse_bytes(memory_budget))
    n_budget = parse_count(param_budget)
    roles = attention_roles(model)
    if complexity is None:
        reasons.append("complexity: not given, assumed simple; `lorafit probe` measures it from the data")
    complexity = complexity or "simple"
    rule = RULES[(complexity, goal)]
    targets = rule["targets"] if rule["targets"] != "qv" or roles.qv else "all-linear"  # no attention: all linear
    fit = _Fit(model, roles, complexity, max_length, runtime, targets, rule["r"], batch_size,
               targets_why=f"goal {goal}", params=target_parameters, device=device)
    if n_budget is not None:
        _fit_params(fit, rule, n_budget)
    if mem_budget is not None:
        _fit_memory(fit, rule, n_budget, mem_budget, batch_size)
    cfg = fit.config()
    n, mem = fit.size()
    fits = (n_budget is None or n <= n_budget) and (mem_budget is None or mem.total <= mem_budget)
    lr = learning_rate(model, r=cfg.r, alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora)
    reasons += _choice_reasons(fit, cfg, goal) + [lr_reason(model, lr), warmup_reason()] + fit.notes \
        + [_budget_reason(fit, n, mem, fits, n_budget, mem_budget)]
    train = {"lr": lr, "warmup_ratio": WARMUP_RATIO, "schedule": SCHEDULE, "batch_size": fit.batch,
             "max_length": max_length}
    if fit.accum > 1:
        train["grad_accum"] = fit.accum
    if fit.gc:
        train["gradient_checkpointing"] = True
    return Suggestion(cfg, reasons, fits, mem, n, train)
