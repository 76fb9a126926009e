"""Export an adapter for inference engines, and say what each engine cannot load.

Two targets, each applying a plain ``h = W0·x + s·B·A·x`` with one scale rule of its own:

- llama.cpp reads a GGUF LoRA file (``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``)
  and scales every module by ``alpha / r`` with r taken from that module's tensor shape (``llama-adapter.h``,
  ``get_scale``). lorafit's scale ``s`` (RSLoRA's ``alpha / sqrt(r)``, per-module ``alpha_pattern`` /
  ``rank_pattern``) is folded into B: ``B' = B·s·r/alpha``, so ``(alpha/r)·B'·A = s·B·A``. llama.cpp's own
  ``convert_lora_to_gguf.py`` writes the config's alpha and ignores ``use_rslora`` and the patterns.
- vLLM reads the PEFT folder and scales every module by the config's one ``alpha / r``: the copy written here has
  ``r = max rank``, no patterns, no RSLoRA, and B folded the same way.

GGUF tensors (llama family; the HF checkpoint converter ``convert_hf_to_gguf.py`` names the base tensors so):

    model.embed_tokens              token_embd.weight.lora_a  A.T (vocab, r)   lora_b  B (dim, r)
    model.layers.N.self_attn.q_proj blk.N.attn_q.weight.lora_a    A (r, in)    lora_b  B (out, r)   rows permuted
    ...k_proj / v_proj / o_proj     blk.N.attn_k / attn_v / attn_output        (k rows permuted)
    ...mlp.gate_proj / up / down    blk.N.ffn_gate / ffn_up / ffn_down
    lm_head                         output.weight  (untied models only)

(shapes in numpy/PyTorch order; GGUF stores the dimensions reversed, so ``lora_a`` has ``ne = [in, r]``, which is
what llama.cpp checks against the base tensor's ``ne = [in, out]``.)

Rotary permutation: HF Llama rotates the two halves of each head (``rotate_half``), llama.cpp's LLAMA rope rotates
adjacent pairs, so ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders the rows of q_proj (per attention
head) and k_proj (per key/value head). W0's rows moved, so B's rows (and ΔW = B·A's) must move the same way. Qwen2
uses the halves layout in llama.cpp too (NEOX rope) and is not permuted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from torch import Tensor

from .errors import AdapterError, DataError
from .files import read_json, replace_file, writing_dir
from .lora_config import LoraConfig
from .ops import scaling
from .peft_format import CONFIG_NAME, factor_key, read_adapter, split_key, write_adapter_files
from .targets import pattern_key

TARGETS = ("peft", "transformers", "vllm", "llama.cpp")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank

# transformers architecture -> (GGUF general.architecture, whether llama.cpp's converter permutes q/k rows)
LLAMA_FAMILY = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                "Qwen2ForCausalLM": ("qwen2", False)}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_BLOCK_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(" + "|".join(re.escape(k) for k in _BLOCK_TENSORS) + ")")


@dataclass(frozen=True)
class Module:
    """One adapted module as saved: ΔW = scaling·B·A (embeddings: ΔW = scaling·(B·A).T, PEFT's layout)."""

    name: str
    kind: str  # "linear" | "embedding" | "conv"
    A: Tensor  # (r, in) or (r, num_embeddings)
    B: Tensor  # (out, r) or (dim, r)
    alpha: float
    scaling: float

    @property
    def r(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class Adapter:
    """An adapter folder read for export: its config (parsed and raw), its modules, and every other tensor."""

    path: Path
    config: LoraConfig
    raw: dict
    modules: list[Module]
    other: dict[str, Tensor]  # magnitudes, biases, modules_to_save: {PEFT key: tensor}


def read(path: Union[str, Path]) -> Adapter:
    """Read an adapter folder (``peft_format.read_adapter``'s checks; AdapterError when broken) with per-module scales
    ``s = alpha / r`` or ``alpha / sqrt(r)`` (RSLoRA), alpha from ``alpha_pattern`` and r from the tensors."""
    path = Path(path)
    cfg, tensors = read_adapter(path)
    raw = read_json(path / CONFIG_NAME, error=AdapterError)
    parts: dict[str, dict] = {}
    other = {}
    for key, t in tensors.items():
        k = split_key(key)
        if k.part not in ("A", "B"):
            other[key] = t
            continue
        parts.setdefault(k.module, {})[k.part] = t
        parts[k.module]["kind"] = "embedding" if k.embedding else "conv" if t.dim() > 2 else "linear"
    modules = []
    for name, p in sorted(parts.items(), key=lambda kv: _module_order(kv[0])):
        if "A" not in p or "B" not in p:
            raise AdapterError(f"adapter {path}: module {name!r} has lora_{'A' if 'A' in p else 'B'} but not "
                               f"lora_{'B' if 'A' in p else 'A'}; the adapter is incomplete")
        alpha = cfg.alpha_pattern[k] if (k := pattern_key(cfg.alpha_pattern, name)) is not None else cfg.lora_alpha
        r = p["A"].shape[0]
        modules.append(Module(name, p["kind"], p["A"], p["B"], alpha, scaling(r, alpha, cfg.use_rslora)))
    return Adapter(path, cfg, raw, modules, other)


def _module_order(name: str) -> tuple:
    """Sort key: layer index numerically (model.layers.10 after model.layers.9), then the name."""
    return tuple(int(p) if p.isdigit() else -1 for p in name.split(".")), name


# --- what a target cannot load --------------------------------------------------------------------------------

def _other_reasons(ad: Adapter, engine: str) -> list[str]:
    """DoRA magnitudes, trained biases and modules_to_save, which a plain-LoRA engine drops (one line each)."""
    lines = []
    keys = [split_key(key) for key in sorted(ad.other)]
    for k in keys:
        if k.part == "m":
            lines.append(f"module {k.module}: DoRA magnitude (use_dora=True); "
                         f"{engine} applies plain LoRA only (merge the adapter instead: lorafit merge)")
        elif k.part == "bias":
            lines.append(f"module {k.module}: trained bias (bias={ad.config.bias!r}, lora_bias="
                         f"{bool(ad.raw.get('lora_bias'))}); {engine} adds B·A only")
        else:
            lines.append(f"module {k.module}: modules_to_save (a fully trained copy of "
                         f"{k.module}.{k.part}); {engine} loads LoRA factors only")
    if ad.config.use_dora and not any(k.part == "m" for k in keys):
        lines.append(f"adapter_config.json: use_dora=True; {engine} applies plain LoRA only")
    if ad.config.bias != "none" and not any(k.part == "bias" for k in keys):
        lines.append(f"adapter_config.json: bias={ad.config.bias!r}; {engine} adds B·A only")
    if ad.config.modules_to_save and not any("modules_to_save" in line for line in lines):
        lines.append(f"adapter_config.json: modules_to_save={ad.config.modules_to_save}; {engine} loads LoRA "
                     "factors only")
    if ad.config.target_parameters:
        names = ad.config.target_parameters
        lines.append(f"adapter_config.json: target_parameters ({len(names)} expert weights, e.g. {names[0]}): LoRA on "
                     f"fused mixture-of-experts weights, which lorafit neither exports nor has verified {engine} to "
                     "load; merge the adapter (lorafit merge) and serve the merged model")
    if ad.config.init_lora_weights in ("pissa", "olora"):
        lines.append(f"adapter_config.json: init_lora_weights={ad.config.init_lora_weights!r} trains against a "
                     f"residual base W0 - B0·A0 that {engine} does not build; convert it with PEFT's "
                     "save_pretrained(..., path_initial_model_for_weight_conversion=...) first")
    return lines


def _module_factors(ad: Adapter) -> list:
    """The adapter's factor pairs of modules: those of target_parameters (said once, by ``_other_reasons``) left
    out. PEFT files them under their module, one ``base_layer`` deeper per later parameter."""
    owners = {n.rpartition(".")[0] for n in ad.config.target_parameters or ()} \
        if isinstance(ad.config.target_parameters, list) else set()
    return [m for m in ad.modules if re.sub(r"(\.base_layer)+$", "", m.name) not in owners]


def _vllm_reasons(ad: Adapter, max_lora_rank: int) -> list[str]:
    lines = _other_reasons(ad, "vLLM")
    for m in _module_factors(ad):
        if m.kind != "linear":
            lines.append(f"module {m.name}: a LoRA on an {'embedding' if m.kind == 'embedding' else 'convolution'}"
                         "; vLLM adapts linear layers only")
        elif m.r > max_lora_rank:
            lines.append(f"module {m.name}: rank {m.r} is above --max-lora-rank {max_lora_rank} (start vLLM with "
                         f"--max-lora-rank {_vllm_rank(m.r)} and pass the same here)")
    return lines


def _vllm_rank(r: int) -> int:
    """The smallest of vLLM's allowed --max-lora-rank values (8, 16, 32, 64, ...) that holds rank r."""
    return max(8, 2 ** math.ceil(math.log2(r)))


def _gguf_name(name: str) -> str | None:
    """llama.cpp's base tensor name for a llama-family module, or None if it has none."""
    if name == "model.embed_tokens":
        return "token_embd.weight"
    if name == "lm_head":
        return "output.weight"
    m = _BLOCK_RE.fullmatch(name)
    return f"blk.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.weight" if m else None


def read_model_config(model: Union[str, Path]) -> tuple[dict, str]:
    """A model folder's config.json and its architecture name; DataError when missing, broken or unsupported."""
    hf = read_json(Path(model) / "config.json", error=DataError, what="; pass the base model's transformers folder")
    arch = (hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), str(hf.get("model_type")))])[0]
    if arch not in LLAMA_FAMILY:
        raise DataError(f"--model {model} is a {arch}; the llama.cpp export supports the llama family only: "
                        f"{', '.join(LLAMA_FAMILY)} (SmolLM2 is a LlamaForCausalLM)")
    return hf, arch


