"""Save and load adapters in PEFT's on-disk format.

A folder holds ``adapter_config.json`` (PEFT's LoraConfig fields, ``peft_type: "LORA"``, target_modules as the
explicit list of adapted module names) and ``adapter_model.safetensors`` with keys

    base_model.model.<module>.lora_A.weight          (r, in)         linear and conv layers
    base_model.model.<module>.lora_B.weight          (out, r)
    base_model.model.<module>.lora_embedding_A       (r, num_emb)    embeddings
    base_model.model.<module>.lora_embedding_B       (dim, r)
    base_model.model.<module>.lora_magnitude_vector  (out,)          DoRA
    base_model.model.<module>.base_layer.bias        biases of adapted modules (bias="all" / "lora_only")
    base_model.model.<path>                          other parameters: biases, modules_to_save

This is the only module that speaks PEFT's key names; in memory the names stay as the model's own.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ConfigError, LoraConfig
from .model import adapter_layers, adapter_parameter_names, attach, state_of
from .targets import modules_to_save, select_targets
from .layers import adapter_shapes, magnitude_shape

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(ValueError):
    """A broken or mismatched adapter folder; the message names the file or key and what is wrong."""


def _lora_keys(name: str, kind: str) -> dict[str, str]:
    """PEFT keys of one adapted module's parameters, by our in-memory parameter name."""
    embedding = kind == "embedding"
    return {
        "lora_A": f"{PREFIX}{name}." + ("lora_embedding_A" if embedding else "lora_A.weight"),
        "lora_B": f"{PREFIX}{name}." + ("lora_embedding_B" if embedding else "lora_B.weight"),
        "lora_magnitude": f"{PREFIX}{name}.lora_magnitude_vector",
        "weight": f"{PREFIX}{name}.base_layer.weight",
        "bias": f"{PREFIX}{name}.base_layer.bias",
    }


def peft_key(param_name: str, layer_kinds: dict[str, str]) -> str:
    """PEFT's on-disk key for one of our parameter names."""
    owner, _, leaf = param_name.rpartition(".")
    if owner in layer_kinds:
        return _lora_keys(owner, layer_kinds[owner])[leaf]
    return PREFIX + param_name


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's key names (detached, contiguous, on the CPU)."""
    kinds = {name: layer.kind for name, layer in adapter_layers(model)}
    params = dict(model.named_parameters())
    out = {}
    for n in adapter_parameter_names(model):
        t = params[n].detach()
        if hasattr(t, "full_tensor"):  # an FSDP2 shard: gather the whole tensor (a collective on every rank)
            t = t.full_tensor()
        out[peft_key(n, kinds)] = t.to("cpu").contiguous()
    return out


def adapter_config_dict(model: nn.Module) -> dict:
    """adapter_config.json contents: PEFT's fields, with target names and per-module patterns made explicit."""
    state = state_of(model)
    cfg = state.config
    d = cfg.to_dict()
    d.update(
        peft_type="LORA", task_type=None, inference_mode=True, lora_bias=False,
        target_modules=sorted(t.name for t in state.targets),
        exclude_modules=None, layers_to_transform=None, layers_pattern=None,
        rank_pattern={t.name: t.r for t in state.targets if t.r != cfg.r},
        alpha_pattern={t.name: t.alpha for t in state.targets if t.alpha != cfg.lora_alpha},
        fan_in_fan_out=any(t.kind == "linear_t" for t in state.targets),
        # the saved factors are already trained: loading must not re-run a weight-based init on the base
        init_lora_weights=cfg.init_lora_weights if cfg.init_lora_weights in (True, False, "gaussian") else True,
        modules_to_save=sorted(state.saved) or None,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        revision=None,
    )
    return d


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux/glibc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _atomic_dir(path: Path, write) -> None:
    """Write a folder via ``write(tmpdir)`` into a temp folder beside ``path``, then swap it in by rename, so a
    crash leaves either the old folder or the new one at ``path``, never a half-written one (and, where the
    system can exchange two paths atomically, never no folder). An OSError (a full disk) names ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            if not path.is_dir():
                raise AdapterError(f"{path} exists and is not a folder; choose another output path")
            if _exchange(tmp, path):  # path now holds the new folder and tmp the old one
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "x")  # between these two renames a crash leaves the old folder in ``old``
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old / "x", path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, path) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# What writers raise when a write fails (a full disk: OSError from Python, SafetensorError from safetensors,
# RuntimeError "[enforce fail at inline_container.cc...] unexpected pos" from torch.save).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def _write_error(e: Exception, path: Path) -> OSError:
    """An OSError for a failed write that names the target and says that it was left as it was."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"os error (\d+)", str(e))):  # safetensors: "... (os error 28)"
        code = int(m.group(1))
    reason = getattr(e, "strerror", None) or str(e).strip()
    hint = "" if code else " (is the disk full?)"
    msg = f"could not write {path}: {reason}{hint}; what was there before is unchanged"
    return OSError(code, msg) if code else OSError(msg)


