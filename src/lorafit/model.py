"""Attach named adapters to a model in place, choose the active ones, disable, delete and merge them.

The user's model is modified in place and returned; no wrapper object, and the base keys keep their names. The
attach state (each adapter's config and targets, the active names, modules trained in full, the original
requires_grad flags) lives in ``model.lorafit_state``. The first adapter is named "default" unless told otherwise
and is active; later ones are added inactive, as PEFT's ``add_adapter`` does (``set_active`` switches). Only the
active adapters train.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Union

import torch
from torch import nn

from . import experts
from .errors import AdapterError
from .experts import ParamLayer
from .layers import LoraLayer
from .lora_config import ConfigError, LoraConfig
from .targets import Target, modules_to_save, select_targets
from .tensors import is_packed, is_quantized

DEFAULT = "default"


@dataclass
class AdapterInfo:
    config: LoraConfig
    targets: list[Target]


@dataclass
class AttachState:
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)  # in attach order
    active: list[str] = field(default_factory=list)
    saved: dict[str, nn.Module] = field(default_factory=dict)  # modules_to_save name -> frozen original
    copies: dict[str, nn.Module] = field(default_factory=dict)  # modules_to_save name -> the adapter's trained copy
    requires_grad: dict[str, bool] = field(default_factory=dict)  # flags before attach, restored by merge

    def name(self, name: str | None = None) -> str:
        """``name`` checked, or the one active adapter's name."""
        if name is not None:
            check_known(self, name)
            return name
        if len(self.active) == 1:
            return self.active[0]
        if not self.active and len(self.adapters) == 1:
            return next(iter(self.adapters))
        raise AdapterError(f"{len(self.active)} adapters are active ({self.active}); name the one you mean "
                           f"(adapters: {list(self.adapters)})")

    @property
    def config(self) -> LoraConfig:
        return self.adapters[self.name()].config

    @property
    def targets(self) -> list[Target]:
        return self.adapters[self.name()].targets