def _weight_shape(hf: dict, name: str) -> tuple[int, int] | None:
    """(out, in) of a llama-family module's weight from config.json (embeddings: (vocab, dim)), None if absent."""
    d, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head = hf.get("head_dim") or d // n_head
    n_kv = hf.get("num_key_value_heads") or n_head
    inter, vocab = hf["intermediate_size"], hf["vocab_size"]
    if name in ("model.embed_tokens", "lm_head"):
        return vocab, d
    m = _BLOCK_RE.fullmatch(name)
    if m is None or int(m.group(1)) >= hf["num_hidden_layers"]:
        return None
    return {"attn_q": (n_head * head, d), "attn_k": (n_kv * head, d), "attn_v": (n_kv * head, d),
            "attn_output": (d, n_head * head), "ffn_gate": (inter, d), "ffn_up": (inter, d),
            "ffn_down": (d, inter)}[_BLOCK_TENSORS[m.group(2)]]


def _llamacpp_reasons(ad: Adapter, hf: dict | None, model: Union[str, Path, None]) -> list[str]:
    lines = _other_reasons(ad, "llama.cpp")
    tied = bool(hf and hf.get("tie_word_embeddings", False))
    for m in _module_factors(ad):
        if m.kind == "conv" or _gguf_name(m.name) is None:
            lines.append(f"module {m.name}: no llama.cpp tensor for it in the llama family (llama.cpp adapts "
                         "embed_tokens, q/k/v/o_proj, gate/up/down_proj and lm_head)")
        elif tied and m.name in ("model.embed_tokens", "lm_head"):
            lines.append(f"module {m.name}: the model ties lm_head to embed_tokens, and llama.cpp would apply this "
                         "LoRA to both (the output layer reuses token_embd.weight)")
        elif hf is not None:
            want = _weight_shape(hf, m.name)
            got = (m.B.shape[0], m.A.shape[1]) if m.kind == "linear" else (m.A.shape[1], m.B.shape[0])
            if want != got:
                have = "no such module" if want is None else f"a weight of shape {want}"
                lines.append(f"module {m.name}: the adapter's ΔW has shape {got} but --model {model} has {have} "
                             "(an adapter for another model?)")
                break  # the first module that differs; the rest most likely differ too
    return lines


