"""Train a lorafit adapter with transformers' ``Trainer`` or any subclass of it (TRL's ``SFTTrainer``, ``DPOTrainer``,
...): checkpoints and ``save_model`` hold the adapter in PEFT's layout instead of the full model, and
``resume_from_checkpoint`` / ``load_best_model_at_end`` copy it back.

    model = lorafit.attach(AutoModelForCausalLM.from_pretrained(base), lorafit.LoraConfig(r=16, lora_alpha=32))
    trainer = adapter_checkpoints(SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds))
    trainer.train()            # checkpoint-N/: adapter_config.json, adapter_model.safetensors, optimizer.pt,
                               # scheduler.pt, rng_state.pth, trainer_state.json, training_args.bin, tokenizer
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model()       # the adapter (+ tokenizer, training_args.bin) in args.output_dir

    hf_model.load_adapter(folder)                    # transformers' PEFT integration: LoRA, RSLoRA, patterns
    load_adapter(hf_model, folder)                   # the same, DoRA included (see ``load_adapter``)

Why a function on the trainer and not a callback: Trainer writes the weights in ``_save`` (called by ``save_model``
and so by every checkpoint) and reads them in ``_load_from_checkpoint`` (resume) and ``_load_best_model``; the only
model it saves and loads as an adapter there is a ``peft.PeftModel`` (``_is_peft_model``). A callback sees none of
this: ``on_save`` runs after the full weights are written, and a resume from an adapter-only folder fails (no
``model.safetensors``, no index) before any callback runs. So ``adapter_checkpoints`` replaces these three methods on
the one trainer object it is given; each falls back to the class's own when the model has no lorafit adapter
(e.g. after ``lorafit.merge``). transformers is never imported here at module level.

Tested on one process (CPU/GPU) and meant for DDP, where ``trainer.model`` is the user's model; DeepSpeed ZeRO-3 and
FSDP keep parameters sharded, which ``restore_adapter`` does not scatter back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .errors import AdapterError
from .lora_config import LoraConfig
from .model import has_adapter, state_of
from .peft_format import (
    adapter_config_dict,
    adapter_parameters,
    adapter_state_dict,
    read_adapter,
    transformers_tensors,
    write_adapter,
)

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME


def adapter_checkpoints(trainer):
    """Make ``trainer`` (a ``transformers.Trainer`` or subclass, built on a model with a lorafit adapter) save and
    load the active adapter instead of the full model; returns the same trainer. Calling it twice is harmless."""
    if getattr(trainer, "_lorafit_adapter_checkpoints", False):
        return trainer
    cls = type(trainer)

    def _save(output_dir=None, state_dict=None):  # state_dict: a gathered full one (DeepSpeed/FSDP); unused here
        if not has_adapter(_unwrapped(trainer, trainer.model)):
            return cls._save(trainer, output_dir, state_dict)
        save_adapter(trainer, output_dir)

    def _load_from_checkpoint(resume_from_checkpoint, model=None):
        model = _unwrapped(trainer, trainer.model if model is None else model)
        if not has_adapter(model):
            return cls._load_from_checkpoint(trainer, resume_from_checkpoint, model)
        restore_adapter(model, resume_from_checkpoint)

    def _load_best_model():
        model = _unwrapped(trainer, trainer.model)
        if not has_adapter(model):
            return cls._load_best_model(trainer)
        restore_adapter(model, trainer.state.best_model_checkpoint)

    trainer._save = _save
    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer._load_best_model = _load_best_model
    trainer._lorafit_adapter_checkpoints = True
    return trainer


def _unwrapped(trainer, model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers (where the lorafit state lives)."""
    return trainer.accelerator.unwrap_model(model, keep_torch_compile=False)


def save_adapter(trainer, output_dir: Union[str, Path, None] = None) -> None:
    """What ``Trainer._save`` writes, with the active adapter (PEFT layout) in place of the model's weights: the
    adapter files, the tokenizer / processor, and ``training_args.bin``. Every rank gathers the tensors (a
    collective under FSDP2); only the saving rank writes."""
    folder = Path(output_dir if output_dir is not None else trainer.args.output_dir)
    model = _unwrapped(trainer, trainer.model)
    tensors = adapter_state_dict(model)
    if not trainer.args.should_save:
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_adapter(model, folder, tensors)
    processor = trainer.processing_class  # a tokenizer's truth value is its length: test for None
    if processor is None:
        processor = getattr(trainer.data_collator, "tokenizer", None)
    if processor is not None:
        processor.save_pretrained(folder)
    torch.save(trainer.args, folder / TRAINING_ARGS_NAME)


def restore_adapter(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Copy the adapter saved in ``folder`` into the model's active adapter, in place, and return the model.

    The parameters stay the same objects, so an optimizer built on them keeps them (Trainer builds its optimizer
    after loading a checkpoint, but a user's may already exist). The folder must hold exactly what ``save_adapter``
    writes for this adapter: the same config (targets, ranks, alphas, variant) and every key with its shape;
    otherwise an AdapterError names the difference and the model is unchanged.
    """
    config, tensors = read_adapter(folder)
    name = state_of(model).name()
    mine = LoraConfig.from_dict(json.loads(json.dumps(adapter_config_dict(model, name))), strict=False)
    if config != mine:
        fields = [f for f, v in mine.to_dict().items() if config.to_dict()[f] != v]
        raise AdapterError(f"checkpoint {folder} holds an adapter with another config than the model's adapter "
                           f"{name!r} (they differ in {', '.join(fields)}); attach the config it was trained with")
    by_key = adapter_parameters(model, name)
    if by_key.keys() != tensors.keys():
        diff = sorted(by_key.keys() ^ tensors.keys())
        raise AdapterError(f"checkpoint {folder} and the model's adapter {name!r} differ in {len(diff)} tensor(s), "
                           f"e.g. {diff[0]!r}")
    for key, p in by_key.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise AdapterError(f"checkpoint {folder}: {key!r} has shape {tuple(tensors[key].shape)} but the model's "
                               f"adapter has {tuple(p.shape)}")
    with torch.no_grad():
        for key, p in by_key.items():
            p.copy_(tensors[key])  # casts to the parameter's dtype and device
    return model


def load_adapter(model: nn.Module, folder: Union[str, Path], *, adapter_name: str | None = None, **kwargs):
    """``model.load_adapter(folder)`` (a transformers ``PreTrainedModel``, through its PEFT integration) for any
    lorafit or PEFT adapter folder, DoRA included: the file's tensors are passed as ``adapter_state_dict`` with the
    magnitude keys that transformers 5's renaming maps correctly (``peft_format.transformers_tensors``); a plain
    ``load_adapter`` leaves DoRA magnitudes at their init. Returns transformers' loading info; AdapterError when a
    key of the file is left unloaded or a model parameter of the adapter is left missing.
    """
    info = model.load_adapter(str(folder), adapter_name=adapter_name, adapter_state_dict=transformers_tensors(folder),
                              **kwargs)
    missing = sorted(getattr(info, "missing_keys", ()))
    unexpected = sorted(getattr(info, "unexpected_keys", ()))
    if missing or unexpected:
        raise AdapterError(f"transformers' load_adapter left {folder} partly unloaded: missing "
                           f"{missing[:3] or 'none'}, unexpected {unexpected[:3] or 'none'}")
    return info
