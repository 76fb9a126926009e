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

Several adapters are saved as PEFT's ``save_pretrained`` saves them: the one named "default" in the folder itself,
every other one in a subfolder named after it, each with the same two files and keys without the adapter's name.

This is the only module that speaks PEFT's key names; in memory the names stay as the model's own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import AdapterError, ConfigError
from .experts import ParamLayer, layer_name, param_dims
from .files import atomic_dir, read_json, replace_file
from .layers import adapter_shapes, magnitude_shape
from .lora_config import LoraConfig
from .model import DEFAULT, adapter_layers, adapter_parameter_names, attach, check_new, state_of
from .targets import Target, modules_to_save, select_targets

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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


def peft_key(param_name: str, layer_files: dict[str, tuple[str, str]]) -> str:
    """PEFT's on-disk key for one of our parameter names (an adapter's ``<layer>.adapters.<name>.lora_A`` loses its
    adapter name, as in PEFT's files); ``layer_files``: ``layer_files(model, name)``."""
    owner, _, leaf = param_name.rpartition(".")
    layer = owner.rpartition(".adapters.")[0] if ".adapters." in owner else owner
    if layer in layer_files and (layer != owner or leaf in ("weight", "bias")):
        path, kind = layer_files[layer]
        return _lora_keys(path, kind)[leaf]
    return PREFIX + param_name


def param_paths(model: nn.Module, targets: list[Target]) -> dict[str, str]:
    """{target parameter name: its module's path in PEFT's files}. PEFT wraps a module once per targeted parameter,
    in the order the module registers them, the last outermost, so each earlier one sits one ``base_layer`` deeper:
    Qwen3-MoE's gate_up_proj is ``experts.base_layer.lora_A``, its down_proj ``experts.lora_A``."""
    by_owner: dict[str, list[str]] = {}
    for t in targets:
        if t.kind == "param":
            owner, _, leaf = t.name.rpartition(".")
            by_owner.setdefault(owner, []).append(leaf)
    paths = {}
    for owner, leaves in by_owner.items():
        order = [n for n, _ in model.get_submodule(owner).named_parameters(recurse=False)]
        leaves = sorted(leaves, key=order.index)
        for i, leaf in enumerate(leaves):
            paths[f"{owner}.{leaf}"] = owner + ".base_layer" * (len(leaves) - 1 - i)
    return paths


def layer_files(model: nn.Module, name: str | None = None) -> dict[str, tuple[str, str]]:
    """{layer name: (its module path in PEFT's files, kind)} as adapter ``name`` (default: the active one) saves."""
    files = {n: (n, layer.kind) for n, layer in adapter_layers(model) if not isinstance(layer, ParamLayer)}
    state = state_of(model)
    for pname, path in param_paths(model, state.adapters[state.name(name)].targets).items():
        owner, _, leaf = pname.rpartition(".")
        files[f"{owner}.{layer_name(leaf)}"] = (path, "param")
    return files


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """{PEFT key: parameter} of everything one adapter (default: the active one) trains and saves."""
    name = state_of(model).name(name)
    files = layer_files(model, name)
    params = dict(model.named_parameters())
    return {peft_key(n, files): params[n] for n in adapter_parameter_names(model, [name])}


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """One adapter's tensors (default: the active one) under PEFT's key names (detached, contiguous, on the CPU)."""
    out = {}
    for key, p in adapter_parameters(model, name).items():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # an FSDP2 shard: gather the whole tensor (a collective on every rank)
            t = t.full_tensor()
        out[key] = t.to("cpu").contiguous()
    return out


def adapter_config_dict(model: nn.Module, name: str | None = None) -> dict:
    """adapter_config.json contents: PEFT's fields, with target names and per-module patterns made explicit."""
    state = state_of(model)
    info = state.adapters[state.name(name)]
    cfg, targets = info.config, info.targets
    d = cfg.to_dict()
    d.update(
        peft_type="LORA", task_type=None, inference_mode=True, lora_bias=False,
        target_modules=sorted(t.name for t in targets if t.kind != "param"),
        target_parameters=sorted(t.name for t in targets if t.kind == "param") or None,
        exclude_modules=None, layers_to_transform=None, layers_pattern=None,
        rank_pattern={t.name: t.r for t in targets if t.r != cfg.r},
        alpha_pattern={t.name: t.alpha for t in targets if t.alpha != cfg.lora_alpha},
        fan_in_fan_out=any(t.kind == "linear_t" for t in targets),
        # the saved factors are already trained: loading must not re-run a weight-based init on the base
        init_lora_weights=cfg.init_lora_weights if cfg.init_lora_weights in (True, False, "gaussian") else True,
        modules_to_save=sorted(state.saved) or None,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        revision=None,
    )
    return d


