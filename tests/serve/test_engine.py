"""lorafit.serve's engine on a tiny Llama with three adapters: greedy answers equal `lorafit generate`'s and
transformers + PEFT's generate token for token, for rows of different adapters (and the base) decoded in one batch,
rows joining and leaving mid-batch; seeded sampling that does not depend on the batch; stop strings; cancelled
rows freed; adapters loaded and unloaded between steps."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import lorafit
from helpers import make_model_dir, save_lora
from lorafit import LoraConfig
from lorafit.generate import generate, load_for_inference, render, stop_token_ids
from lorafit.serve.engine import Engine, Row

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["the movie was", "Review: the movie was good\nSentiment:", "positive negative", "the"]
CONFIGS = {"qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
           "all": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
           "dora": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    model = make_model_dir(d / "model")
    return {"model": model, **{name: save_lora(model, d / name, cfg, seed)
                               for seed, (name, cfg) in enumerate(CONFIGS.items(), start=1)}}


@pytest.fixture(scope="module")
def served(files):
    model, tok = load_for_inference(files["model"])
    for name in CONFIGS:
        lorafit.load(model, files[name], name=name)
    engine = Engine(model.eval(), tok, max_batch=4).start()
    yield engine
    engine.stop()


def answer(engine: Engine, rows: list[Row]) -> list[tuple[list[int], str, str]]:
    """Submit ``rows`` together and wait for every one: (tokens, text, finish reason) each."""
    done = [threading.Event() for _ in rows]
    out = [["", None] for _ in rows]
    for i, row in enumerate(rows):
        def emit(text, finish, i=i):
            out[i][0] += text
            if finish is not None:
                out[i][1] = finish
                done[i].set()
        row.emit = emit
    for row in rows:
        engine.submit(row)
    for event in done:
        assert event.wait(60)
    return [(row.tokens, text, finish) for row, (text, finish) in zip(rows, out)]


def alone(files, adapter, prompt: str, n: int) -> list[int]:
    """`lorafit generate --raw`'s greedy answer with the adapter alone on the model."""
    model, tok = load_for_inference(files["model"], files[adapter] if adapter else None)
    ids = render(tok, prompt=prompt, raw=True)
    got = generate(model, tok, ids, max_new_tokens=n)
    stops = set(stop_token_ids(model, tok))
    return [t for t in got if t not in stops]


def test_mixed_batch_greedy_equals_generate_and_peft(files, served):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = served.tok
    cases = [(a, p) for a in (None, *CONFIGS) for p in PROMPTS[:2]]  # 8 rows through a batch of at most 4
    rows = [Row(prompt=render(tok, prompt=p, raw=True), adapter=a, max_tokens=12, stop_ids=frozenset(
        stop_token_ids(served.model, tok))) for a, p in cases]
    got = answer(served, rows)
    base = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    for (adapter, prompt), (tokens, text, finish) in zip(cases, got):
        want = alone(files, adapter, prompt, 12)
        assert tokens == want, (adapter, prompt)
        assert text == tok.decode(tokens, skip_special_tokens=True) and finish in ("length", "stop")
        if adapter is not None:  # and transformers + PEFT's own generate
            peft_model = PeftModel.from_pretrained(base, files[adapter]).eval()
            ids = torch.tensor([render(tok, prompt=prompt, raw=True)])
            ref = peft_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                      eos_token_id=stop_token_ids(served.model, tok), pad_token_id=2)
            assert tokens == [t for t in ref[0, ids.shape[1]:].tolist() if t != 2], adapter
            base = peft_model.unload()
    assert any(a != b for (a, _, _), (b, _, _) in zip(got[::2], got[2::2]))  # the adapters answer differently


def test_rows_join_and_leave_a_running_batch(files, served):
    tok = served.tok
    long = Row(prompt=render(tok, prompt=PROMPTS[1], raw=True), adapter="all", max_tokens=40)
    shorts = [Row(prompt=render(tok, prompt=PROMPTS[i % 4], raw=True), adapter=a, max_tokens=3 + 2 * i)
              for i, a in enumerate(["qv", None, "dora", "qv", "all"])]
    got = answer(served, [long, *shorts])
    assert got[0][0] == alone(files, "all", PROMPTS[1], 40)[:len(got[0][0])] and len(got[0][0]) == 40
    for i, (row, (tokens, _, _)) in enumerate(zip(shorts, got[1:])):
        assert tokens == alone(files, row.adapter, PROMPTS[i % 4], row.max_tokens)


