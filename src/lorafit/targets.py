"""Which modules get an adapter, and with which rank and alpha.

PEFT's matching rules, with stricter errors:

* a list of names: a module matches if its full name equals an entry or ends with ``"." + entry``;
* a string: ``re.fullmatch`` on the full module name;
* ``"all-linear"``: every nn.Linear / transformers Conv1D except the output layer. The output layer is
  ``model.get_output_embeddings()`` when the model has one, otherwise a top-level ``lm_head``, ``score`` or
  ``classifier``. (PEFT adapts such a head on non-transformers models and on classifiers without a task_type;
  lorafit never does. This is deliberate: a freshly initialised head must be trained in full via
  ``modules_to_save``, and a low-rank update of it is almost never what the user meant.)
* ``exclude_modules`` by the same rules, applied first; ``layers_to_transform`` / ``layers_pattern`` select layer
  indices as PEFT does; ``rank_pattern`` / ``alpha_pattern``: the first key whose regex matches the module name at a
  dot boundary sets that module's rank / alpha.

Unlike PEFT, a target entry that matches nothing, or a match of an unsupported type, is an error.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass

from torch import nn

from .experts import FAST_PARAMS, ParamLayer, is_fast_module
from .layers import LoraLayer, in_out_features, layer_kind
from .lora_config import EXPERTS, ConfigError, LoraConfig
from .ops import scaling

OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier")

# Used only when target_modules is None: the attention query/value projections of common architectures.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
}


@dataclass(frozen=True)
class Target:
    """One module to adapt: its name, kind and resolved hyperparameters."""

    name: str
    kind: str
    r: int
    alpha: float
    scaling: float


def name_matches(name: str, entries) -> bool:
    """PEFT's rule for a list of names: exact match or a dot-boundary suffix match."""
    return any(name == e or name.endswith("." + e) for e in entries)


def spec_matches(name: str, spec) -> bool:
    """A list of names, or a regex string matched in full."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name_matches(name, spec)


def pattern_key(patterns: dict, name: str):
    """The first key (dict order) whose regex matches ``name`` at a dot boundary, or None (PEFT semantics)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the model's output layer, which "all-linear" leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get):
        try:
            head = get()
        except (AttributeError, NotImplementedError):
            head = None
    if isinstance(head, nn.Module):
        return {n for n, m in model.named_modules() if m is head}
    return {n for n in OUTPUT_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)}