def save(model: nn.Module, path: Union[str, Path], *, names: list[str] | None = None) -> Path:
    """Save adapters (default: all) in PEFT's layout, atomically: "default" in ``path`` itself (adapter_config.json +
    adapter_model.safetensors), every other adapter in ``path/<name>/``."""
    path = Path(path)
    state = state_of(model)
    names = list(state.adapters) if names is None else [names] if isinstance(names, str) else list(names)
    for n in names:
        state.name(n)
    files = {n: (adapter_state_dict(model, n), adapter_config_dict(model, n)) for n in names}

    def write(tmp: Path) -> None:
        for n, (tensors, config) in files.items():
            folder = tmp if n == DEFAULT else tmp / n
            folder.mkdir(exist_ok=True)
            write_adapter_files(folder, tensors, config)

    return atomic_dir(path, write)


def write_adapter_files(folder: Path, tensors: dict[str, Tensor], config: dict) -> None:
    """The two files of an adapter folder, written plainly into ``folder`` (a temporary folder being filled)."""
    _write_weights(folder / WEIGHTS_NAME, tensors)
    _write_config(folder / CONFIG_NAME, config)


def _write_weights(file: Path, tensors: dict[str, Tensor]) -> None:
    save_file(tensors, str(file), metadata={"format": "pt"})


def _write_config(file: Path, config: dict) -> None:
    file.write_text(json.dumps(config, indent=2, sort_keys=True))


def write_adapter(model: nn.Module, folder: Union[str, Path], tensors: dict[str, Tensor] | None = None) -> None:
    """Write the (active) adapter's files into an existing folder (e.g. a run's output), each file replaced
    atomically; the weights go first, so a folder with a config always has its weights."""
    folder = Path(folder)
    tensors = adapter_state_dict(model) if tensors is None else tensors
    config = adapter_config_dict(model)
    replace_file(folder / WEIGHTS_NAME, lambda f: _write_weights(f, tensors))
    replace_file(folder / CONFIG_NAME, lambda f: _write_config(f, config))


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
    raw = read_json(cfg_file, error=AdapterError)
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


def transformers_tensors(path: Union[str, Path]) -> dict[str, Tensor]:
    """An adapter folder's tensors (``read_adapter``'s checks) keyed for transformers 5's
    ``PreTrainedModel.load_adapter(path, adapter_state_dict=...)``: PEFT's file keys, DoRA magnitudes as
    ``lora_magnitude_vector.weight``.

    PEFT writes a magnitude as ``<module>.lora_magnitude_vector`` and its own loader adds back the ``.weight`` of the
    module holding it; the renaming transformers' ``load_adapter`` uses (PEFT's ``build_peft_weight_mapping``, PEFT
    0.21.2 with transformers 5.24) inserts the adapter name only, so a file's magnitudes match nothing and stay at
    their init, silently. With ``.weight`` on the key that renaming gives the module's own name.
    """
    _, tensors = read_adapter(path)
    return {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: t for k, t in tensors.items()}


_FACTOR_SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                    (".lora_embedding_B", "B"), (".lora_magnitude_vector", "m"))
_PARTS = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude"}


class FileKey(NamedTuple):
    """A key of an adapter file, split: the in-model name of the module it belongs to and which tensor it is."""

    module: str
    part: str  # "A", "B" (LoRA factors), "m" (DoRA magnitude), "bias" (a trained bias), else the parameter's leaf
    embedding: bool = False  # an embedding's factor (lora_embedding_A/B: A (r, num_emb), B (dim, r))