def test_seeded_sampling_does_not_depend_on_the_batch(served):
    tok = served.tok
    ids = render(tok, prompt=PROMPTS[0], raw=True)

    def sampled(*others):
        row = Row(prompt=ids, adapter="qv", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
        return answer(served, [row, *others])[0][0]
    first = sampled()
    assert first == sampled(Row(prompt=ids, adapter="all", max_tokens=5, temperature=1.0, seed=1))
    other = Row(prompt=ids, adapter="qv", max_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    assert answer(served, [other])[0][0] != first


def test_stop_strings_end_the_answer_before_them(files, served):
    tok = served.tok
    for adapter in ("all", "dora", "qv", None):  # an answer with two letters in a row after its start
        ids = render(tok, prompt=PROMPTS[1], raw=True)
        [(tokens, text, _)] = answer(served, [Row(prompt=ids, adapter=adapter, max_tokens=20)])
        at = next((i for i in range(1, len(text) - 1) if text[i:i + 2].isalnum()), None)
        if at is not None:
            break
    assert at is not None, text
    stop = text[at:at + 2]
    [(_, cut, finish)] = answer(served, [Row(prompt=ids, adapter=adapter, max_tokens=20, stop=("zzzz", stop))])
    assert finish == "stop" and cut == text[:text.find(stop)]


def test_a_cancelled_row_is_freed_and_the_others_go_on(served):
    tok = served.tok
    ids = render(tok, prompt=PROMPTS[0], raw=True)
    gone = Row(prompt=ids, adapter="qv", max_tokens=200)
    seen = threading.Event()

    def emit(text, finish):
        seen.set()
        if finish is not None:
            gone.finish = finish
    gone.emit = emit
    served.submit(gone)
    assert seen.wait(30)
    gone.cancelled.set()
    [(tokens, _, _)] = answer(served, [Row(prompt=ids, adapter="all", max_tokens=6)])
    assert len(tokens) == 6 and gone.finish == "cancelled" and len(gone.tokens) < 200
    deadline = time.time() + 10
    while served.rows and time.time() < deadline:  # the finished rows are dropped right after their last emit
        time.sleep(0.01)
    assert served.rows == [] and served.cache is None


def test_adapters_load_and_unload_between_steps(files, served, tmp_path):
    extra = save_lora(files["model"], tmp_path / "extra", CONFIGS["qv"], seed=9)
    served.call(lambda: served.load_adapter("extra", extra))
    ids = render(served.tok, prompt=PROMPTS[0], raw=True)
    [(tokens, _, _)] = answer(served, [Row(prompt=ids, adapter="extra", max_tokens=8)])
    model, tok = load_for_inference(files["model"], extra)
    assert tokens == generate(model, tok, ids, max_new_tokens=8)
    with pytest.raises(lorafit.AdapterError, match="already served"):
        served.call(lambda: served.load_adapter("extra", extra))
    served.call(lambda: served.unload_adapter("extra"))
    assert "extra" not in lorafit.adapters(served.model)


def test_a_failing_step_ends_its_rows_with_an_error_and_the_engine_goes_on(served, monkeypatch):
    ids = render(served.tok, prompt=PROMPTS[0], raw=True)
    [(tokens, text, finish)] = answer(served, [Row(prompt=ids, adapter="nope", max_tokens=4)])  # its prefill fails
    assert finish == "error" and "nope" in text and tokens == []
    real = served._pick
    calls = []

    def fails_once(logits, rows):
        calls.append(len(rows))
        if len(calls) == 2:  # the first decoding step
            raise RuntimeError("out of memory (pretend)")
        return real(logits, rows)
    monkeypatch.setattr(served, "_pick", fails_once)
    [(_, text, finish)] = answer(served, [Row(prompt=ids, adapter="qv", max_tokens=6)])
    assert finish == "error" and "out of memory (pretend)" in text and served.failures == 1
    monkeypatch.setattr(served, "_pick", real)
    [(tokens, _, finish)] = answer(served, [Row(prompt=ids, adapter="qv", max_tokens=6)])
    assert len(tokens) == 6 and finish == "length" and served.thread.is_alive()


def test_a_model_with_sliding_window_caches_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    from lorafit.errors import ConfigError

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8))
    with pytest.raises(ConfigError, match="full-attention KV caches only.*Sliding"):
        Engine(model, None)