def problems(adapter: Union[str, Path], target: str, *, model: Union[str, Path, None] = None,
             max_lora_rank: int = VLLM_MAX_LORA_RANK) -> list[str]:
    """One line per thing ``target`` ("peft", "transformers", "vllm", "llama.cpp") cannot load from the adapter
    folder; [] when it loads. AdapterError for a broken folder, DataError for an unusable ``model``.

    PEFT loads everything lorafit writes; ``read`` already refuses what it cannot (incomplete factor pairs, bad
    tensors). transformers' ``load_adapter`` (PEFT underneath) loads all of it but DoRA's magnitudes. vLLM: no
    DoRA, biases, modules_to_save, PiSSA or OLoRA residual bases, embedding or conv LoRA, or ranks above
    ``max_lora_rank``. llama.cpp: the same plain-LoRA rules, llama-family module names, and with ``model`` its
    architecture and every module's shape.
    """
    if target not in TARGETS:
        raise DataError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    ad = read(adapter)
    if target == "vllm":
        return _vllm_reasons(ad, max_lora_rank)
    if target == "llama.cpp":
        hf = read_model_config(model)[0] if model is not None else None
        return _llamacpp_reasons(ad, hf, model)
    if ad.raw.get("peft_type") != "LORA":
        return [f"adapter_config.json: peft_type={ad.raw.get('peft_type')!r}; PEFT's loader needs 'LORA' there"]
    if target == "transformers" and ad.config.use_dora:
        return ["DoRA magnitudes: transformers 5's load_adapter (tested: 5.24 with PEFT 0.21.2) matches none of the "
                "file's lora_magnitude_vector keys and leaves the magnitudes at their init; load with "
                "lorafit.hf_trainer.load_adapter(model, folder), which passes them keyed as it expects"]
    return []