def split_key(key: str) -> FileKey:
    """The module and part of a PEFT file key, e.g. "base_model.model.x.q_proj.lora_A.weight" -> ("x.q_proj",
    "A"); a bias of an adapted module (``base_layer.bias``, PEFT's ``lora_B.bias``) or of any other -> (module,
    "bias"); modules_to_save and other parameters -> (module, leaf)."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix, part in _FACTOR_SUFFIXES:
        if name.endswith(suffix):
            return FileKey(name[: -len(suffix)], part, "embedding" in suffix)
    if name.endswith(".bias"):
        return FileKey(name[: -len(".bias")].removesuffix(".base_layer").removesuffix(".lora_B"), "bias")
    module, _, leaf = name.rpartition(".")
    return FileKey(module, leaf)


def factor_key(module: str, part: str, *, embedding: bool = False) -> str:
    """The PEFT file key of a module's factor ``part`` ("A", "B" or "m"); ``split_key``'s inverse."""
    return _lora_keys(module, "embedding" if embedding else "linear")[_PARTS[part]]


def read_factors(path: Union[str, Path]) -> tuple[LoraConfig, dict[str, dict]]:
    """An adapter folder's config and, per adapted module (by its in-model name), ``{"kind": "linear" |
    "embedding", "A": (r, in), "B": (out, r)[, "m": (out,)]}``; modules without both factors are left out."""
    cfg, tensors = read_adapter(path)
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        k = split_key(key)
        if k.part in _PARTS:
            entry = modules.setdefault(k.module, {"kind": "linear"})
            entry[k.part] = t
            if k.embedding:
                entry["kind"] = "embedding"
    return cfg, {name: f for name, f in modules.items() if "A" in f and "B" in f}


def _expected_shapes(model: nn.Module, config: LoraConfig) -> tuple[dict[str, tuple], set[str], dict[str, str]]:
    """For the model and config: {PEFT key: shape} of everything a file may hold, the keys it must hold, and
    {PEFT key: our parameter name} for keys that overwrite existing model parameters (never other adapters')."""
    targets = select_targets(model, config, strict=False)
    shapes, required, existing = {}, set(), {}
    target_names = {t.name: t for t in targets if t.kind != "param"}
    paths = param_paths(model, targets)
    for t in targets:
        if t.kind == "param":
            e, n_in, n_out = param_dims(model.get_parameter(t.name), _transposed(model, t.name))
            keys = _lora_keys(paths[t.name], t.kind)
            shapes[keys["lora_A"]], shapes[keys["lora_B"]] = (t.r * e, n_in), (n_out, t.r * e)
            required |= {keys["lora_A"], keys["lora_B"]}
            continue
        module = model.get_submodule(t.name)
        keys = _lora_keys(t.name, t.kind)
        a, b = adapter_shapes(module, t.kind, t.r)
        shapes[keys["lora_A"]], shapes[keys["lora_B"]] = a, b
        required |= {keys["lora_A"], keys["lora_B"]}
        if config.use_dora:
            shapes[keys["lora_magnitude"]] = magnitude_shape(module, t.kind)
            required.add(keys["lora_magnitude"])
    for pname, p in model.named_parameters(remove_duplicate=False):  # tied weights under every name
        if ".adapters." in pname:
            continue
        owner, _, leaf = pname.rpartition(".")
        key = _lora_keys(owner, target_names[owner].kind)[leaf] if owner in target_names else PREFIX + pname
        shapes[key], existing[key] = tuple(p.shape), pname
    for name in modules_to_save(model, config):  # trained in full: a file without them would load untrained copies
        required |= {f"{PREFIX}{name}.{pname}" for pname, _ in model.get_submodule(name).named_parameters()}
    return shapes, required, existing


def _transposed(model: nn.Module, param_name: str) -> bool:
    return bool(getattr(model.get_submodule(param_name.rpartition(".")[0]), "is_transposed", False))


def _check_fits(model: nn.Module, path: Path, config: LoraConfig, tensors: dict[str, Tensor]) -> None:
    """Every key and shape of a read adapter against the model; one AdapterError naming the first misfit."""
    try:
        shapes, required, _ = _expected_shapes(model, config)
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


def adapter_folders(path: Union[str, Path], name: str | None = None) -> list[tuple[str, Path]]:
    """(adapter name, folder) in a saved folder: PEFT's layout ("default" at the root, others in subfolders named
    after them; ``checkpoint-N`` subfolders, a trainer's checkpoints, are not adapters). With ``name``: the root's
    adapter under that name, or else the subfolder ``name``."""
    path = Path(path)
    if not path.is_dir():
        return [(name or DEFAULT, path)]  # read_adapter says what is wrong
    root = [(name or DEFAULT, path)] if (path / CONFIG_NAME).is_file() else []
    if name is not None:
        if not root and (path / name / CONFIG_NAME).is_file():
            return [(name, path / name)]
        return root or [(name, path)]  # read_adapter names what is missing
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()
                  and not re.fullmatch(r"checkpoint-\d+", p.name))  # a Trainer's checkpoints beside its adapter
    return (root + [(p.name, p) for p in subs]) or [(DEFAULT, path)]


def load(model: nn.Module, path: Union[str, Path], *, name: str | None = None, replace: bool = False) -> nn.Module:
    """Attach the adapter(s) saved at ``path`` (by lorafit or PEFT) to ``model`` in place and return it.

    A single-adapter folder becomes adapter ``name`` ("default" unless named); a PEFT multi-adapter folder
    (``save_pretrained`` with several adapters) brings all of its adapters under their names. As with ``attach``,
    the first adapter of a model is active and trainable, later ones are added inactive. ``replace=True`` copies the
    weights into the existing adapter ``name`` instead (a hot swap, see ``swap``). Every folder, key and shape is
    checked against the model before anything changes; on a misfit one AdapterError names the folder, the key and
    both shapes, and the model is untouched.
    """
    entries = adapter_folders(path, name)
    read = []
    for n, folder in entries:
        try:
            config, tensors = read_adapter(folder)
            if not replace:
                _check_fits(model, folder, config, tensors)
        except AdapterError as e:
            sub = f" (subfolder {n!r} of {path})" if len(entries) > 1 else ""
            raise AdapterError(f"{e}{sub}; nothing was loaded") from None
        read.append((n, folder, config, tensors))
    if replace:
        if len(read) != 1:
            raise AdapterError(f"replace=True swaps one adapter, but {path} holds {len(read)}; pass name=")
        n, folder, config, tensors = read[0]
        return swap(model, folder, config, tensors, name=n)
    check_new(model, [(n, c) for n, _, c, _ in read])
    for n, _, config, tensors in read:
        attach(model, config, name=n, init=False)
        _copy_in(model, n, tensors)
    return model


