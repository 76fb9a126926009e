"""`lorafit generate` and lorafit.generate on a tiny random Llama (with a real tiny tokenizer): greedy answers equal
transformers' own generate on the merged model token for token, seeded sampling, the chat template (rendering, the
end-of-turn stop), streaming, and bad input (one line, exit 2, before the model loads where it can)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorafit
from helpers import make_data, make_model_dir, perturb_trainable, run_cli, with_chat_template
from lorafit import AdapterError, ConfigError, DataError, LoraConfig
from lorafit.cli import main
from lorafit.generate import (
    Sampling,
    compare,
    decode,
    generate,
    load_for_inference,
    read_messages,
    render,
    stop_token_ids,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "the movie was"


def save_adapter(model_dir: Path, out: Path) -> Path:
    """A perturbed (so not a no-op) all-linear r=4 adapter for the model in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = lorafit.attach(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8,
                                                                                        target_modules="all-linear"))
    perturb_trainable(model, std=0.1)
    return lorafit.save(model, out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("gen")
    model = make_model_dir(d / "model")
    other = d / "narrow"  # hidden size 32 instead of 64
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    return {"model": model, "adapter": save_adapter(model, d / "adapter"),
            "chat": with_chat_template(model, d / "chat"),
            "other_adapter": save_adapter(other, d / "other_adapter"), "dir": d}


# --- the answer -------------------------------------------------------------------------------------------------

def test_greedy_equals_transformers_generate_on_the_merged_model(files, capsys):
    from transformers import AutoModelForCausalLM

    model, tok = load_for_inference(files["model"], files["adapter"])
    ids = render(tok, prompt=PROMPT)
    got = generate(model, tok, ids, max_new_tokens=24)
    merged = lorafit.merge(lorafit.load(AutoModelForCausalLM.from_pretrained(files["model"]), files["adapter"]))
    want = merged.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):].tolist()
    assert got == want and len(got) == 24
    with lorafit.disabled(model):
        assert generate(model, tok, ids, max_new_tokens=24) != got  # the adapter changes the answer
    code, out, err = run_cli(capsys, "generate", "--model", files["model"], "--adapter", files["adapter"],
                             "--prompt", PROMPT, "--max-new-tokens", 24, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["token_ids"] == want and result["tokens"] == 24 and result["prompt"] == PROMPT
    assert result["answer"] == decode(tok, want)


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(files):
    model, tok = load_for_inference(files["model"])
    ids = render(tok, prompt=PROMPT)
    rng = torch.get_rng_state()
    draws = [generate(model, tok, ids, max_new_tokens=12, temperature=1.0, seed=s) for s in (0, 0, 1, 2)]
    assert draws[0] == draws[1]
    assert draws[2] != draws[0] and draws[3] != draws[0] and draws[2] != draws[3]
    assert torch.equal(torch.get_rng_state(), rng)
    nucleus = [generate(model, tok, ids, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5) for _ in range(2)]
    assert nucleus[0] == nucleus[1]
    greedy = generate(model, tok, ids, max_new_tokens=12)
    assert generate(model, tok, ids, max_new_tokens=12, seed=7) == greedy  # temperature 0 ignores the seed


def test_text_streams_as_it_is_produced_and_stop_ends_the_answer(files):
    model, tok = load_for_inference(files["model"])
    ids = render(tok, prompt=PROMPT)
    pieces: list[str] = []
    got = generate(model, tok, ids, max_new_tokens=20, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == decode(tok, got)
    calls = []
    stopped = generate(model, tok, ids, max_new_tokens=20, stop=lambda: calls.append(1) or len(calls) >= 3)
    assert stopped == got[:3]


def test_chat_template_renders_the_turns_and_its_end_of_turn_token_stops(files):
    model, tok = load_for_inference(files["chat"])
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(model, tok) == [tok.eos_token_id, eot]
    ids = render(tok, prompt="hi", system="be brief")
    assert tok.decode(ids) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                              "<|im_start|>assistant\n"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "and?"}]
    assert tok.decode(render(tok, messages=messages)).count("<|im_start|>") == 4
    assert render(tok, prompt="hi", raw=True) == tok("hi")["input_ids"]
    greedy = generate(model, tok, ids, max_new_tokens=12)
    with torch.no_grad():  # make <|im_end|> win where the answer's third token did (its logit is doubled)
        model.lm_head.weight[eot] = 2 * model.lm_head.weight[greedy[2]]
    got = generate(model, tok, ids, max_new_tokens=12)
    assert got[-1] == eot and len(got) <= 3 and "<|im_end|>" not in decode(tok, got)


