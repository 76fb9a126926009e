"""Bad input, table by table: every case ends in one clear error that names the offending item, and changes nothing.

Each case asserts (a) the exception type (ConfigError / AdapterError / DataError, all ValueErrors) or the CLI's exit
code 2, (b) that the message names the offending field, key, file or line, and (c) that the model's state_dict, the
files it read and the output folder are as before (the output folder is never created). The cases here are the ones
test_config.py, test_targets.py, test_io.py and test_cli.py do not already cover. CLI cases run ``cli.main``
in-process (it returns the exit code); two run ``python -m lorafit`` to check the real process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import lorafit
from helpers import make_data, make_model_dir, make_tokenizer, perturb_trainable, tiny_cnn, tiny_llama, tiny_mlp
from lorafit import AdapterError, ConfigError, DataError, LoraConfig
from lorafit.cli import main
from lorafit.train.data import read_examples, tokenize

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The same keys and bit-identical values (NaN counts as equal to NaN), and no LoRA layer left behind."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) or torch.equal(after[k].isnan(), v.isnan()) and
               torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())
    assert not any(isinstance(m, lorafit.LoraLayer) for m in model.modules())
    assert not hasattr(model, "lorafit_state")


def tree(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes (None if ``path`` does not exist): 'unchanged' means equal trees."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of ``lorafit ARGV`` run in this process; argparse errors exit through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama checkpoint, a good data file, a finished-looking run folder and an adapter for the model."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = make_model_dir(root / "model")
    data = make_data(root / "train.jsonl")
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(model), "data": str(data), "steps": 2}))
    from transformers import AutoModelForCausalLM
    adapter = lorafit.save(lorafit.attach(AutoModelForCausalLM.from_pretrained(model),
                                          LoraConfig(target_modules=["q_proj"])), root / "adapter")
    return SimpleNamespace(model=model, data=data, run=run, adapter=adapter)


# --- 1. LoraConfig values and types, from Python, JSON and YAML ---------------------------------------------
# (id, source, payload, text the message must contain). Construction fails before attach, so the model and the
# output folder stay as they were.

CONFIG_CASES = [
    ("py-r-none", "py", dict(r=None), "LoraConfig.r=None"),
    ("py-r-list", "py", dict(r=[8]), "LoraConfig.r=[8]"),
    ("py-alpha-inf", "py", dict(lora_alpha=float("inf")), "LoraConfig.lora_alpha=inf"),
    ("py-dropout-nan", "py", dict(lora_dropout=float("nan")), "LoraConfig.lora_dropout=nan"),
    ("py-bias-none", "py", dict(bias=None), "LoraConfig.bias=None"),
    ("py-init-zero", "py", dict(init_lora_weights=0), "LoraConfig.init_lora_weights=0"),  # == False, inits as True
    ("py-targets-dict", "py", dict(target_modules={"q_proj": 1}), "LoraConfig.target_modules="),
    ("py-targets-empty-set", "py", dict(target_modules=set()), "LoraConfig.target_modules=set()"),
    ("py-targets-empty-name", "py", dict(target_modules=["fc1", ""]), "LoraConfig.target_modules="),
    ("py-layers-bool", "py", dict(target_modules=["fc1"], layers_to_transform=True),
     "LoraConfig.layers_to_transform=True"),
    ("py-layers-pattern-empty", "py", dict(target_modules=["fc1"], layers_to_transform=[0], layers_pattern=[""]),
     "LoraConfig.layers_pattern="),
    ("py-rank-pattern-int-key", "py", dict(rank_pattern={1: 4}), "key 1"),
    ("py-alpha-pattern-inf", "py", dict(alpha_pattern={"fc1": float("inf")}), "LoraConfig.alpha_pattern="),
    ("py-modules-to-save-empty-name", "py", dict(modules_to_save=""), "LoraConfig.modules_to_save="),
    ("py-modules-to-save-int", "py", dict(modules_to_save=5), "LoraConfig.modules_to_save=5"),
    ("json-nan-literal", "json", '{"lora_alpha": NaN}', "LoraConfig.lora_alpha=nan"),
    ("json-top-level-list", "json", "[8, 16]", "must be a mapping"),
    ("json-r-string", "json", '{"r": "8"}', "LoraConfig.r='8'"),
    ("json-bool-string", "json", '{"use_dora": "true"}', "LoraConfig.use_dora='true'"),
    ("json-unknown-field-strict", "json-strict", '{"r": 8, "rr": 4}', "'rr'"),
    ("json-file-missing", "json-file", None, "no-such-config.json"),
    ("json-file-latin1", "json-file", '{"r": 8, "note": "caf\xe9"}'.encode("latin-1"), "not UTF-8"),
    ("json-file-broken", "json-file", b'{"r": 8,', "bad-config.json is not valid JSON"),
    ("yaml-r-float", "yaml", "r: 8.0", "LoraConfig.r=8.0"),
    ("yaml-bool-quoted", "yaml", "use_rslora: 'yes'", "LoraConfig.use_rslora='yes'"),
    ("yaml-alpha-percent", "yaml", "lora_alpha: 16%", "LoraConfig.lora_alpha='16%'"),
    ("yaml-layers-mixed", "yaml", "target_modules: [fc1]\nlayers_to_transform: [0, '1']",
     "LoraConfig.layers_to_transform="),
    ("yaml-init-zero", "yaml", "init_lora_weights: 0", "LoraConfig.init_lora_weights=0"),
    ("yaml-rank-pattern-null-value", "yaml", "rank_pattern: {fc1: null}", "LoraConfig.rank_pattern="),
    ("yaml-unknown-field", "yaml", "r: 8\nrank: 4", "'rank'"),
]


def _config(source: str, payload, tmp_path: Path) -> LoraConfig:
    if source == "py":
        return LoraConfig(**payload)
    if source == "json":
        return LoraConfig.from_json(payload)
    if source == "json-strict":
        return LoraConfig.from_json(payload, strict=True)
    if source == "json-file":
        name = "no-such-config.json" if payload is None else "bad-config.json"
        if payload is not None:
            (tmp_path / name).write_bytes(payload)
        return LoraConfig.from_json(tmp_path / name)
    return LoraConfig.from_dict(yaml.safe_load(payload), strict=True)


@pytest.mark.parametrize("source,payload,message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(source, payload, message, tmp_path):
    model, out = tiny_mlp(), tmp_path / "out"
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        lorafit.save(lorafit.attach(model, _config(source, payload, tmp_path)), out)
    assert message in str(info.value)
    assert_untouched(model, before)
    assert not out.exists()


# --- 2. Target specifications --------------------------------------------------------------------------------

class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(4, 4), nn.Linear(4, 2)


def _nan_fc2():
    model = tiny_mlp()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    return model


TARGET_CASES = [  # (id, model, LoraConfig kwargs, exception, text the message must contain)
    ("all-linear-without-linear", lambda: nn.Sequential(nn.Embedding(10, 4), nn.ReLU()),
     dict(target_modules="all-linear"), ConfigError, "'all-linear' found no nn.Linear"),
    ("regex-matching-containers", tiny_llama, dict(target_modules=".*"), ConfigError, "'model' is a"),
    ("regex-fully-excluded", tiny_llama, dict(target_modules=r".*_proj", exclude_modules=".*"), ConfigError,
     r"'.*_proj'"),
    ("target-also-in-modules-to-save", tiny_mlp, dict(target_modules=["fc1"], modules_to_save=["fc1"]), ConfigError,
     "'fc1' matches no module in the model once exclude_modules/modules_to_save"),
    ("norm-layer", tiny_llama, dict(target_modules=["norm"]), ConfigError, "'model.norm' is a"),
    ("module-list", tiny_llama, dict(target_modules=["layers"]), ConfigError, "'model.layers' is a"),
    ("lstm", Recurrent, dict(target_modules=["rnn"]), ConfigError, "'rnn' is a torch.nn.modules.rnn.LSTM"),
    ("layers-pattern-not-in-model", tiny_llama, dict(target_modules=["q_proj"], layers_to_transform=[0],
                                                     layers_pattern="blocks"), ConfigError, "layers_pattern='blocks'"),
    ("layers-on-a-flat-model", tiny_mlp, dict(target_modules=["fc1"], layers_to_transform=[0]), ConfigError,
     "layers_to_transform=[0]"),
    ("conv-reflect-padding", lambda: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")),
     dict(target_modules=["0"]), ConfigError, "padding_mode='reflect'"),
    ("conv-dilation", lambda: nn.Sequential(nn.Conv2d(3, 3, 3, dilation=2)), dict(target_modules=["0"]),
     ConfigError, "dilation=(2, 2)"),
    ("pissa-rank-too-large", tiny_mlp, dict(target_modules=["fc1"], init_lora_weights="pissa", r=20), ConfigError,
     "'fc1' has shape (32, 16) and r=20"),
    ("pissa-on-a-nan-base", _nan_fc2, dict(target_modules=["fc1", "fc2"], init_lora_weights="pissa", r=2),
     ConfigError, "fc2.weight contains NaN"),
    ("rank-too-large-to-allocate", tiny_llama, dict(target_modules=["q_proj", "v_proj"],
                                                    rank_pattern={"v_proj": 2**40}),
     RuntimeError, "'model.layers.0.self_attn.v_proj' (r=1099511627776)"),
    ("modules-to-save-typo-on-conv", tiny_cnn, dict(target_modules=["conv1"], modules_to_save=["fcc"]), ConfigError,
     "'fcc'"),
    ("config-not-a-loraconfig", tiny_mlp, None, TypeError, "got dict"),
]


@pytest.mark.parametrize("make,kwargs,exc,message", [c[1:] for c in TARGET_CASES], ids=[c[0] for c in TARGET_CASES])
def test_bad_target_spec(make, kwargs, exc, message, tmp_path):
    model, out = make(), tmp_path / "out"
    before = snapshot(model)
    with pytest.raises(exc) as info:
        lorafit.save(lorafit.attach(model, LoraConfig(**kwargs) if kwargs is not None else {"r": 8}), out)
    assert message in str(info.value)
    assert_untouched(model, before)
    assert not out.exists()


def test_merge_without_adapter_names_the_fix():
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no lorafit adapter: call lorafit.attach"):
        lorafit.merge(model)
    assert_untouched(model, before)


# --- 3. Adapter folders --------------------------------------------------------------------------------------

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
W, C = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    model = lorafit.attach(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True,
                                                    init_lora_weights=False))
    perturb_trainable(model)
    return lorafit.save(model, tmp_path_factory.mktemp("adapter") / "adapter")


def _tensors(edit):
    def apply(path: Path) -> None:
        sd = load_file(path / W)
        edit(sd)
        save_file(sd, path / W)
    return apply


def _config_edit(**changes):
    def apply(path: Path) -> None:
        (path / C).write_text(json.dumps({**json.loads((path / C).read_text()), **changes}))
    return apply


def _replace_by_folder(name):
    def apply(path: Path) -> None:
        (path / name).unlink()
        (path / name).mkdir()
    return apply


def _llama_of_width_64():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


ADAPTER_CASES = [  # (id, how to break the folder, model, text the message must contain); None: the folder as saved
    ("config-empty-file", lambda p: (p / C).write_text(""), tiny_llama, "adapter_config.json is not valid JSON"),
    ("config-json-list", lambda p: (p / C).write_text("[]"), tiny_llama, "adapter_config.json: a LoRA config must be"),
    ("config-json-null", lambda p: (p / C).write_text("null"), tiny_llama, "got NoneType"),
    ("config-latin1", lambda p: (p / C).write_bytes('{"r": 8, "x": "caf\xe9"}'.encode("latin-1")), tiny_llama,
     "adapter_config.json is not valid JSON ('utf-8' codec"),
    ("config-is-a-folder", _replace_by_folder(C), tiny_llama, "has no adapter_config.json"),
    ("weights-is-a-folder", _replace_by_folder(W), tiny_llama, "has no adapter_model.safetensors"),
    ("config-r-string", _config_edit(r="8"), tiny_llama, "adapter_config.json: LoraConfig.r='8'"),
    ("config-peft-type-null", _config_edit(peft_type=None), tiny_llama, "peft_type=None"),
    ("config-more-targets-than-weights", _config_edit(target_modules=[
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "k_proj", "v_proj")]), tiny_llama,
     "'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'"),
    ("config-fewer-targets-than-weights", _config_edit(target_modules=["model.layers.0.self_attn.q_proj"]), tiny_llama,
     "key 'base_model.model.model.layers.0.self_attn.v_proj"),
    ("config-rank-pattern-contradicts", _config_edit(rank_pattern={"q_proj": 4}), tiny_llama,
     f"key '{KEY_A}' has shape (8, 32) but the model expects (4, 32)"),
    ("config-modules-to-save-without-weights", _config_edit(modules_to_save=["lm_head"]), tiny_llama,
     "'base_model.model.lm_head.weight'"),
    ("config-dora-weights-without-magnitude", _tensors(lambda sd: [sd.pop(k) for k in list(sd) if "magnitude" in k]),
     tiny_llama, "lora_magnitude_vector"),
    ("weights-inf", _tensors(lambda sd: sd.__setitem__(KEY_A, torch.full_like(sd[KEY_A], float("inf")))), tiny_llama,
     f"tensor '{KEY_A}' contains NaN or inf"),
    ("weights-bool", _tensors(lambda sd: sd.__setitem__(KEY_A, sd[KEY_A] > 0)), tiny_llama,
     f"tensor '{KEY_A}' has dtype torch.bool"),
    ("weights-keys-without-peft-prefix", _tensors(lambda sd: sd.__setitem__(KEY_A[len("base_model.model."):],
                                                                             sd.pop(KEY_A))), tiny_llama,
     "key 'model.layers.0.self_attn.q_proj.lora_A.weight' names a module or parameter this model does not have"),
    ("weights-unknown-parameter", _tensors(lambda sd: sd.__setitem__(KEY_A.replace("lora_A", "lora_C"),
                                                                      sd[KEY_A].clone())), tiny_llama, "lora_C"),
    ("weights-B-transposed", _tensors(lambda sd: sd.__setitem__(KEY_B, sd[KEY_B].t().contiguous())), tiny_llama,
     f"key '{KEY_B}' has shape (8, 32) but the model expects (32, 8)"),
    ("weights-no-tensors", lambda p: save_file({}, p / W), tiny_llama, "12 tensor(s) missing"),
    ("weights-header-too-large", lambda p: (p / W).write_bytes((10**12).to_bytes(8, "little") + b"{}"), tiny_llama,
     "adapter_model.safetensors is truncated or corrupt"),
    ("weights-header-not-json", lambda p: (p / W).write_bytes((4).to_bytes(8, "little") + b"{{{{"), tiny_llama,
     "adapter_model.safetensors is truncated or corrupt"),
    ("same-architecture-other-width", None, _llama_of_width_64,
     f"key '{KEY_A}' has shape (8, 32) but the model expects (8, 64)"),
    ("llm-adapter-on-an-mlp", None, tiny_mlp, "does not fit this model: target_modules entry 'model.layers.0"),
]


@pytest.mark.parametrize("how,make,message", [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter_folder(llama_adapter, how, make, message, tmp_path):
    path = shutil.copytree(llama_adapter, tmp_path / "adapter")
    if how is not None:
        how(path)
    model, files_before = make(), tree(path)
    before = snapshot(model)
    with pytest.raises(AdapterError) as info:
        lorafit.load(model, path)
    assert message in str(info.value)
    assert_untouched(model, before)
    assert tree(path) == files_before  # reading never writes


def test_adapter_path_that_is_a_file(llama_adapter):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors does not exist or is not a folder"):
        lorafit.load(model, llama_adapter / W)
    assert_untouched(model, before)


# --- 4. Data files, through `lorafit train` -----------------------------------------------------------------

DATA_CASES = [  # (id, file name, bytes, text the message must contain besides the file name)
    ("latin1", "d.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "is not UTF-8 text"),
    ("utf16", "d.jsonl", '{"text": "hi"}\n'.encode("utf-16"), "is not UTF-8 text"),
    ("json-array-line", "d.jsonl", b"[1, 2]\n", "line 1: expected a JSON object"),
    ("json-scalar-line", "d.jsonl", b'{"text": "ok"}\n42\n', "line 2: expected a JSON object with \"text\""),
    ("text-not-a-string", "d.jsonl", b'{"text": 5}\n', "line 1: needs a non-empty \"text\" field"),
    ("text-empty", "d.jsonl", b'{"text": "fine"}\n\n{"text": ""}\n', "line 3: needs a non-empty \"text\""),
    ("completion-empty", "d.jsonl", b'{"prompt": "a", "completion": ""}\n', "line 1: \"completion\" is empty"),
    ("prompt-null", "d.jsonl", b'{"prompt": null, "completion": " x"}\n', "line 1: field \"prompt\" is missing"),
    ("mixed-formats", "d.jsonl", b'{"text": "a b"}\n{"prompt": "a", "completion": " b"}\n', "mixes \"text\" and"),
    ("trailing-garbage", "d.jsonl", b'{"text": "a"} {"text": "b"}\n', "line 1: not valid JSON (Extra data)"),
    ("unpaired-surrogate", "d.jsonl", b'{"text": "a\\ud800b"}\n', "line 1: field \"text\" holds an unpaired surrogate"),
    ("nested-too-deep", "d.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1: JSON nested too deeply"),
    ("json-list-of-non-objects", "d.json", b'[{"text": "a"}, 7]', "example 2: expected a JSON object"),
    ("json-list-broken", "d.json", b'[{"text": "a"},', "not valid JSON"),
    ("csv-wrong-columns", "d.csv", b"question,answer\nhi,there\n", "row 2: needs a non-empty \"text\" field"),
    ("csv-short-row", "d.csv", b"prompt,completion\nhello, world\nbye\n", "row 3: field \"completion\" is missing"),
    ("csv-header-only", "d.csv", b"prompt,completion\n", "holds no examples"),
    ("csv-field-over-limit", "d.csv", b'text\nshort\n"' + b"x" * 200_000 + b'"\n', "line 3: not readable as CSV"),
]


@pytest.mark.parametrize("name,content,message", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(files, name, content, message, tmp_path, capsys):
    data, out = tmp_path / name, tmp_path / "out"
    data.write_bytes(content)
    model_before = tree(files.model)
    code, err = run_cli(capsys, "train", "--model", files.model, "--data", data, "--output", out, "--quiet")
    assert code == 2, err
    assert message in err and str(data) in err
    assert err.count("lorafit: error:") == 1 and "Traceback" not in err
    assert not out.exists()
    assert data.read_bytes() == content and tree(files.model) == model_before


def test_data_path_that_is_a_folder_but_no_dataset(tmp_path):
    """A folder is read as a datasets.save_to_disk folder (the chat issue); any other folder is refused."""
    with pytest.raises(DataError, match=f"{tmp_path} is not readable as a dataset"):
        read_examples(tmp_path)


def test_overlong_samples_are_cut_keeping_the_completion():
    """Not an error: a text is cut to max_length tokens, a prompt from the left so that the completion survives."""
    tok = make_tokenizer()
    long = " ".join(["good movie"] * 2000)
    text = tokenize({"text": long}, tok, 16)
    assert len(text["input_ids"]) == 16 and text["labels"] == text["input_ids"]
    pc = tokenize({"prompt": long, "completion": " positive"}, tok, 16)
    answer = tok(" positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(pc["input_ids"]) == 16 and pc["input_ids"][-len(answer):] == answer
    assert pc["labels"][-len(answer):] == answer and set(pc["labels"][:-len(answer)]) == {-100}
    with pytest.raises(DataError, match="max_length=1 is too short"):
        tokenize({"text": long}, tok, 1)


# --- 5. CLI flags and config files ---------------------------------------------------------------------------

def _train(*flags):
    return lambda f: ["train", "--model", f.model, "--data", f.data, "--output", f.out, "--quiet", *flags]


def _yaml(text):
    def argv(f):
        (f.tmp / "c.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", "--model", f.model, "--data", f.data, "--output", f.out, "--config", f.tmp / "c.yaml"]
    return argv


FLAG_CASES = [  # (id, argv from the paths, text the message must contain)
    ("steps-not-a-number", _train("--steps", "abc"), "argument --steps: expected a positive integer, got 'abc'"),
    ("steps-scientific", _train("--steps", "1e3"), "argument --steps: expected a positive integer, got '1e3'"),
    ("rank-fractional", _train("--rank", "2.5"), "argument --rank: expected a positive integer, got '2.5'"),
    ("batch-size-zero", _train("--batch-size", "0"), "argument --batch-size"),
    ("grad-accum-zero", _train("--grad-accum", "0"), "argument --grad-accum"),
    ("warmup-negative", _train("--warmup-steps", "-1"), "argument --warmup-steps"),
    ("lr-not-a-number", _train("--lr", "fast"), "argument --lr: invalid float value: 'fast'"),
    ("lr-zero", _train("--lr", "0"), "lr=0.0 is invalid"),
    ("lora-dropout-above-1", _train("--lora-dropout", "1.5"), "LoraConfig.lora_dropout=1.5"),
    ("lora-alpha-negative", _train("--lora-alpha", "-1"), "LoraConfig.lora_alpha=-1.0"),
    ("lora-alpha-nan", _train("--lora-alpha", "nan"), "LoraConfig.lora_alpha=nan"),
    ("eval-split-one", _train("--eval-split", "1"), "eval_split=1.0 is invalid"),
    ("eval-split-leaves-too-few", _train("--eval-split", "0.99"), "the training split has 1 examples"),
    ("schedule-unknown", _train("--schedule", "step"), "schedule='step' is invalid"),
    ("dtype-unknown", _train("--dtype", "float8"), "dtype='float8' is invalid"),
    ("strategy-unknown", _train("--strategy", "zero3"), "strategy='zero3' is invalid"),
    ("epochs-zero", _train("--epochs", "0"), "epochs=0.0 is invalid"),
    ("weight-decay-negative", _train("--weight-decay", "-1"), "weight_decay=-1.0 is invalid"),
    ("target-modules-empty-list", _train("--target-modules", ","), "LoraConfig.target_modules=[]"),
    ("batch-larger-than-data", _train("--batch-size", "1000"), "fewer than one global batch (1000"),
    ("max-length-one", _train("--max-length", "1"), "max_length=1 is invalid"),
    ("resume-with-a-flag", lambda f: ["train", "--resume", f.run, "--rank", "4"], "drop --rank"),
    ("resume-not-a-run-folder", lambda f: ["train", "--resume", f.tmp], "no config.yaml there"),
    ("config-file-missing", lambda f: ["train", "--config", f.tmp / "none.yaml"], "none.yaml does not exist"),
    ("yaml-syntax", _yaml("steps: [\n"), "c.yaml is not valid YAML"),
    ("yaml-not-utf8", _yaml(b"\xff\xfesteps: 3\n"), "c.yaml is not valid YAML ('utf-8' codec"),
    ("yaml-top-level-list", _yaml("- steps\n- 3\n"), "c.yaml must hold a mapping"),
    ("yaml-lora-not-a-mapping", _yaml("lora: [r, 8]\n"), "'lora:' in the config file must be a mapping"),
    ("yaml-steps-quoted", _yaml("steps: '10'\n"), "steps='10' is invalid"),
    ("yaml-lora-init-zero", _yaml("lora:\n  init_lora_weights: 0\n"), "LoraConfig.init_lora_weights=0"),
    ("yaml-lora-regex-string-target", _yaml("lora:\n  target_modules: q_proj\n"), "regex 'q_proj' matches no module"),
    ("yaml-layers-beyond-model", _yaml("lora:\n  layers_to_transform: [5]\n"), "layers_to_transform=[5]"),
    ("unknown-command", lambda f: ["finetune", "--model", f.model], "invalid choice: 'finetune'"),
    ("plan-bad-dtype", lambda f: ["plan", "--model", f.model, "--dtype", "float64"], "argument --dtype"),
    ("plan-model-missing", lambda f: ["plan", "--model", f.tmp / "nomodel"],
     "nomodel is not a transformers checkpoint"),
    ("merge-output-flag-missing", lambda f: ["merge", "--model", f.model, "--adapter", f.adapter],
     "the following arguments are required: --output"),
    ("merge-corrupt-adapter", lambda f: ["merge", "--model", f.model, "--adapter", f.broken, "--output", f.out],
     "adapter_model.safetensors is truncated or corrupt"),
    ("inspect-missing-folder", lambda f: ["inspect", f.tmp / "noadapter"], "noadapter does not exist"),
    ("quantize-unknown", _train("--quantize", "q4"), "quantize='q4' is invalid: expected nf4, int8 or null"),
    ("yaml-quantize-unknown", _yaml("quantize: fp4\n"), "quantize='fp4' is invalid: expected nf4, int8 or null"),
    ("resume-with-quantize", lambda f: ["train", "--resume", f.run, "--quantize", "nf4"], "drop --quantize"),
    ("plan-quantize-unknown", lambda f: ["plan", "--model", f.model, "--quantize", "int4"],
     "argument --quantize: invalid choice: 'int4'"),
    ("merge-quantized-unknown", lambda f: ["merge", "--model", f.model, "--adapter", f.adapter, "--output", f.out,
                                           "--quantized", "fp8"], "argument --quantized: invalid choice: 'fp8'"),
    ("merge-quantized-over-a-float-run", lambda f: ["merge", "--model", f.model, "--adapter", f.run, "--output",
                                                    f.out, "--quantized", "nf4"],
     "config.yaml says the adapter trained over an unquantized base (quantize: null); drop --quantized"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_bad_flag(files, argv, message, tmp_path, capsys):
    broken = shutil.copytree(files.adapter, tmp_path / "broken")
    (broken / W).write_bytes((broken / W).read_bytes()[:-64])
    f = SimpleNamespace(**vars(files), out=tmp_path / "out", tmp=tmp_path, broken=broken)
    watched = {p: tree(p) for p in (files.model, files.data, files.run, files.adapter, broken)}
    code, err = run_cli(capsys, *argv(f))
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not f.out.exists()
    assert {p: tree(p) for p in watched} == watched


@pytest.mark.parametrize("argv,message", [
    (["train", "--steps", "abc"], "argument --steps"),
    (["inspect", "{tmp}/nothing"], "nothing does not exist"),
])
def test_bad_input_in_a_real_process_exits_2(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "lorafit", *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- 6. Training settings and run-level data checks -------------------------------------------------------------

TRAIN_CONFIG_DEFECTS = [  # (id, TrainConfig fields, the field the error must name)
    ("model-not-a-path", dict(model=5), "model"),  # today: TypeError traceback in Path(5)
    ("data-not-a-path", dict(data=[1]), "data"),
    ("eval-max-string", dict(eval_max="x"), "eval_max"),  # today: TypeError traceback in split()
    ("eval-max-negative", dict(eval_max=-1), "eval_max"),  # today: "training split has 1 examples"
    ("epochs-nan", dict(epochs=float("nan")), "epochs"),  # today: ValueError traceback in math.ceil
    ("epochs-inf", dict(epochs=float("inf")), "epochs"),  # today: OverflowError traceback
    ("epochs-bool", dict(epochs=True), "epochs"),
    ("weight-decay-nan", dict(weight_decay=float("nan")), "weight_decay"),  # today: ValueError from AdamW
    ("max-grad-norm-nan", dict(max_grad_norm=float("nan")), "max_grad_norm"),  # today: NaN gradients, step 2
    ("dist-timeout-negative", dict(dist_timeout=-1), "dist_timeout"),
    ("dist-timeout-string", dict(dist_timeout="abc"), "dist_timeout"),
    ("switch-not-a-bool", dict(gradient_checkpointing="yes"), "gradient_checkpointing"),
    ("add-eos-string", dict(add_eos="no"), "add_eos"),  # today: "no" is truthy, EOS is added
    ("max-length-one", dict(max_length=1), "max_length"),  # today: caught later, by data.tokenize
]


@pytest.mark.parametrize("fields,name", [c[1:] for c in TRAIN_CONFIG_DEFECTS], ids=[c[0] for c in TRAIN_CONFIG_DEFECTS])
def test_train_config_rejects(fields, name):
    from lorafit.train import TrainConfig
    with pytest.raises(ConfigError, match=name):
        TrainConfig.from_dict(fields)


def test_yaml_scientific_notation_is_a_number(tmp_path):
    from lorafit.cli.common import read_yaml
    from lorafit.train import TrainConfig
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nlora:\n  lora_alpha: 1e3\n")
    cfg = TrainConfig.from_dict(read_yaml(str(tmp_path / "c.yaml")))
    assert cfg.lr == 1e-3 and cfg.lora.lora_alpha == 1000


def test_data_without_a_token_to_predict(files, tmp_path, capsys):
    data, out = tmp_path / "one_token.jsonl", tmp_path / "out"
    data.write_text('{"text": "a"}\n' * 20)
    code, err = run_cli(capsys, "train", "--model", files.model, "--data", data, "--output", out, "--quiet",
                        "--steps", "1", "--batch-size", "4")
    assert code == 2 and str(data) in err
    assert not out.exists()


def test_a_tilde_in_config_paths_is_the_home_folder(tmp_path, monkeypatch):
    """`model: ~/models/x` in a YAML file means what it means on a flag, where the shell expands it (the chat-task
    command in docs/guidance.md, whose `lorafit tune` also expands it before resolving the path for its workers)."""
    from lorafit.train import TrainConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig.from_dict({"model": "~/m", "data": "~/d.jsonl", "output": "runs/x"})
    assert (cfg.model, cfg.data, cfg.output) == (str(tmp_path / "m"), str(tmp_path / "d.jsonl"), "runs/x")
