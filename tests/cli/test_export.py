"""`lorafit export` (llama.cpp GGUF, vLLM) and `lorafit check`: files read back, values against lorafit's own merge,
and every refusal with its exit code (0 loads, 1 does not, 2 bad input).

Values: the GGUF's ``(alpha/r)·B'·A`` (r from the tensor's shape, as llama.cpp's ``get_scale``) against ``W_merged -
W0`` from ``lorafit.merge`` in float32, to 1e-5 of the largest |ΔW| (two float32 products of different order).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lorafit
from helpers import close_to_scale, perturb_trainable, run_cli, tiny_mlp
from lorafit import LoraConfig
from lorafit.cli import main
from lorafit.export import rope_permute

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                     rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6}, alpha_pattern={"v_proj": 3.0, "k_proj": 16}),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_rslora=True),
}
VLLM_CASES = ["lora", "rslora", "patterns"]



@pytest.fixture(scope="module")
def base(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """{case: (adapter folder, the adapted model)} with random non-zero factors."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for case, fields in CASES.items():
        model = lorafit.attach(copy.deepcopy(base), LoraConfig(**fields))
        perturb_trainable(model)
        out[case] = (lorafit.save(model, root / case), model)
    return out


def make_adapter(base, path: Path, **fields) -> Path:
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(**fields))
    perturb_trainable(model)
    return lorafit.save(model, path)