def layer_index(name: str, layers_pattern) -> int | None:
    """The layer index in a module name, as PEFT finds it (the first numbered segment after the pattern)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def _similar(word: str, names: list[str], n: int = 5) -> str:
    leaves = sorted({x.rsplit(".", 1)[-1] for x in names} | set(names))
    close = difflib.get_close_matches(word, leaves, n=n, cutoff=0.5) or \
        sorted({x.rsplit(".", 1)[-1] for x in names})[:n]
    return ", ".join(close)


def _unsupported(name: str, module: nn.Module) -> ConfigError:
    return ConfigError(f"target module {name!r} is a {type(module).__module__}.{type(module).__name__}, which LoRA "
                       "cannot adapt; supported types: nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, transformers "
                       "Conv1D. Target its linear sub-layers instead (e.g. 'q_proj' rather than 'self_attn').")


def modules_to_save(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the modules trained in full (``modules_to_save``), outermost matches only."""
    if not cfg.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n and name_matches(n, cfg.modules_to_save)]
    missing = [e for e in cfg.modules_to_save if not any(n == e or n.endswith("." + e) for n in names)]
    if missing:
        all_names = [n for n, _ in model.named_modules() if n]
        raise ConfigError(f"modules_to_save entry {missing[0]!r} matches no module in the model; "
                          f"similar names: {_similar(missing[0], all_names)}")
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _default_spec(model: nn.Module) -> list[str]:
    """PEFT's default targets (attention query/value) for ``target_modules=None``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError("LoraConfig.target_modules=None: lorafit has no default targets for "
                          f"model type {model_type!r}; set target_modules, e.g. ['q_proj', 'v_proj'] or "
                          "'all-linear'")
    return DEFAULT_TARGETS[model_type]


Named = list[tuple[str, nn.Module]]


def _match_all_linear(model: nn.Module, candidates: Named) -> Named:
    heads = output_layer_names(model)
    matched = [(n, m) for n, m in candidates if layer_kind(m) in ("linear", "linear_t") and n not in heads]
    if not matched:
        raise ConfigError("target_modules='all-linear' found no nn.Linear or Conv1D layer (besides the output "
                          "layer) in the model")
    return matched


def _match_regex(spec: str, candidates: Named, all_names: list[str]) -> Named:
    matched = [(n, m) for n, m in candidates if re.fullmatch(spec, n)]
    if not matched and any(re.fullmatch(spec, n) for n in all_names):
        raise ConfigError(f"target_modules regex {spec!r} matches no module once exclude_modules/"
                          "modules_to_save are applied")
    if not matched:
        raise ConfigError(f"target_modules regex {spec!r} matches no module name (it must match the full "
                          f"name, e.g. r'.*\\.q_proj'); some module names: {_similar(spec, all_names)}")
    return matched


def _match_names(spec: list[str], cfg: LoraConfig, candidates: Named, all_names: list[str], strict: bool) -> Named:
    matched = [(n, m) for n, m in candidates if name_matches(n, spec)]
    for entry in spec:
        if any(n == entry or n.endswith("." + entry) for n, _ in matched):
            continue
        excluded = any(name_matches(n, [entry]) for n in all_names)
        if excluded and not strict:
            continue
        raise ConfigError(f"target_modules entry {entry!r} matches no module in the model"
                          f"{' once exclude_modules/modules_to_save are applied' if excluded else ''}"
                          f"; similar names: {_similar(entry, all_names)}")
    if cfg.layers_to_transform is not None:
        wanted = cfg.layers_to_transform
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        matched = [(n, m) for n, m in matched if layer_index(n, cfg.layers_pattern) in wanted]
        if not matched:
            raise ConfigError(f"layers_to_transform={cfg.layers_to_transform!r} (layers_pattern="
                              f"{cfg.layers_pattern!r}) leaves no target module; layer indices are read from "
                              "names like 'model.layers.3.self_attn.q_proj'")
    return matched


def _target(n: str, m: nn.Module, cfg: LoraConfig) -> Target:
    """One matched module as a Target, with its rank and alpha from the patterns; refuses what cannot be adapted."""
    kind = layer_kind(m)
    if kind is None:
        raise _unsupported(n, m)
    m = m.base if isinstance(m, LoraLayer) else m  # a layer that already holds another adapter
    if kind == "conv" and (m.groups != 1 or m.padding_mode != "zeros" or any(d != 1 for d in m.dilation)):
        raise ConfigError(f"target module {n!r} is a {type(m).__name__} with groups={m.groups}, "
                          f"dilation={m.dilation}, padding_mode={m.padding_mode!r}; lorafit adapts convolutions "
                          "with groups=1, dilation=1 and zero padding only")
    r = cfg.rank_pattern[k] if (k := pattern_key(cfg.rank_pattern, n)) is not None else cfg.r
    alpha = cfg.alpha_pattern[k] if (k := pattern_key(cfg.alpha_pattern, n)) is not None else cfg.lora_alpha
    if cfg.init_lora_weights in ("pissa", "olora"):
        if kind not in ("linear", "linear_t"):
            raise ConfigError(f"init_lora_weights={cfg.init_lora_weights!r} supports linear layers only; "
                              f"{n!r} is a {type(m).__name__}")
        shape = tuple(reversed(in_out_features(m, kind)))  # (out, in), also of a packed bitsandbytes weight
        if r > min(shape):
            raise ConfigError(f"init_lora_weights={cfg.init_lora_weights!r} needs r <= min(in, out); {n!r} has "
                              f"shape {shape} and r={r}")
    return Target(n, kind, r, alpha, scaling(r, alpha, cfg.use_rslora))


def _warn_unused_patterns(cfg: LoraConfig, names: list[str]) -> None:
    for field, patterns in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        for key in patterns:
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in names):
                warnings.warn(f"{field} key {key!r} matches none of the {len(names)} targeted modules; it has no "
                              "effect", stacklevel=4)


def select_targets(model: nn.Module, cfg: LoraConfig, strict: bool = True) -> list[Target]:
    """The modules ``cfg`` adapts in ``model``, in model order, with per-module rank, alpha and scaling.

    One matcher per kind of ``target_modules``: "all-linear", a regex (``re.fullmatch`` on the full name), or a
    list of names (suffix match at a dot). ``strict=False`` (reading a saved adapter) accepts target entries that
    only excluded modules match, as PEFT writes "all-linear" expanded to names before applying exclude_modules.
    """
    wrapped = [n + "." for n, m in model.named_modules() if isinstance(m, LoraLayer)]  # an adapter's insides
    named = [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(w) for w in wrapped)
             and not isinstance(m, ParamLayer)]
    all_names = [n for n, _ in named]
    params = parameter_targets(model, cfg)
    if cfg.target_modules is None and params:  # PEFT: the model type's default modules, else none
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = DEFAULT_TARGETS.get(model_type, [])
    else:
        spec = _default_spec(model) if cfg.target_modules is None else cfg.target_modules
    if not spec:
        _refuse_overlap(model, [], params)
        return params
    saved = modules_to_save(model, cfg)
    in_saved = lambda n: any(n == s or n.startswith(s + ".") for s in saved)  # noqa: E731
    candidates = [(n, m) for n, m in named
                  if not (cfg.exclude_modules and spec_matches(n, cfg.exclude_modules)) and not in_saved(n)]
    if isinstance(spec, str) and spec.lower() == "all-linear":
        matched = _match_all_linear(model, candidates)
    elif isinstance(spec, str):
        matched = _match_regex(spec, candidates, all_names)
    else:
        matched = _match_names(spec, cfg, candidates, all_names, strict)
    targets = [_target(n, m, cfg) for n, m in matched]
    _refuse_overlap(model, targets, params)
    targets += params
    _warn_unused_patterns(cfg, [t.name for t in targets])
    return targets


def _refuse_overlap(model: nn.Module, modules: list[Target], params: list[Target]) -> None:
    """A parameter of a module that target_modules already adapts (PEFT refuses it too)."""
    adapted = {t.name for t in modules}
    for t in modules:
        taken = [m.param_name for m in model.get_submodule(t.name).children() if isinstance(m, ParamLayer)]
        if taken:
            raise ConfigError(f"target module {t.name!r} has its parameter {taken[0]!r} adapted by another adapter "
                              "(target_parameters); adapt the module or its parameter, not both")
    for p in params:
        owner = p.name.rpartition(".")[0]
        if owner in adapted or isinstance(model.get_submodule(owner), LoraLayer):
            raise ConfigError(f"target_parameters entry {p.name!r} is a parameter of {owner!r}, which target_modules "
                              "(or another adapter) already adapts; adapt the module or its parameter, not both")


def _named_parameters(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(owner module name, parameter leaf, parameter) of every parameter a module holds itself, lorafit's own
    adapter tensors left out."""
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, ParamLayer) or ".adapters." in f".{mname}.":
            continue
        for leaf, p in module.named_parameters(recurse=False):
            out.append((mname, leaf, p))
    return out


