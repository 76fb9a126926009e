"""lorafit.files beyond the atomic folder swap (tests/train/test_faults.py): the JSON reader's typed errors, the
figure writer, the appended log and its torn last line, and that no other module writes files by itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorafit import AdapterError, ConfigError, DataError
from lorafit.files import append_line, read_json, read_jsonl, write_figure, write_json

SRC = Path(__file__).resolve().parents[2] / "src" / "lorafit"


@pytest.mark.parametrize("error", [AdapterError, ConfigError, DataError])
def test_read_json_raises_the_callers_error_naming_the_file(error, tmp_path):
    with pytest.raises(error, match=r"none\.json does not exist; pass a folder"):
        read_json(tmp_path / "none.json", error=error, what="; pass a folder")
    (tmp_path / "torn.json").write_text('{"r": 8,')
    with pytest.raises(error, match=r"torn\.json is not valid JSON \(Expecting"):
        read_json(tmp_path / "torn.json", error=error)
    (tmp_path / "latin1.json").write_bytes('{"note": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(error, match=r"latin1\.json is not valid JSON \('utf-8' codec.*: it is not UTF-8 text"):
        read_json(tmp_path / "latin1.json", error=error)
    write_json(tmp_path / "ok.json", {"r": 8, "targets": ["q"]})
    assert read_json(tmp_path / "ok.json") == {"r": 8, "targets": ["q"]}


def test_write_figure_writes_png_atomically(tmp_path):
    """savefig would take the format from the temporary file's suffix; write_figure passes the target's."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    write_figure(tmp_path / "plot.png", fig)
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_appended_log_skips_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert read_jsonl(log) == []
    append_line(log, '{"step": 1}')
    append_line(log, '{"step": 2}\n')
    with open(log, "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a write
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]


# Where a module other than files.py may write a file itself, and why.
DIRECT_WRITERS = {
    "files.py": "the implementation",
    "peft_format.py": "save_file / write_text into the temporary file or folder of replace_file / writing_dir",
    "train/checkpoint.py": "torch.save into writing_dir's temporary folder",
    "advise/trial.py": "the trial process's stdout and stderr redirected to train.log: a stream, not a file to replace",
    "demo/assets.py": "downloads into a scratch folder that is removed; the cache itself goes through writing_dir",
    "hf_trainer.py": "training_args.bin into the transformers Trainer's checkpoint folder, which Trainer writes itself",
}
WRITE = re.compile(r"\.write_text\(|\.write_bytes\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']|savefig\(|torch\.save\(|"
                   r"save_file\(|os\.open\(")


def test_every_other_write_goes_through_lorafit_files():
    found = {}
    for path in SRC.rglob("*.py"):
        name = path.relative_to(SRC).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if WRITE.search(line) and "replace_file(" not in line and name not in DIRECT_WRITERS:
                found[f"{name}:{n}"] = line.strip()
    assert not found, f"write through lorafit.files (write_text, write_json, write_figure, replace_file): {found}"
