"""`lorafit serve` as a real process, through the official `openai` client: the models list, greedy answers equal to
`lorafit generate` (completions and chat, streamed or not), concurrent requests for different adapters, every bad
request answered with OpenAI's error JSON while the server stays up, runtime adapter loading inside
--adapter-root only, the API key, bad flags at start (exit 2) and SIGTERM (exit 0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import make_chat_model_dir, make_model_dir, save_lora
from lorafit import LoraConfig
from lorafit.cli import main
from lorafit.generate import generate, load_for_inference, render

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
KEY = "test-key-123"
PROMPTS = ["the movie was", "Review: the movie was good\nSentiment:", "positive negative"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    model = make_chat_model_dir(d / "model")
    root = d / "root"
    return {"model": model, "root": root, "dir": d,
            "qv": save_lora(model, d / "qv", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1),
            "all": save_lora(model, d / "all", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                             use_dora=True), 2),
            "late": save_lora(model, root / "late", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"), 3)}


def start(argv: list, log: Path) -> tuple[subprocess.Popen, str]:
    """Start `lorafit serve ARGV --port 0` and wait for its URL line (the event: the server listens)."""
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", *map(str, argv), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("lorafit serve: http"):
                found.set()
    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 120
    while not found.wait(0.2):
        assert proc.poll() is None and time.time() < deadline, log.read_text()
    url = lines[-1].split()[2]
    for _ in range(100):  # uvicorn accepts connections right after the line; /health answers once it serves
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url


@pytest.fixture(scope="module")
def served(files):
    """The module's server process and URL; its last test (SIGTERM) ends it."""
    proc, url = start(["--model", files["model"], "--adapter", f"qv={files['qv']}", "--adapter",
                       f"all={files['all']}", "--api-key", KEY, "--adapter-root", files["root"], "--max-batch", "4"],
                      files["dir"] / "server.log")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(served):
    return served[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(files):
    """`lorafit generate`'s greedy token ids: (adapter, prompt or messages, n) -> ids, one model per adapter."""
    models = {}

    def answer(adapter, n, prompt=None, messages=None):
        if adapter not in models:
            models[adapter] = load_for_inference(files["model"], files[adapter] if adapter else None)
        model, tok = models[adapter]
        ids = render(tok, prompt=prompt, raw=True) if prompt is not None else render(tok, messages=messages)
        return tok.decode(generate(model, tok, ids, max_new_tokens=n), skip_special_tokens=True)
    return answer


def test_models_lists_the_base_and_every_adapter(client, files):
    assert [m.id for m in client.models.list().data] == [files["model"].name, "qv", "all"]


def peft_answer(files, adapter: str, prompt: str, n: int) -> str:
    """transformers + PEFT's own greedy ``generate`` of the adapter's folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["model"]), files[adapter]).eval()
    ids = torch.tensor([render(tok, prompt=prompt, raw=True)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("adapter", [None, "qv", "all"])
def test_completions_equal_lorafit_generate_and_peft(client, files, reference, adapter):
    name = adapter or files["model"].name
    got = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert got.choices[0].text == reference(adapter, 10, prompt=PROMPTS[1])
    if adapter is not None:
        assert got.choices[0].text == peft_answer(files, adapter, PROMPTS[1], 10)
    assert got.model == name and got.usage.prompt_tokens > 0 and got.usage.completion_tokens <= 10
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_chat_and_streaming_equal_lorafit_generate(client, reference):
    messages = [{"role": "user", "content": "is the movie good?"}]
    want = reference("qv", 12, messages=messages)
    got = client.chat.completions.create(model="qv", messages=messages, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="qv", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    pieces = list(client.completions.create(model="all", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == reference("all", 10, prompt=PROMPTS[0])
    assert pieces[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_requests_for_different_adapters_each_equal_generate(server, client, files, reference):
    cases = [(a, p) for a in (None, "qv", "all") for p in PROMPTS] * 2  # 18 requests, 4 rows at a time

    def ask(case):
        adapter, prompt = case
        return client.completions.create(model=adapter or files["model"].name, prompt=prompt, max_tokens=8,
                                         temperature=0).choices[0].text
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, cases))
    for (adapter, prompt), text in zip(cases, answers):
        assert text == reference(adapter, 8, prompt=prompt), (adapter, prompt)
    health = httpx.get(server.removesuffix("/v1") + "/health").json()
    assert health["peak_batch"] >= 2 and health["rows"] == 0  # rows of different adapters decoded together


def test_a_client_that_disconnects_frees_its_row(server):
    health = server.removesuffix("/v1") + "/health"
    body = {"model": "qv", "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        next(r.iter_lines())  # the first piece has come: the row is decoding
        at_close = httpx.get(health).json()["steps"]
    deadline = time.time() + 30
    while httpx.get(health).json()["rows"] and time.time() < deadline:
        time.sleep(0.02)
    after = httpx.get(health).json()
    assert after["rows"] == 0 and after["steps"] - at_close < 200  # freed long before its 240 tokens


def test_seeded_sampling_is_reproducible(client):
    def ask(seed):
        return client.completions.create(model="qv", prompt=PROMPTS[0], max_tokens=12, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text
    assert ask(3) == ask(3)


def _error(response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("body, status, says", [
    ({"model": "nope", "prompt": "x"}, 404, "the model 'nope' does not exist"),
    ({"model": "qv", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "qv", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": "qv"}, 400, "prompt"),
    ({"model": "qv", "prompt": "the movie " * 200}, 400, "this model's context is 256 tokens"),
    ({"model": "qv", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "qv", "prompt": [5, 10**6]}, 400, "token ids must be in [0, "),
    ({"model": "qv", "prompt": "x", "temperature": 1, "seed": 2**64}, 400, "seed"),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, body, status, says):
    r = httpx.post(f"{server}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == status and says in _error(r)["message"], r.text
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200


def test_malformed_json_a_huge_body_and_the_api_key(server, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/completions", content=b'{"model": "qv", "prompt": ', headers=auth)
    assert r.status_code == 400 and "not valid JSON" in _error(r)["message"]
    r = httpx.post(f"{server}/completions", content=b" " * (2 << 20), headers=auth)
    assert r.status_code == 413 and "the limit is" in _error(r)["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    r = httpx.get(f"{server}/models")
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200  # health needs no key
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_runtime_adapter_loading_stays_inside_the_root(server, client, files, reference):
    def post(path, body):
        return httpx.post(f"{server}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    outside = files["dir"] / "qv"
    (files["root"] / "broken").mkdir(exist_ok=True)
    (files["root"] / "broken" / "adapter_config.json").write_text("{not json")
    (files["root"] / "link").unlink(missing_ok=True)
    (files["root"] / "link").symlink_to(outside)
    for body, status, says in [
        ({"lora_name": "x", "lora_path": "../qv"}, 403, "outside --adapter-root"),
        ({"lora_name": "x", "lora_path": str(outside)}, 403, "outside --adapter-root"),
        ({"lora_name": "x", "lora_path": "link"}, 403, "outside --adapter-root"),
        ({"lora_name": "x", "lora_path": "missing"}, 404, "no adapter folder"),
        ({"lora_name": "x", "lora_path": "broken"}, 400, "cannot load 'broken'"),
        ({"lora_name": "qv", "lora_path": "late"}, 400, "already served"),
    ]:
        r = post("load_lora_adapter", body)
        assert r.status_code == status and says in _error(r)["message"], (body, r.text)
    assert post("load_lora_adapter", {"lora_name": "late", "lora_path": "late"}).status_code == 200
    got = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    model, tok = load_for_inference(files["model"], files["late"])
    ids = render(tok, prompt=PROMPTS[0], raw=True)
    assert got == tok.decode(generate(model, tok, ids, max_new_tokens=8), skip_special_tokens=True)
    assert "late" in [m.id for m in client.models.list().data]
    assert post("unload_lora_adapter", {"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="x", max_tokens=2)
    assert post("unload_lora_adapter", {"lora_name": "late"}).status_code == 404


def test_bad_flags_exit_2_before_the_model_loads(files, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", str(files["model"]), "--adapter", f"x={tmp_path / 'missing'}"]) == 2
    assert "no such folder" in capsys.readouterr().err
    other = make_model_dir(tmp_path / "other", hidden=32, intermediate=64)
    wrong = save_lora(other, tmp_path / "wrong", LoraConfig(r=2, target_modules=["q_proj"]), 1)
    assert main(["serve", "--model", str(files["model"]), "--adapter", f"w={wrong}", "--port", "0"]) == 2
    assert "made for" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(files["model"]), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_without_fastapi_serve_says_what_to_install_before_any_work(files):
    code = ("import sys; sys.modules['fastapi'] = None\nfrom lorafit.cli import main\n"
            f"sys.exit(main(['serve', '--model', {str(files['model'])!r}, '--port', '0']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.strip().splitlines() == ["lorafit: error: lorafit serve needs fastapi, which is not installed: "
                                             "pip install 'lorafit[serve]'"]


LM_EVAL_TASK = """task: lorafit_reviews
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_target: " {{{{label}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow  # lm_eval's start takes ~15 s; needs pip install 'lm-eval[api]'
def test_lm_evaluation_harness_local_completions_against_the_server(server, files, reference, tmp_path):
    """docs/serve.md's lm-eval command, on a local task: its answers are the server's, equal to lorafit generate."""
    pytest.importorskip("lm_eval")
    rows = [{"text": t, "label": label} for t, label in [("the movie was good", "positive"),
                                                         ("the movie was bad", "negative")] * 3]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "reviews.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "reviews.jsonl"))
    args = (f"model=qv,base_url={server}/completions,tokenizer={files['model']},tokenized_requests=False,"
            "num_concurrent=4,max_retries=1")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                        "--include_path", str(tmp_path / "task"), "--tasks", "lorafit_reviews", "--output_path",
                        str(tmp_path / "out"), "--log_samples"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [samples] = (tmp_path / "out").rglob("samples_lorafit_reviews_*.jsonl")
    got = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(got) == len(rows)
    for sample in got:
        prompt = f"Review: {sample['doc']['text']}\nSentiment:"
        assert sample["resps"][0][0] == reference("qv", 8, prompt=prompt).split("\n")[0], sample


def test_sigterm_ends_running_requests_and_exits_0(served):
    """Last in the module: it ends the module's server."""
    proc, url = served
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    got: dict = {}
    started = threading.Event()

    def ask():
        text = ""
        for piece in client.completions.create(model="qv", prompt=PROMPTS[0], max_tokens=200, stream=True,
                                               temperature=0):
            started.set()
            text += piece.choices[0].text
            got["finish"] = piece.choices[0].finish_reason
        got["text"] = text
    worker = threading.Thread(target=ask)
    worker.start()
    assert started.wait(60)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0 and time.time() - t < 15
    worker.join(30)
    assert got.get("finish") in ("length", "stop")  # the running answer ended, not dropped