def save(model: nn.Module, path: Union[str, Path]) -> Path:
    """Save the adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors), atomically."""
    path = Path(path)
    tensors = adapter_state_dict(model)
    config = adapter_config_dict(model)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))

    _atomic_dir(path, write)
    return path


def write_adapter(model: nn.Module, folder: Union[str, Path], tensors: dict[str, Tensor] | None = None) -> None:
    """Write the adapter files into an existing folder (e.g. a run's output), each file replaced atomically;
    the weights go first, so a folder with a config always has its weights."""
    folder = Path(folder)
    tensors = adapter_state_dict(model) if tensors is None else tensors
    config = adapter_config_dict(model)
    for name, write in ((WEIGHTS_NAME, lambda f: save_file(tensors, str(f), metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda f: f.write_text(json.dumps(config, indent=2, sort_keys=True)))):
        tmp = folder / f".{name}.tmp"
        try:
            write(tmp)
            os.replace(tmp, folder / name)
        except WRITE_ERRORS as e:
            tmp.unlink(missing_ok=True)
            raise _write_error(e, folder / name) from e


# --- load ---------------------------------------------------------------------------------------------------

def read_adapter(path: Union[str, Path]) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read and check an adapter folder's files (not yet against a model)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist or is not a folder")
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise AdapterError(f"{path} has no {CONFIG_NAME}; is this a PEFT/lorafit adapter folder?")
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"{path} holds adapter_model.bin (pickle); lorafit reads safetensors only. Convert it "
                               "with PEFT: PeftModel.from_pretrained(base, dir).save_pretrained(dir2)")
        raise AdapterError(f"{path} has no {WEIGHTS_NAME}; the adapter weights are missing")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file} is not valid JSON ({e})") from None
    try:
        config = LoraConfig.from_dict(raw, strict=False)
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"{cfg_file}: {e}") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights} is truncated or corrupt ({e}); save the adapter again") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{weights}: tensor {key!r} has dtype {t.dtype}; adapter weights must be floating point")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{weights}: tensor {key!r} contains NaN or inf values; the adapter is unusable")
    return config, tensors


def _expected_shapes(model: nn.Module, config: LoraConfig) -> tuple[dict[str, tuple], set[str], dict[str, str]]:
    """For the model and config: {PEFT key: shape} of everything a file may hold, the keys it must hold, and
    {PEFT key: our parameter name} for keys that overwrite existing model parameters."""
    targets = select_targets(model, config, strict=False)
    shapes, required, existing = {}, set(), {}
    target_names = {t.name: t for t in targets}
    for t in targets:
        module = model.get_submodule(t.name)
        keys = _lora_keys(t.name, t.kind)
        a, b = adapter_shapes(module, t.kind, t.r)
        shapes[keys["lora_A"]], shapes[keys["lora_B"]] = a, b
        required |= {keys["lora_A"], keys["lora_B"]}
        if config.use_dora:
            shapes[keys["lora_magnitude"]] = magnitude_shape(module, t.kind)
            required.add(keys["lora_magnitude"])
    for pname, p in model.named_parameters(remove_duplicate=False):  # tied weights under every name
        owner, _, leaf = pname.rpartition(".")
        key = _lora_keys(owner, target_names[owner].kind)[leaf] if owner in target_names else PREFIX + pname
        shapes[key], existing[key] = tuple(p.shape), pname
    for name in modules_to_save(model, config):  # trained in full: a file without them would load untrained copies
        required |= {f"{PREFIX}{name}.{pname}" for pname, _ in model.get_submodule(name).named_parameters()}
    return shapes, required, existing


def load(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Attach the adapter saved at ``path`` (by lorafit or PEFT) to ``model`` in place and return it.

    Every key and shape is checked against the model before anything changes; on a mismatch one AdapterError
    names the key and both shapes and the model is untouched. The adapter is trainable, as after ``attach``.
    """
    config, tensors = read_adapter(path)
    try:
        shapes, required, existing = _expected_shapes(model, config)
    except ConfigError as e:
        raise AdapterError(f"adapter {path} does not fit this model: {e}") from None
    for key, t in tensors.items():
        if key not in shapes:
            raise AdapterError(f"adapter {path}: key {key!r} names a module or parameter this model does not have "
                               "(an adapter for another model, or a config that contradicts the weights?)")
        if tuple(t.shape) != shapes[key]:
            raise AdapterError(f"adapter {path}: key {key!r} has shape {tuple(t.shape)} but the model expects "
                               f"{shapes[key]} (an adapter for another model, or a config whose r disagrees?)")
    missing = sorted(required - tensors.keys())
    if missing:
        raise AdapterError(f"adapter {path}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")

    attach(model, config, init=False)
    kinds = {name: layer.kind for name, layer in adapter_layers(model)}
    by_key = {peft_key(n, kinds): p for n, p in model.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for key, t in tensors.items():
            by_key[key].copy_(t)  # copy_ casts to the parameter's dtype and device
    return model