def check_known(state: AttachState, name) -> None:
    if name not in state.adapters:
        raise AdapterError(f"no adapter named {name!r}; this model has {list(state.adapters)}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def state_of(model: nn.Module) -> AttachState:
    """The attach state of a model, or a clear error if it has no lorafit adapter."""
    state = getattr(model, "lorafit_state", None)
    if not isinstance(state, AttachState):
        raise AdapterError("this model has no lorafit adapter: call lorafit.attach(model, config) or lorafit.load "
                           "first")
    return state


def has_adapter(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lorafit_state", None), AttachState)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added ([] without any)."""
    return list(state_of(model).adapters) if has_adapter(model) else []


def adapter_parameter_names(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Names (as in ``model.named_parameters()``) of everything the given adapters train (default: the active
    ones): LoRA factors, DoRA magnitudes, and for a lone adapter its modules_to_save and biases per ``config.bias``."""
    state = state_of(model)
    names = list(state.active if names is None else names)
    wanted = {f".adapters.{n}." for n in names}
    layer_names = {n for n, _ in adapter_layers(model)}
    biases = {state.adapters[n].config.bias for n in names}
    out = []
    for pname, _ in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        if ".adapters." in pname and leaf in ("lora_A", "lora_B", "lora_magnitude"):
            if any(w in f".{pname}" for w in wanted) and owner.rpartition(".adapters.")[0] in layer_names:
                out.append(pname)
        elif names and any(pname.startswith(s + ".") for s in state.saved):
            out.append(pname)
        elif leaf == "bias" and ("all" in biases or ("lora_only" in biases and owner in layer_names)):
            out.append(pname)
    return out


def _set_trainable(model: nn.Module) -> None:
    trainable = set(adapter_parameter_names(model))
    for pname, p in model.named_parameters():
        p.requires_grad_(pname in trainable)


def check_new(model: nn.Module, new: list[tuple[str, LoraConfig]]) -> None:
    """Refuse adapters that cannot join the model (a bad or taken name; a second adapter that lorafit cannot keep
    apart from the others), before anything changes."""
    state = state_of(model) if has_adapter(model) else AttachState()
    names = list(state.adapters)
    configs = [info.config for info in state.adapters.values()]
    for name, config in new:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ConfigError(f"adapter name {name!r}: use letters, digits, '_' and '-' (it names a folder on disk)")
        if re.fullmatch(r"checkpoint-\d+", name):
            raise ConfigError(f"adapter name {name!r} is how trainers name checkpoint folders, which loading skips; "
                              "pick another name")
        if name in names:
            raise AdapterError(f"this model already has an adapter named {name!r} (adapters: {names}); pick another "
                               "name, delete it first (lorafit.delete), or load with replace=True")
        if names and config.init_lora_weights in ("pissa", "olora"):
            raise ConfigError(f"adapter {name!r}: init_lora_weights={config.init_lora_weights!r} rewrites the base "
                              f"weights, which the model's other adapters ({names}) were trained on; use a fresh base")
        names.append(name)
        configs.append(config)
    if len(configs) > 1 and any(c.modules_to_save or c.bias != "none" for c in configs):
        who = names[next(i for i, c in enumerate(configs) if c.modules_to_save or c.bias != "none")]
        raise ConfigError(f"adapter {who!r} trains modules_to_save or biases; lorafit keeps several adapters on one "
                          "model only when each is LoRA factors alone (modules_to_save=None, bias='none')")


def attach(model: nn.Module, config: LoraConfig, *, name: str | None = None, init: bool = True) -> nn.Module:
    """Add a LoRA adapter ``name`` to ``model`` in place and return it.

    Each targeted module becomes (or, for a later adapter, already is) a ``LoraLayer`` that shares its weight and
    bias. The first adapter ("default" unless named) is active and the only thing trainable; later ones are added
    inactive (``set_active``). modules_to_save are replaced by trainable copies (the originals are kept for
    ``disabled``); biases train per ``config.bias``. ``init=False`` skips initialisation (``load`` overwrites).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorafit.LoraConfig, got {type(config).__name__}")
    first = not has_adapter(model)
    name = DEFAULT if name is None else name
    check_new(model, [(name, config)])
    targets = select_targets(model, config, strict=init)  # all validation happens before the model is touched
    saved = modules_to_save(model, config)
    _refuse_over_packed(model, config, targets, init)
    if init and config.init_lora_weights in ("pissa", "olora"):  # these rewrite W0 in place, layer by layer
        for t in targets:
            if is_quantized(model.get_submodule(t.name).weight):
                raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight, but "
                                  f"{t.name}.weight is quantized (lorafit.quant); use the default init (True) "
                                  "or 'gaussian' over a quantized base")
            if not torch.isfinite(model.get_submodule(t.name).weight).all():
                raise ConfigError(f"init_lora_weights={config.init_lora_weights!r}: {t.name}.weight contains NaN or "
                                  "inf values; a weight-based init needs a finite base model")
    state = AttachState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()}) if first \
        else state_of(model)

    # Allocate everything first (a huge rank fails here), so that a failure leaves the model as it was.
    layers, adapters_ = [], []
    for t in targets:
        layer = _layer_for(model, t)
        try:
            adapters_.append(layer.add(name, t.r, t.alpha, t.scaling, dropout=config.lora_dropout,
                                       use_dora=config.use_dora, activate=False))
        except (RuntimeError, MemoryError) as e:
            for done, ad in zip(layers, adapters_):
                del done.adapters[name]
            raise RuntimeError(f"cannot allocate the adapter of {t.name!r} (r={t.r}): {str(e).splitlines()[0]}; "
                               "the model is unchanged") from None
        layers.append(layer)
    copies = {n: copy.deepcopy(model.get_submodule(n)) for n in saved}  # as PEFT: originals stay frozen
    for t, layer in zip(targets, layers):
        if init:
            layer.reset_adapter(config.init_lora_weights, name)
        if isinstance(layer, ParamLayer):
            experts.install(layer)
        elif layer is not model.get_submodule(t.name):  # a new layer: in the wrapped module's mode (its __init__)
            _set_module(model, t.name, layer)
    for n, trainable in copies.items():
        state.saved[n] = model.get_submodule(n).requires_grad_(False)
        state.copies[n] = trainable
        _set_module(model, n, trainable)
    state.adapters[name] = AdapterInfo(config, targets)
    model.lorafit_state = state
    if first:
        set_active(model, name)
    else:
        _set_trainable(model)
    return model


