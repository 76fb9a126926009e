"""lorafit.sweep: grid parsing, the Pareto front, training a small grid on a tiny Llama, resuming, and the CLI."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import yaml

from helpers import make_data, make_model_dir, tiny_gpt2, tiny_llama
from lorafit import ConfigError, LoraConfig
from lorafit.advise.sweep import pareto_front, parse_grid, point_config, point_name, sweep

FAST = dict(steps=6, batch_size=4, max_length=48, lr=5e-3, eval_max=8, save_every=0)


def test_parse_grid_is_the_product_with_defaults():
    points = parse_grid("r=4,8; targets=qv,all-linear ;variant=lora,dora")
    assert len(points) == 8
    assert points[0] == {"r": 4, "targets": "qv", "variant": "lora", "alpha": 16.0}  # suggest.LORA_ALPHA
    assert points[-1] == {"r": 8, "targets": "all-linear", "variant": "dora", "alpha": 16.0}
    assert parse_grid("r=16") == [{"r": 16, "targets": "qv", "variant": "lora", "alpha": 16.0}]
    assert parse_grid("alpha=8,2r;r=4")[0]["alpha"] == 8.0
    assert [point_name(p) for p in parse_grid("r=4;targets=q_proj+v_proj;variant=rslora;alpha=12")] == \
        ["r4-q_proj_v_proj-rslora-a12"]


@pytest.mark.parametrize("spec, match", [("r=0", "positive integers"), ("r=four", "positive integers"),
                                         ("rank=4", "key one of"), ("r=4;r=8", "twice"), ("variant=qlora", "variant"),
                                         ("alpha=-1", "alpha"), ("", "empty"), ("targets=", "no values")])
def test_parse_grid_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(spec)


def test_point_config_resolves_targets_per_architecture():
    p = {"r": 4, "targets": "qv", "variant": "dora", "alpha": "2r"}
    cfg = point_config(tiny_llama(), p)
    assert cfg == LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    assert point_config(tiny_gpt2(), p).target_modules == ["c_attn"]
    cfg = point_config(tiny_llama(), {"r": 8, "targets": "mlp", "variant": "rslora", "alpha": 4.0})
    assert cfg.target_modules == ["gate_proj", "up_proj", "down_proj"] and cfg.use_rslora and cfg.lora_alpha == 4
    assert point_config(tiny_llama(), {**p, "targets": "q_proj+o_proj"}).target_modules == ["q_proj", "o_proj"]


def test_pareto_front():
    rows = [{"name": n, "trainable": t, "eval_loss": loss} for n, t, loss in
            [("a", 100, 1.0), ("b", 200, 0.8), ("c", 300, 0.9), ("d", 400, 0.5), ("e", 100, 1.2), ("f", 50, 2.0)]]
    assert pareto_front(rows) == {"f", "a", "b", "d"}


def test_a_half_written_or_unfinished_state_is_not_a_finished_point(tmp_path):
    from lorafit.advise.sweep import _finished

    state = tmp_path / "trainer_state.json"
    assert _finished(tmp_path) is None
    for text in ('{"finished": tr', '{"finished": false}', "[1]"):
        state.write_text(text)
        assert _finished(tmp_path) is None, text
    state.write_text('{"finished": true, "trainable": 4}')
    assert _finished(tmp_path) == {"finished": True, "trainable": 4}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    return make_model_dir(d / "m"), make_data(d / "d.jsonl")


def test_sweep_trains_each_point_once_and_resumes(files, tmp_path, monkeypatch):
    import lorafit.train as train

    model_dir, data = files
    settings = dict(model=str(model_dir), data=str(data), **FAST)
    llama = tiny_llama()
    points = {point_name(p): point_config(llama, p) for p in parse_grid("r=2;targets=qv")}
    points["probed"] = LoraConfig(r=2, lora_alpha=4, target_modules=["model.layers.1.mlp.up_proj"])
    out = tmp_path / "sweep"
    rows = sweep(points, settings, out, marked={"probed": "probed"}, say=lambda m: None)
    assert [r["name"] for r in rows] == ["r2-qv-lora", "probed"]
    assert rows[0]["trainable"] == 2 * 2 * (64 + 64) + 2 * 2 * (64 + 32)  # q (64->64) and v (64->32), two layers
    assert all(r["eval_loss"] < r["eval_loss_before"] for r in rows) and rows[1]["mark"] == "probed"
    assert {f.name for f in out.iterdir()} >= {"results.csv", "results.md", "pareto.png", "r2-qv-lora"}
    table = list(csv.DictReader((out / "results.csv").open()))
    assert len(table) == 2 and {t["pareto"] for t in table} <= {"True", "False"}
    assert "| probed (probed) |" in (out / "results.md").read_text()

    # a rerun reads every finished point back; a half-finished point resumes in its folder
    state = json.loads((out / "probed" / "trainer_state.json").read_text())
    (out / "probed" / "trainer_state.json").unlink()
    trained = []
    real_run = train.run
    monkeypatch.setattr(train, "run", lambda cfg, resume=False, quiet=False, **kw: trained.append((cfg.output, resume))
                        or real_run(cfg, resume=resume, quiet=quiet))
    again = sweep(points, settings, out, marked={"probed": "probed"}, say=lambda m: None)
    assert trained == [(str(out / "probed"), True)]
    assert again[0]["eval_loss"] == rows[0]["eval_loss"] and again[1]["trainable"] == state["trainable"]

    # the same folder with other settings is refused rather than mixed
    with pytest.raises(ConfigError, match="different settings \\(steps\\)") as e:
        sweep(points, {**settings, "steps": 7}, out, say=lambda m: None)
    assert "dtype" not in str(e.value)
    # a dtype that differs (the demo's is timed at startup) says how to name the saved one
    other = "bfloat16" if settings.get("dtype", "float32") == "float32" else "float32"
    with pytest.raises(ConfigError, match="different settings \\(dtype\\).*'dtype: .*' in --config"):
        sweep(points, {**settings, "dtype": other}, out, say=lambda m: None)
    # every point trained with suggest's warm-up, as tune's trials do; another warm-up is told the saved one
    assert yaml.safe_load((out / "probed" / "config.yaml").read_text())["warmup_ratio"] == 0.1
    with pytest.raises(ConfigError, match="different settings \\(warmup_ratio\\).*'warmup_ratio: 0.1' in --config"):
        sweep(points, {**settings, "warmup_ratio": 0.0}, out, say=lambda m: None)
    # a point saved before the default warm-up (no warmup_ratio written) had none, and the hint names that
    saved = yaml.safe_load((out / "probed" / "config.yaml").read_text())
    del saved["warmup_ratio"]
    (out / "probed" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="'warmup_ratio: 0.0' in --config"):
        sweep(points, settings, out, say=lambda m: None)


def test_cli_sweep_with_suggested_and_probed_points(files, tmp_path, capsys):
    from lorafit.cli.advise import add_parsers as add_guidance_parsers

    model_dir, data = files
    p = argparse.ArgumentParser()
    add_guidance_parsers(p.add_subparsers(dest="command"))
    out = tmp_path / "cli-sweep"
    argv = ["sweep", "--model", str(model_dir), "--data", str(data), "--include-suggested",
            "--include-probed", "--budget", "2000", "--steps", "4", "--batch-size", "4", "--max-length", "48",
            "--eval-max", "8", "--output", str(out)]
    args = p.parse_args(argv)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "(suggested)" in text and "(probed)" in text and "pareto.png" in text
    assert (out / "probed.yaml").is_file() and (out / "pareto.png").stat().st_size > 0
    rows = {r["name"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"suggested", "probed"}
    assert int(rows["probed"]["trainable"]) <= 2000 and int(rows["suggested"]["trainable"]) <= 2000
    args = p.parse_args(argv)  # resumed: nothing is retrained, the probe is not rerun
    assert args.func(args) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2
    with pytest.raises(ConfigError, match="nothing to sweep"):
        args = p.parse_args(["sweep", "--model", str(model_dir), "--data", str(data)])
        args.func(args)