def test_compare_runs_the_base_model_then_the_adapted_one(files, capsys):
    model, tok = load_for_inference(files["model"], files["adapter"])
    ids = render(tok, prompt=PROMPT)
    started = []
    answers = compare(model, tok, ids, sampling=Sampling(max_new_tokens=10), on_start=started.append)
    assert started == ["base", "adapted"] and answers["base"] != answers["adapted"]
    assert answers["adapted"] == generate(model, tok, ids, max_new_tokens=10)
    argv = ["generate", "--model", files["model"], "--adapter", files["adapter"], "--prompt", PROMPT,
            "--max-new-tokens", 10, "--compare"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    base_header, adapted_header = f"=== base model: {files['model']} ===\n", f"=== with adapter: {files['adapter']} ==="
    assert out.startswith(base_header) and adapted_header in out
    base_text, adapted_text = out[len(base_header):].split("\n" + adapted_header + "\n")
    assert base_text == decode(tok, answers["base"]) and adapted_text == decode(tok, answers["adapted"]) + "\n"
    code, out, err = run_cli(capsys, *argv, "--json")
    result = json.loads(out)
    assert code == 0 and result["base_token_ids"] == answers["base"] and result["token_ids"] == answers["adapted"]
    assert result["base_answer"] == base_text and result["base_tokens"] == len(answers["base"])


@pytest.mark.parametrize("form", ["list", "object"])
def test_messages_file_through_the_chat_template(files, capsys, tmp_path, form):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(messages if form == "list" else {"messages": messages}))
    assert read_messages(path) == messages
    code, out, err = run_cli(capsys, "generate", "--model", files["chat"], "--messages", path, "--max-new-tokens", 5,
                             "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["messages"] == messages and result["tokens"] <= 5 and "prompt" not in result


def test_a_lorafit_train_output_folder_is_an_adapter(files, capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", str(files["model"]), "--data", str(make_data(tmp_path / "d.jsonl", n=16)),
                 "--output", str(run), "--steps", "2", "--batch-size", "4", "--max-length", "32", "--quiet"]) == 0
    capsys.readouterr()
    code, out, err = run_cli(capsys, "generate", "--model", files["model"], "--adapter", run, "--prompt", PROMPT,
                             "--max-new-tokens", 4, "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 4


def test_generate_json_prints_one_object_from_a_real_process(files):
    r = subprocess.run([sys.executable, "-m", "lorafit", "generate", "--model", str(files["chat"]), "--prompt", "hi",
                        "--system", "be brief", "--max-new-tokens", "3", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["prompt"] == "hi" and result["tokens"] == len(result["token_ids"]) <= 3


# --- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("max_new_tokens", -1), ("max_new_tokens", 2.5),
                                         ("temperature", -0.5), ("temperature", math.nan), ("top_p", 0.0),
                                         ("top_p", 1.5), ("seed", -1)])
def test_bad_sampling_value_names_it(field, value):
    with pytest.raises(ConfigError, match=f"^{field}={value!r} is invalid"):
        Sampling(**{field: value})


def test_generate_checks_its_values_and_an_empty_prompt(files):
    model, tok = load_for_inference(files["model"])
    with pytest.raises(ConfigError, match="max_new_tokens=0 is invalid"):
        generate(model, tok, [5, 6], max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p=0 is invalid"):
        generate(model, tok, [5, 6], max_new_tokens=4, temperature=1.0, top_p=0)
    with pytest.raises(ConfigError, match="no tokens"):
        generate(model, tok, [], max_new_tokens=4)


def test_render_without_a_chat_template(files):
    _, tok = load_for_inference(files["model"])
    assert render(tok, prompt=PROMPT) == tok(PROMPT)["input_ids"]
    with pytest.raises(DataError, match=f"tokenizer of {files['model']} has no chat template"):
        render(tok, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ConfigError, match="system needs a chat template"):
        render(tok, prompt=PROMPT, system="be brief")
    with pytest.raises(ConfigError, match="exactly one of prompt and messages"):
        render(tok, prompt=PROMPT, messages=[{"role": "user", "content": "hi"}])


def test_an_adapter_for_another_model_is_refused_naming_both(files, capsys):
    with pytest.raises(AdapterError) as e:
        load_for_inference(files["model"], files["other_adapter"])
    message = str(e.value)
    assert f"adapter {files['other_adapter']} (made for {files['dir'] / 'narrow'})" in message
    assert f"does not fit the model in {files['model']}" in message and "has shape" in message
    code, out, err = run_cli(capsys, "generate", "--model", files["model"], "--adapter", files["other_adapter"],
                             "--prompt", PROMPT)
    assert code == 2 and out == "" and [line for line in err.splitlines() if "error" in line] == \
        [f"lorafit: error: {message}"]


def _good(f):
    return ["--model", f.model, "--prompt", PROMPT]


BAD = [  # (id, argv of `lorafit generate` from the files f, the message of the one error line)
    ("prompt-and-messages", lambda f: [*_good(f), "--messages", f.one_turn],
     "argument --messages: not allowed with argument --prompt"),
    ("neither", lambda f: ["--model", f.model], "one of the arguments --prompt --messages is required"),
    ("max-new-tokens-0", lambda f: [*_good(f), "--max-new-tokens", 0],
     "argument --max-new-tokens: expected a positive integer, got '0'"),
    ("max-new-tokens-negative", lambda f: [*_good(f), "--max-new-tokens", -1],
     "argument --max-new-tokens: expected a positive integer, got '-1'"),
    ("max-new-tokens-fractional", lambda f: [*_good(f), "--max-new-tokens", 2.5], "argument --max-new-tokens"),
    ("temperature-negative", lambda f: [*_good(f), "--temperature", -0.5], "temperature=-0.5 is invalid"),
    ("top-p-above-1", lambda f: [*_good(f), "--top-p", 1.5], "top_p=1.5 is invalid"),
    ("compare-without-adapter", lambda f: [*_good(f), "--compare"], "--compare needs --adapter"),
    ("messages-jsonl", lambda f: ["--model", f.chat, "--messages", f.jsonl], "two.json is not one JSON value"),
    ("messages-missing", lambda f: ["--model", f.chat, "--messages", f.tmp / "none.json"], "none.json does not exist"),
    ("messages-without-template", lambda f: ["--model", f.model, "--messages", f.one_turn], "has no chat template"),
    ("model-missing", lambda f: ["--model", f.tmp / "nomodel", "--prompt", PROMPT], "is not a transformers checkpoint"),
    ("adapter-missing", lambda f: [*_good(f), "--adapter", f.tmp / "none"], "does not exist or is not a folder"),
    ("dtype-unknown", lambda f: [*_good(f), "--dtype", "float64"], "argument --dtype"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_flag_is_one_error_line_and_exit_2(files, capsys, tmp_path, argv, message):
    one_turn, jsonl = tmp_path / "one.json", tmp_path / "two.json"
    one_turn.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    jsonl.write_text('{"role": "user", "content": "a"}\n{"role": "user", "content": "b"}\n')
    f = SimpleNamespace(model=files["model"], chat=files["chat"], tmp=tmp_path, one_turn=one_turn, jsonl=jsonl)
    code, out, err = run_cli(capsys, "generate", *argv(f))
    assert code == 2 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