def _layer_for(model: nn.Module, t: Target) -> LoraLayer:
    """The layer that will hold target ``t``'s adapter: the one already there, or a new one not yet in the model."""
    if t.kind == "param":
        owner_name, _, leaf = t.name.rpartition(".")
        owner = model.get_submodule(owner_name)
        return experts.param_layers(owner).get(leaf) or ParamLayer(owner, leaf)
    module = model.get_submodule(t.name)
    return module if isinstance(module, LoraLayer) else LoraLayer(module, t.kind)


def _refuse_over_packed(model: nn.Module, config: LoraConfig, targets: list[Target], init: bool) -> None:
    """bitsandbytes layers (``tensors.is_packed``): only their forward can read W0, so what needs its values is
    refused: DoRA's row norms ||W0 + s·B·A|| (at attach and at load) and PiSSA/OLoRA's rewrite of W0."""
    packed = [t.name for t in targets if t.kind != "param" and is_packed(model.get_submodule(t.name).weight)]
    if not packed:
        return
    what = f"layer (its weight a packed {type(model.get_submodule(packed[0]).weight).__name__})"
    if config.use_dora:
        raise ConfigError(f"use_dora=True: DoRA needs the row norms of W0, but {packed[0]!r} is a bitsandbytes "
                          f"{what}, whose packed weight only its forward can read; train LoRA (use_dora=False) over "
                          "it, or call lorafit.dequantize(model) first (or quantize with lorafit.quantize, whose "
                          "NF4 base supports DoRA)")
    if init and config.init_lora_weights in ("pissa", "olora"):
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight, but "
                          f"{packed[0]!r} is a bitsandbytes {what} (quantized); use the default init (True) or "
                          "'gaussian' over a quantized base")


def set_active(model: nn.Module, names: Union[str, list[str], None]) -> nn.Module:
    """Make ``names`` the adapters in effect: one name, a list (their updates add up, as PEFT's), or None for the
    base model. Only the active adapters train."""
    state = state_of(model)
    wanted = [] if names is None else [names] if isinstance(names, str) else list(names)
    for n in wanted:
        check_known(state, n)
    if len(set(wanted)) != len(wanted):
        raise AdapterError(f"set_active: a name appears twice in {wanted}")
    state.active = wanted
    for _, layer in adapter_layers(model):
        layer.active = tuple(n for n in wanted if n in layer.adapters)
    for n in state.saved:  # modules_to_save: the trained copy while the (lone) adapter is active, else the original
        _set_module(model, n, state.copies[n] if wanted else state.saved[n])
    _set_trainable(model)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen[id(p)] = p
    train = sum(p.numel() for p in seen.values() if p.requires_grad)
    return train, sum(p.numel() for p in seen.values())


@contextmanager
def disabled(model: nn.Module):
    """Run the base model: LoRA branches off and modules_to_save swapped back to their originals."""
    state = state_of(model)
    layers = [layer for _, layer in adapter_layers(model)]
    before = [layer.enabled for layer in layers]
    trained = {name: model.get_submodule(name) for name in state.saved}
    try:
        for layer in layers:
            layer.enabled = False
        for name, original in state.saved.items():
            _set_module(model, name, original)
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.enabled = flag
        for name, module in trained.items():
            _set_module(model, name, module)