def parameter_targets(model: nn.Module, cfg: LoraConfig) -> list[Target]:
    """The parameters ``cfg.target_parameters`` adapts (PEFT's rule: the full name equals an entry or ends with
    "." + entry), in model order; 'experts' means every projection weight of every transformers experts module."""
    spec = cfg.target_parameters
    if spec is None:
        return []
    named = _named_parameters(model)
    full = lambda owner, leaf: f"{owner}.{leaf}" if owner else leaf  # noqa: E731
    if spec == EXPERTS:
        matched = [(o, leaf, p) for o, leaf, p in named
                   if leaf in FAST_PARAMS and is_fast_module(model.get_submodule(o))]
        if not matched:
            raise ConfigError("target_parameters='experts' found no mixture-of-experts weights (transformers' fused "
                              "experts modules, e.g. mlp.experts.gate_up_proj) in this model")
    else:
        matched = [(o, leaf, p) for o, leaf, p in named if name_matches(full(o, leaf), spec)]
        for entry in spec:
            if not any(name_matches(full(o, leaf), [entry]) for o, leaf, _ in matched):
                names = [full(o, leaf) for o, leaf, p in named if p.dim() in (2, 3)]
                raise ConfigError(f"target_parameters entry {entry!r} matches no parameter in the model; similar "
                                  f"names: {_similar(entry, names)}")
    targets = []
    for owner, leaf, p in matched:
        name = full(owner, leaf)
        if not owner:
            raise ConfigError(f"target_parameters entry {name!r} is a parameter of the model itself; adapt "
                              "parameters of its submodules (PEFT wraps a submodule per parameter)")
        if p.dim() not in (2, 3):
            raise ConfigError(f"target_parameters entry {name!r} is a {p.dim()}D parameter {tuple(p.shape)}; LoRA "
                              "adapts 2D weights (out, in) and 3D expert stacks (experts, out, in) only")
        if not p.is_floating_point():
            raise ConfigError(f"target_parameters entry {name!r} has dtype {p.dtype} (quantized?); lorafit adapts "
                              "floating-point parameters only")
        r = cfg.rank_pattern[k] if (k := pattern_key(cfg.rank_pattern, name)) is not None else cfg.r
        alpha = cfg.alpha_pattern[k] if (k := pattern_key(cfg.alpha_pattern, name)) is not None else cfg.lora_alpha
        targets.append(Target(name, "param", r, alpha, scaling(r, alpha, cfg.use_rslora)))
    return targets