def _refuse(ad: Adapter, engine: str, lines: list[str]) -> None:
    if lines:
        raise AdapterError(f"{engine} cannot load adapter {ad.path}:\n  " + "\n  ".join(lines))


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise DataError(f"{output} exists; pass --force to replace it")


# --- llama.cpp ------------------------------------------------------------------------------------------------

def rope_permute(rows: Tensor, n_head: int) -> Tensor:
    """Reorder the rows of a q/k projection (or of its B) from HF's rotate-half layout to llama.cpp's
    adjacent-pair layout: per head, rows [0, d/2, 1, d/2+1, ...] (as ``LlamaModel.permute`` in
    ``convert_hf_to_gguf.py``). rows: (n_head·d, ...) -> the same shape."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def llamacpp_tensors(ad: Adapter, hf: dict, arch: str) -> tuple[float, dict[str, Tensor]]:
    """The GGUF file's alpha and its tensors {name: float32 (numpy order)}: B folded to ``B·s·r/alpha`` (only
    where lorafit's s differs from alpha/r), q/k rows permuted for llama/mistral, embeddings' A transposed."""
    alpha = float(ad.config.lora_alpha)
    permute = LLAMA_FAMILY[arch][1]
    n_head = hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_head
    out = {}
    for m in ad.modules:
        b = m.B.double()
        if ad.config.use_rslora or m.alpha != alpha:
            b = b * (m.scaling * m.r / alpha if alpha else m.scaling)  # llama.cpp: alpha 0 means scale 1
        base = _gguf_name(m.name)
        if permute and base.endswith((".attn_q.weight", ".attn_k.weight")):
            b = rope_permute(b, n_head if ".attn_q." in base else n_kv)
        a = m.A.T if m.kind == "embedding" else m.A  # token_embd: rows of A.T are gathered per token
        out[base + ".lora_a"] = a.float().contiguous()
        out[base + ".lora_b"] = b.float().contiguous()
    return alpha, out


def _encode(gguf, array, outtype: str):
    """(data, raw dtype) for one tensor: f32 as is, f16 as numpy float16, bf16 and q8_0 through gguf.quants; a
    tensor whose rows Q8_0 cannot split into 32-value blocks falls back to F16, as in llama.cpp's converters."""
    q = gguf.GGMLQuantizationType
    qtype = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[outtype]
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, q.F16), q.F16


