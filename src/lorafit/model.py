"""Attach adapters to a model in place, freeze the rest, disable them, and merge them back.

The user's model is modified in place and returned; no wrapper object, no renamed keys. The attach state (config,
targets, modules trained in full, the original requires_grad flags) lives in ``model.lorafit_state``.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .config import ConfigError, LoraConfig
from .layers import LoraLayer
from .targets import Target, modules_to_save, select_targets


@dataclass
class AttachState:
    config: LoraConfig
    targets: list[Target]
    saved: dict[str, nn.Module] = field(default_factory=dict)  # modules_to_save name -> frozen original
    requires_grad: dict[str, bool] = field(default_factory=dict)  # flags before attach, restored by merge


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def state_of(model: nn.Module) -> AttachState:
    """The attach state of a model, or a clear error if it has no lorafit adapter."""
    state = getattr(model, "lorafit_state", None)
    if not isinstance(state, AttachState):
        raise ValueError("this model has no lorafit adapter: call lorafit.attach(model, config) or lorafit.load first")
    return state


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of everything the adapter trains: LoRA factors, DoRA magnitudes,
    modules_to_save and biases per ``config.bias``."""
    state = state_of(model)
    cfg, layer_names = state.config, {n for n, _ in adapter_layers(model)}
    names = []
    for pname, _ in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        if owner in layer_names and leaf in ("lora_A", "lora_B", "lora_magnitude"):
            names.append(pname)
        elif any(pname.startswith(s + ".") for s in state.saved):
            names.append(pname)
        elif leaf == "bias" and (cfg.bias == "all" or (cfg.bias == "lora_only" and owner in layer_names)):
            names.append(pname)
    return names


def attach(model: nn.Module, config: LoraConfig, *, init: bool = True) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and return it; only the adapter stays trainable.

    Each targeted module is replaced by a ``LoraLayer`` that shares its weight and bias. modules_to_save are
    replaced by trainable copies (the originals are kept for ``disabled``); biases train per ``config.bias``.
    ``init=False`` skips initialisation (used by ``load``, which overwrites the adapter anyway).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorafit.LoraConfig, got {type(config).__name__}")
    if isinstance(getattr(model, "lorafit_state", None), AttachState):
        raise ValueError("this model already has a lorafit adapter; merge it (lorafit.merge) or start from a fresh "
                         "base model")
    targets = select_targets(model, config, strict=init)  # all validation happens before the model is touched
    saved = modules_to_save(model, config)
    state = AttachState(config, targets, requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    if init and config.init_lora_weights in ("pissa", "olora"):  # these rewrite W0 in place, layer by layer
        for t in targets:
            if not torch.isfinite(model.get_submodule(t.name).weight).all():
                raise ConfigError(f"init_lora_weights={config.init_lora_weights!r}: {t.name}.weight contains NaN or "
                                  "inf values; a weight-based init needs a finite base model")

    # Allocate everything first (a huge rank fails here), so that a failure leaves the model as it was.
    layers = []
    for t in targets:
        try:
            layers.append(LoraLayer(model.get_submodule(t.name), t.kind, t.r, t.alpha, t.scaling,
                                    config.lora_dropout, config.use_dora))
        except (RuntimeError, MemoryError) as e:
            raise RuntimeError(f"cannot allocate the adapter of {t.name!r} (r={t.r}): {str(e).splitlines()[0]}; "
                               "the model is unchanged") from None
    copies = {name: copy.deepcopy(model.get_submodule(name)) for name in saved}  # as PEFT: originals stay frozen
    for t, layer in zip(targets, layers):
        if init:
            layer.reset_adapter(config.init_lora_weights)
        layer.train(layer.base.training)
        _set_module(model, t.name, layer)
    for name, trainable in copies.items():
        state.saved[name] = model.get_submodule(name).requires_grad_(False)
        _set_module(model, name, trainable)
    model.lorafit_state = state

    trainable = set(adapter_parameter_names(model))
    for pname, p in model.named_parameters():
        p.requires_grad_(pname in trainable)
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


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (float32 math, base dtype kept) and restore the original module
    types. modules_to_save keep their trained weights. Returns the model, free of lorafit modules."""
    state = state_of(model)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, layer in list(adapter_layers(model)):
        merged = layer.merged_weight()
        if uses[id(layer.weight)] > 1:  # tied (e.g. embeddings and lm_head): merging must not change the other user
            warnings.warn(f"{name}.weight is tied to another module; merging unties it (the other keeps W0)")
            layer.weight = nn.Parameter(merged, requires_grad=layer.weight.requires_grad)
            _untie_config(model)
        else:
            with torch.no_grad():
                layer.weight.copy_(merged)
        base = layer.base
        base.weight = layer.weight  # the (possibly moved or re-wrapped) parameters the model trained with
        if layer.bias is not None:
            base.bias = layer.bias
        _set_module(model, name, base)
    del model.lorafit_state
    for pname, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(pname, True))
    return model