def gguf_tensors(file: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(key-value fields, {tensor name: float32 tensor in numpy/PyTorch order, dequantized})."""
    reader = gguf.GGUFReader(str(file))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
               for t in reader.tensors}
    return fields, tensors


def delta_weights(model) -> dict[str, torch.Tensor]:
    """lorafit's s·B·A per adapted module, from merging a copy: W_merged - W0 (embeddings: (vocab, dim))."""
    names = [n for n, _ in lorafit.adapter_layers(model)]
    before = {n: model.get_submodule(n).base.weight.detach().clone() for n in names}
    merged = lorafit.merge(copy.deepcopy(model))
    return {n: merged.get_submodule(n).weight.detach() - before[n] for n in names}


GGUF_BASE = {"model.embed_tokens": "token_embd", "lm_head": "output"}
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    if name in GGUF_BASE:
        return GGUF_BASE[name] + ".weight"
    _, _, i, rest = name.split(".", 3)
    return f"blk.{i}.{BLOCK[rest]}.weight"


def test_gguf_name_table_is_gguf_pys():
    """The export's names are the ones gguf-py's own tensor map gives the llama architecture."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf in ["model.embed_tokens", "lm_head"] + [f"model.layers.1.{k}" for k in BLOCK]:
        assert names.get_name(hf) + ".weight" == gguf_name(hf)


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_gives_lorafits_function(case, adapters, model_dir, tmp_path, capsys):
    """Keys, names, shapes, and (alpha/r)·B'·A == lorafit's s·B·A with q/k rows permuted as llama.cpp's base."""
    folder, model = adapters[case]
    out = tmp_path / "a.gguf"
    assert run_cli(capsys, "export", folder, "--format", "gguf", "--model", model_dir, "--output", out)[0] == 0
    fields, tensors = gguf_tensors(out)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    assert alpha == CASES[case]["lora_alpha"]
    deltas = delta_weights(model)
    assert set(tensors) == {gguf_name(n) + s for n in deltas for s in (".lora_a", ".lora_b")}
    for name, want in deltas.items():
        a, b = tensors[gguf_name(name) + ".lora_a"], tensors[gguf_name(name) + ".lora_b"]
        r = b.shape[1]  # llama.cpp: rank = lora_b's ne[0]
        if name == "model.embed_tokens":  # token_embd: A stored transposed, ΔW (vocab, dim) = A.T·B.T
            assert a.shape == (want.shape[0], r) and b.shape == (want.shape[1], r)
            got = (alpha / r) * a @ b.T
        else:
            assert a.shape == (r, want.shape[1]) and b.shape == (want.shape[0], r)
            got = (alpha / r) * b @ a
        if name.endswith("q_proj"):
            want = rope_permute(want, cfg["num_attention_heads"])
        elif name.endswith("k_proj"):
            want = rope_permute(want, cfg["num_key_value_heads"])
        close_to_scale(got, want, rtol=1e-5, msg=f"{case} {name}")


def test_rope_permute_is_llamacpps_row_order():
    """Per head of d rows, llama.cpp's order is [0, d/2, 1, d/2+1, ...] (convert_hf_to_gguf LlamaModel.permute),
    and the permutation of W0 and of B gives the permuted ΔW = B·A."""
    n_head, d = 3, 8
    rows = torch.arange(n_head * d).float()[:, None]
    order = [h * d + j // 2 + (d // 2) * (j % 2) for h in range(n_head) for j in range(d)]
    assert rope_permute(rows, n_head)[:, 0].tolist() == order
    b, a = torch.randn(n_head * d, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(rope_permute(b, n_head) @ a, rope_permute(b @ a, n_head))


def test_plain_lora_b_is_unchanged_and_permuted_only_for_q_k(adapters, model_dir, tmp_path, capsys):
    """A plain LoRA needs no fold: v's B is the file's B bit for bit, q's and k's are row permutations of it."""
    folder, model = adapters["lora"]
    out = tmp_path / "a.gguf"
    run_cli(capsys, "export", folder, "--format", "gguf", "--model", model_dir, "--output", out)
    _, tensors = gguf_tensors(out)
    ad = dict(lorafit.adapter_layers(model))

    def b(name: str) -> torch.Tensor:
        return ad[name].adapters["default"].lora_B.detach()
    assert torch.equal(tensors["blk.0.attn_v.weight.lora_b"], b("model.layers.0.self_attn.v_proj"))
    assert torch.equal(tensors["blk.1.attn_q.weight.lora_b"], rope_permute(b("model.layers.1.self_attn.q_proj"), 4))
    assert torch.equal(tensors["blk.1.attn_k.weight.lora_b"], rope_permute(b("model.layers.1.self_attn.k_proj"), 2))
    assert not torch.equal(tensors["blk.1.attn_k.weight.lora_b"], b("model.layers.1.self_attn.k_proj"))


@pytest.mark.parametrize("outtype, bound", [("f16", 2 ** -11), ("bf16", 2 ** -8), ("q8_0", 1 / 254 + 2 ** -11)])
def test_gguf_outtypes_roundtrip(outtype, bound, adapters, model_dir, tmp_path, capsys):
    """f16/bf16: each value within its relative rounding; q8_0: within max|block|·(1/254 + 2^-11) per block of 32
    values (half a step of amax/127, plus the float16 block scale's rounding over 127 steps). Tensors whose rows
    are not a multiple of 32 (lora_b, r < 32) fall back to F16, as in llama.cpp's converters."""
    folder, _ = adapters["patterns"]
    ref, low = tmp_path / "f32.gguf", tmp_path / f"{outtype}.gguf"
    for file, t in ((ref, "f32"), (low, outtype)):
        assert run_cli(capsys, "export", folder, "--format", "gguf", "--model", model_dir, "--output", file,
                       "--outtype", t)[0] == 0
    want, got = gguf_tensors(ref)[1], gguf_tensors(low)[1]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(low)).tensors}
    assert want.keys() == got.keys()
    for name, w in want.items():
        if outtype == "q8_0" and types[name] == "Q8_0":
            blocks, err = w.reshape(-1, 32), (got[name] - w).reshape(-1, 32).abs()
            assert (err <= bound * blocks.abs().amax(1, keepdim=True) * (1 + 1e-6)).all(), name
        else:
            rel = bound if outtype != "q8_0" else 2 ** -11
            torch.testing.assert_close(got[name], w, rtol=rel, atol=1e-7, msg=name)
    if outtype == "q8_0":
        assert types["blk.0.ffn_down.weight.lora_a"] == "Q8_0" and types["blk.0.ffn_down.weight.lora_b"] == "F16"


# --- bad input ---------------------------------------------------------------------------------------------

def test_broken_adapter_folder(model_dir, tmp_path, capsys):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    out = tmp_path / "a.gguf"
    code, _, err = run_cli(capsys, "export", tmp_path / "ad", "--format", "gguf", "--model", model_dir,
                           "--output", out)
    assert code == 2 and "has no adapter_model.safetensors" in err and not out.exists()
    code, _, err = run_cli(capsys, "check", tmp_path / "nothing", "--for", "vllm")
    assert code == 2 and "does not exist" in err


def test_model_mismatch_names_first_module(adapters, model_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    out = tmp_path / "a.gguf"
    code, _, err = run_cli(capsys, "export", adapters["lora"][0], "--format", "gguf", "--model", other,
                           "--output", out)
    assert code == 2 and "module model.layers.0.mlp.down_proj" in err and "(64, 128)" in err and "(64, 96)" in err
    assert not out.exists()
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    code, _, err = run_cli(capsys, "export", adapters["lora"][0], "--format", "gguf", "--model", other,
                           "--output", out)
    assert code == 2 and "module model.layers.1.mlp.down_proj" in err and "no such module" in err


def test_unknown_format_outtype_and_missing_model(adapters, model_dir, tmp_path, capsys):
    folder, out = adapters["lora"][0], tmp_path / "a.gguf"
    assert run_cli(capsys, "export", folder, "--format", "onnx", "--output", out)[0] == 2
    assert run_cli(capsys, "export", folder, "--format", "gguf", "--model", model_dir, "--output", out,
                   "--outtype", "q4_0")[0] == 2
    code, _, err = run_cli(capsys, "export", folder, "--format", "gguf", "--output", out)
    assert code == 2 and "needs --model" in err
    assert run_cli(capsys, "check", folder, "--for", "onnxruntime")[0] == 2
    assert not out.exists()


def test_existing_output_needs_force(adapters, model_dir, tmp_path, capsys):
    out = tmp_path / "a.gguf"
    out.write_bytes(b"keep me")
    args = ("export", adapters["lora"][0], "--format", "gguf", "--model", model_dir, "--output", out)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--force" in err and out.read_bytes() == b"keep me"
    assert run_cli(capsys, *args, "--force")[0] == 0 and out.read_bytes()[:4] == b"GGUF"
    vdir = tmp_path / "v"
    vdir.mkdir()
    code, _, err = run_cli(capsys, "export", adapters["lora"][0], "--format", "vllm", "--output", vdir)
    assert code == 2 and "--force" in err and list(vdir.iterdir()) == []


def test_full_disk_leaves_nothing(adapters, model_dir, tmp_path, capsys, monkeypatch):
    def full(self, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    out = tmp_path / "a.gguf"
    code, _, err = run_cli(capsys, "export", adapters["lora"][0], "--format", "gguf", "--model", model_dir,
                           "--output", out)
    assert code == 1 and "No space left" in err and str(out) in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file
    out.write_bytes(b"old")
    assert run_cli(capsys, "export", adapters["lora"][0], "--format", "gguf", "--model", model_dir,
                   "--output", out, "--force")[0] == 1
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


@pytest.fixture(scope="module")
def refused(base, tmp_path_factory):
    """Adapters llama.cpp or vLLM cannot load, one per reason."""
    root = tmp_path_factory.mktemp("refused")
    out = {
        "dora": make_adapter(base, root / "dora", target_modules=["q_proj", "v_proj"], use_dora=True),
        "modules_to_save": make_adapter(base, root / "mts", target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "bias": make_adapter(base, root / "bias", target_modules=["q_proj"], bias="all"),
        "rank": make_adapter(base, root / "rank", r=32, target_modules=["q_proj"]),
        "embedding": make_adapter(base, root / "emb", target_modules=["embed_tokens", "q_proj"]),
        "mlp": lorafit.save(lorafit.attach(tiny_mlp(), LoraConfig(target_modules=["fc1"])), root / "mlp"),
        "pissa": make_adapter(base, root / "pissa", target_modules=["q_proj"]),
    }
    cfg_file = out["pissa"] / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "init_lora_weights": "pissa"}))
    return out


@pytest.mark.parametrize("case, target, needle", [
    ("dora", "vllm", "module model.layers.0.self_attn.q_proj: DoRA magnitude"),
    ("dora", "llama.cpp", "module model.layers.1.self_attn.v_proj: DoRA magnitude"),
    ("modules_to_save", "vllm", "module lm_head: modules_to_save"),
    ("modules_to_save", "llama.cpp", "module lm_head: modules_to_save"),
    ("bias", "vllm", "bias='all'"),
    ("bias", "llama.cpp", "bias='all'"),
    ("rank", "vllm", "module model.layers.0.self_attn.q_proj: rank 32 is above --max-lora-rank 16"),
    ("pissa", "vllm", "init_lora_weights='pissa'"),
    ("pissa", "llama.cpp", "init_lora_weights='pissa'"),
    ("embedding", "vllm", "module model.embed_tokens: a LoRA on an embedding"),
    ("mlp", "llama.cpp", "module fc1: no llama.cpp tensor"),
])
def test_check_refuses(case, target, needle, refused, capsys):
    code, out, _ = run_cli(capsys, "check", refused[case], "--for", target)
    assert code == 1 and needle in out and "does not load" in out


def test_check_loads(refused, adapters, model_dir, capsys):
    code, out, _ = run_cli(capsys, "check", refused["dora"], "--for", "peft")
    assert code == 0 and "loads in" in out
    code, out, _ = run_cli(capsys, "check", refused["dora"], "--for", "transformers")  # plain load_adapter: no
    assert code == 1 and "DoRA magnitudes" in out and "lorafit.hf_trainer.load_adapter" in out
    code, out, _ = run_cli(capsys, "check", refused["rank"], "--for", "transformers")
    assert code == 0 and "loads in" in out
    assert run_cli(capsys, "check", refused["rank"], "--for", "vllm", "--max-lora-rank", "32")[0] == 0
    assert run_cli(capsys, "check", refused["embedding"], "--for", "llama.cpp", "--model", model_dir)[0] == 0
    assert run_cli(capsys, "check", adapters["patterns"][0], "--for", "vllm")[0] == 0
    cfg_file = refused["mlp"] / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({k: v for k, v in raw.items() if k != "peft_type"}))  # lorafit reads it
    try:
        code, out, _ = run_cli(capsys, "check", refused["mlp"], "--for", "peft")
        assert code == 1 and "peft_type=None" in out
    finally:
        cfg_file.write_text(json.dumps(raw))