def _copy_in(model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    files = layer_files(model, name)
    mine = set(adapter_parameter_names(model, [name]))
    by_key = {peft_key(n, files): p for n, p in model.named_parameters(remove_duplicate=False)
              if ".adapters." not in n or n in mine}
    with torch.no_grad():
        for key, t in tensors.items():
            by_key[key].copy_(t)  # copy_ casts to the parameter's dtype and device


def swap(model: nn.Module, path: Path, config: LoraConfig, tensors: dict[str, Tensor], *, name: str) -> nn.Module:
    """Hot swap: copy a saved adapter into the tensors already allocated for adapter ``name``.

    Nothing is reallocated and no Python attribute changes, so a ``torch.compile``d model does not recompile. The
    new adapter must target the same modules with the same variant; a smaller rank is zero-padded up to the
    allocated one, and its scale s' is folded into B (B·s'/s), so the layer keeps its s. The adapter is then the
    same function as the file's, written out (``save``) at the allocated rank and alpha.
    """
    state = state_of(model)
    if name not in state.adapters:
        raise AdapterError(f"replace=True: no adapter named {name!r} to swap into; this model has "
                           f"{list(state.adapters)}")
    info = state.adapters[name]
    if config.target_parameters or info.config.target_parameters:
        raise AdapterError(f"replace=True swaps adapters of modules; adapter {path} or {name!r} targets parameters "
                           "(target_parameters): load it under a new name instead")
    if config.modules_to_save or info.config.modules_to_save:
        raise AdapterError(f"replace=True swaps LoRA factors only; adapter {path} or {name!r} has modules_to_save")
    if config.use_dora != info.config.use_dora:
        raise AdapterError(f"replace=True: adapter {path} has use_dora={config.use_dora} but {name!r} has "
                           f"use_dora={info.config.use_dora}; the tensors cannot be reused")
    try:
        new = {t.name: t for t in select_targets(model, config, strict=False)}
    except ConfigError as e:
        raise AdapterError(f"adapter {path} does not fit this model: {e}") from None
    old = {t.name: t for t in info.targets}
    if new.keys() != old.keys():
        diff = sorted(new.keys() ^ old.keys())
        raise AdapterError(f"replace=True: adapter {path} targets other modules than {name!r} (they differ in "
                           f"{len(diff)}, e.g. {diff[:3]}); load it under a new name instead")
    for t in new.values():
        if t.r > old[t.name].r:
            raise AdapterError(f"replace=True: adapter {path} has rank {t.r} at {t.name!r}, larger than the "
                               f"allocated rank {old[t.name].r} of {name!r}; load it under a new name instead")
    layers = dict(adapter_layers(model))
    factors = {}
    for tname, t in new.items():  # read and check everything first
        keys = _lora_keys(tname, t.kind)
        module = layers[tname]
        a_shape, b_shape = adapter_shapes(module.base, t.kind, t.r)
        got = {part: tensors.get(keys[part]) for part in ("lora_A", "lora_B", "lora_magnitude")}
        for part, shape in (("lora_A", a_shape), ("lora_B", b_shape)) + \
                ((("lora_magnitude", magnitude_shape(module.base, t.kind)),) if config.use_dora else ()):
            if got[part] is None or tuple(got[part].shape) != tuple(shape):
                have = None if got[part] is None else tuple(got[part].shape)
                raise AdapterError(f"adapter {path}: key {keys[part]!r} has shape {have} but the model expects "
                                   f"{tuple(shape)}; nothing was swapped")
        factors[tname] = got
    with torch.no_grad():
        for tname, got in factors.items():
            ad = layers[tname].adapters[name]
            r = new[tname].r
            ad.lora_A.zero_()[:r].copy_(got["lora_A"])
            ad.lora_B.zero_()[:, :r].copy_(got["lora_B"].double() * (new[tname].scaling / ad.scaling))
            if ad.lora_magnitude is not None:
                ad.lora_magnitude.copy_(got["lora_magnitude"])
    return model