def _untie_config(model: nn.Module) -> None:
    """Tell a transformers model (and its saved config) that input and output embeddings are no longer tied."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def _restore(model: nn.Module, name: str, layer: LoraLayer) -> None:
    """Put the wrapped module back, with the (possibly moved, re-wrapped or merged) parameters the layer holds."""
    if isinstance(layer, ParamLayer):
        experts.uninstall(layer)
        return
    base = layer.base
    base.weight = layer.weight
    if layer.bias is not None:
        base.bias = layer.bias
    base.train(layer.training)  # a bitsandbytes module was held in training mode while wrapped (layers.py)
    _set_module(model, name, base)


def _drop(model: nn.Module, names: list[str]) -> None:
    """Remove adapters ``names`` from every layer and the state; a layer left without adapters is unwrapped, and a
    model left without any loses its lorafit state (flags restored)."""
    state = state_of(model)
    for lname, layer in list(adapter_layers(model)):
        for n in names:
            if n in layer.adapters:
                del layer.adapters[n]
        layer.active = tuple(n for n in layer.active if n not in names)
        if not len(layer.adapters):
            _restore(model, lname, layer)
    for n in names:
        del state.adapters[n]
    state.active = [n for n in state.active if n not in names]
    if state.adapters:
        _set_trainable(model)
        return
    del model.lorafit_state
    for pname, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(pname, True))


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (the base weights are untouched). Deleting the last adapter returns the plain base
    model, with its modules_to_save originals; not while the model is in training mode."""
    state = state_of(model)
    check_known(state, name)
    if len(state.adapters) == 1 and model.training:
        raise AdapterError(f"adapter {name!r} is the model's only adapter and the model is in training mode; "
                           "call model.eval() first if you mean to drop it (or lorafit.merge to keep it)")
    if len(state.adapters) == 1:
        for n, original in state.saved.items():
            _set_module(model, n, original)
        state.copies.clear()
    _drop(model, [name])
    return model


def merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Fold adapters into the base weights (float32 math, base dtype kept), in order: ``names``, or by default the
    active ones. The other adapters stay attached; once none is left the original module types come back and
    modules_to_save keep their trained weights. A quantized weight (``lorafit.quant``) becomes a float weight of its
    compute dtype: its dequantized values plus ΔW, as "merge after QLoRA" is meant. A bitsandbytes layer is refused
    (``lorafit.dequantize`` first: it can only be merged into a float copy). Returns the model."""
    state = state_of(model)
    names = list(state.active if names is None else [names] if isinstance(names, str) else names)
    for n in names:
        check_known(state, n)
    if not names:
        raise AdapterError(f"no adapter is active; name the ones to merge (adapters: {list(state.adapters)})")
    packed = [lname for lname, layer in adapter_layers(model)
              if is_packed(layer.weight) and any(n in layer.adapters for n in names)]
    if packed:
        raise AdapterError(f"cannot merge into {packed[0]!r} ({len(packed)} such layers): its weight is bitsandbytes' "
                           f"packed {type(model.get_submodule(packed[0]).weight).__name__}, which cannot hold W0 + ΔW; "
                           "call lorafit.dequantize(model) first (float weights in place of the quantized ones), "
                           "then merge")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for lname, layer in list(adapter_layers(model)):
        for n in (n for n in names if n in layer.adapters):
            merged = layer.merged_weight(n)
            if is_quantized(layer.weight):  # merge after QLoRA: dequantized W0 + ΔW, a float weight in its place
                layer.weight = nn.Parameter(merged, requires_grad=False)
            elif uses[id(layer.weight)] > 1:  # tied (embeddings and lm_head): merging must not change the other user
                warnings.warn(f"{lname}.weight is tied to another module; merging unties it (the other keeps W0)")
                layer.weight = nn.Parameter(merged, requires_grad=layer.weight.requires_grad)
                _untie_config(model)
            else:
                with torch.no_grad():
                    layer.weight.copy_(merged)
    for n, trained in state.copies.items():  # merged: the trained modules_to_save stay
        _set_module(model, n, trained)
    _drop(model, names)
    return model