def test_export_refuses_with_the_check_lines(refused, model_dir, tmp_path, capsys):
    out = tmp_path / "x"
    code, _, err = run_cli(capsys, "export", refused["dora"], "--format", "gguf", "--model", model_dir,
                           "--output", out)
    assert code == 2 and "llama.cpp cannot load" in err and "DoRA magnitude" in err and not out.exists()
    code, _, err = run_cli(capsys, "export", refused["rank"], "--format", "vllm", "--output", out)
    assert code == 2 and "rank 32 is above --max-lora-rank 16" in err and not out.exists()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    code, _, err = run_cli(capsys, "export", refused["rank"], "--format", "gguf", "--model", gpt2, "--output", out)
    assert code == 2 and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
    tied = tmp_path / "tied"
    tied.mkdir()
    cfg = json.loads((model_dir / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    code, _, err = run_cli(capsys, "export", refused["embedding"], "--format", "gguf", "--model", tied,
                           "--output", out)
    assert code == 2 and "module model.embed_tokens: the model ties lm_head" in err


@pytest.mark.parametrize("case", VLLM_CASES)
def test_vllm_copy_gives_the_same_function_with_plain_scaling(case, adapters, base, tmp_path, capsys):
    """The vLLM copy has no patterns and no RSLoRA, r = the largest rank, and under vLLM's one scale alpha/r (from
    the config, whatever each tensor's rank) gives lorafit's s·B·A, to 1e-6 of its scale."""
    folder, model = adapters[case]
    out = tmp_path / "v"
    assert run_cli(capsys, "export", folder, "--format", "vllm", "--output", out)[0] == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg["use_rslora"] and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    assert cfg["r"] == max([CASES[case]["r"], *CASES[case].get("rank_pattern", {}).values()])
    from safetensors.torch import load_file
    tensors, scale = load_file(out / "adapter_model.safetensors"), cfg["lora_alpha"] / cfg["r"]
    for name, want in delta_weights(model).items():
        key = f"base_model.model.{name}.lora_"
        close_to_scale(scale * tensors[key + "B.weight"] @ tensors[key + "A.weight"], want, rtol=1e-6,
                       msg=f"{case} {name}")
    if case == "lora":  # nothing to fold: the files' tensors are the same
        assert all(torch.equal(t, load_file(folder / "adapter_model.safetensors")[k]) for k, t in tensors.items())
    if case == "rslora":  # one rank: the plain copy also loads back into lorafit as the same function
        loaded = lorafit.load(copy.deepcopy(base), out)
        close_to_scale(delta_weights(loaded), delta_weights(model), rtol=1e-6, msg=case)


def test_help_lists_the_supported_architectures(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert all(a in text for a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "SmolLM2"))