def export_gguf(adapter: Union[str, Path], model: Union[str, Path], output: Union[str, Path], *,
                outtype: str = "f32", force: bool = False) -> Path:
    """Write ``adapter`` as a llama.cpp GGUF LoRA file for the base model folder ``model`` (config.json only), in
    one atomic step. AdapterError lists everything llama.cpp cannot apply; DataError for the model or output."""
    import gguf

    if outtype not in OUTTYPES:
        raise DataError(f"unknown outtype {outtype!r}; expected one of {', '.join(OUTTYPES)}")
    output = Path(output)
    _check_output(output, force)
    hf, arch = read_model_config(model)
    ad = read(adapter)
    _refuse(ad, "llama.cpp", _llamacpp_reasons(ad, hf, model))
    alpha, tensors = llamacpp_tensors(ad, hf, arch)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), LLAMA_FAMILY[arch][0])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, t in tensors.items():
            data, qtype = _encode(gguf, t.numpy(), outtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    output.parent.mkdir(parents=True, exist_ok=True)
    return replace_file(output, write)


# --- vLLM -----------------------------------------------------------------------------------------------------

def vllm_files(ad: Adapter) -> tuple[dict, dict[str, Tensor]]:
    """adapter_config.json and tensors for vLLM, which scales every module by the config's alpha/r: unchanged
    when that is already each module's s, otherwise r = the largest rank R, alpha = lora_alpha·R/r (so modules at
    the config's r and alpha keep B) and ``B' = B·s/(alpha'/R)``, with no patterns and no RSLoRA."""
    cfg = ad.config
    config = {**ad.raw, "init_lora_weights": True}
    tensors = _factor_tensors(ad)
    if not cfg.use_rslora and all(m.r == cfg.r and m.alpha == cfg.lora_alpha for m in ad.modules):
        return config, tensors
    r = max(m.r for m in ad.modules)
    alpha = cfg.lora_alpha * r / cfg.r
    config.update(r=r, lora_alpha=alpha, use_rslora=False, rank_pattern={}, alpha_pattern={})
    for m in ad.modules:
        if cfg.use_rslora or m.alpha != cfg.lora_alpha or m.r != cfg.r:
            tensors[factor_key(m.name, "B")] = (m.B.double() * (m.scaling / (alpha / r))).to(m.B.dtype)
    return config, tensors


def _factor_tensors(ad: Adapter) -> dict[str, Tensor]:
    return {factor_key(m.name, part, embedding=m.kind == "embedding"): t
            for m in ad.modules for part, t in (("A", m.A), ("B", m.B))}


def export_vllm(adapter: Union[str, Path], output: Union[str, Path], *, force: bool = False,
                max_lora_rank: int = VLLM_MAX_LORA_RANK) -> Path:
    """Write a copy of ``adapter`` that vLLM loads with the same function (see ``vllm_files``), atomically;
    AdapterError lists everything vLLM cannot load."""
    output = Path(output)
    _check_output(output, force)
    ad = read(adapter)
    _refuse(ad, "vLLM", _vllm_reasons(ad, max_lora_rank))
    config, tensors = vllm_files(ad)
    with writing_dir(output) as tmp:
        write_adapter_files(tmp, tensors, config)
    return output
