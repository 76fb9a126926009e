"""lorafit probe on the model's device, checked on the CPU (no test here needs an accelerator).

* The meta device: the per-batch accumulation (exact gradients, sketches, the Fisher trace with sampled labels) and
  the Gauss-Newton product run with the model and batches on ``meta``, under a dispatch mode that records every op's
  output device: all on ``meta``, so nothing is made on the CPU behind the model's back.
* A sync counter: a TorchDispatchMode counts ``aten._local_scalar_dense`` (``.item()``, ``float(t)``) and
  ``aten.nonzero``, a TorchFunctionMode counts ``Tensor.tolist``, each by the innermost lorafit frame, over
  ``lorafit probe``'s own path (``run_probe`` on a tiny Llama checkpoint): the measurement reads once at the end,
  for 2 batches as for 4; the Newton probe reads ||g||², once per conjugate-gradient step, and the decrease.
* float32 accumulation (what MPS gets, forced here) against float64: the same ranks, spectra and gains within the
  bound lorafit.advise.probe's docstring states.
* ``lorafit probe --device cuda`` without CUDA: one error line, exit 2, no model loaded, nothing written; with a
  (pretended) GPU the first line names it and the model is asked onto cuda:0.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import Loaded, counted_reads, make_data, make_model_dir, run_cli, stop_at_load, tiny_llama
from lorafit import ConfigError, LoraConfig
from lorafit.advise import gauss_newton, probe_task
from lorafit.advise import probe as probe_module
from lorafit.advise.gauss_newton import gn_product
from lorafit.advise.probe import accumulate_gradients, probe
from lorafit.targets import select_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


def all_logits(model, batch):
    out = model(input_ids=batch["input_ids"]).logits
    return out.reshape(-1, out.shape[-1])  # (B·T, V)


def linear_names(model) -> list[str]:
    return [t.name for t in select_targets(model, LoraConfig(target_modules="all-linear"))]


# --- the meta device ----------------------------------------------------------------------------------------------

class OpDevices(TorchDispatchMode):
    """Records (op, device) of every op output that is not on ``device``."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.off = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.off += [(str(func), t.device) for t in tree_leaves(out)
                     if isinstance(t, torch.Tensor) and t.device.type != self.device]
        return out


def test_the_recorder_sees_a_tensor_made_on_the_cpu():
    with OpDevices("meta") as seen:
        torch.zeros(3, device="meta") + 1
        torch.zeros(3)
    assert seen.off == [("aten.zeros.default", torch.device("cpu"))]


@pytest.mark.parametrize("sketch", [None, 8], ids=["exact", "sketch"])
def test_the_accumulation_makes_every_tensor_on_the_models_device(sketch):
    model = tiny_llama().to("meta")
    names = linear_names(model)
    batches = [{"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")} for _ in range(2)]
    with OpDevices("meta") as seen:
        accs, lam = accumulate_gradients(model, batches, names, lm_loss, sketch=sketch, logits_fn=all_logits)
        if sketch is None:  # torch has no meta kernel for lstsq, which the sketch's spectrum solves
            spectra = [accs[n].spectrum() for n in names]
            assert all(t.device.type == "meta" for t in tree_leaves(spectra))
    assert seen.off == []
    for n in names:
        held = [t for t in vars(accs[n]).values() if isinstance(t, torch.Tensor)] + [lam[n]]
        assert held and all(t.device.type == "meta" for t in held), n
        assert lam[n].dtype == torch.float64  # meta has float64, as the CPU and CUDA do


def test_the_gauss_newton_product_makes_every_tensor_on_the_models_device():
    model = tiny_llama().to("meta")
    names = linear_names(model)[:3]
    batches = [{"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")} for _ in range(2)]
    v = {n: torch.zeros(model.get_submodule(n).weight.shape, device="meta") for n in names}
    with OpDevices("meta") as seen:
        hv = gn_product(model, batches, v, all_logits)
    # forward-mode AD gives a Python scalar in RMSNorm's pow and mean a 0-d zero tangent on the CPU, never filled
    lazy_zero = ("aten._efficientzerotensor.default", torch.device("cpu"))
    assert [op for op in seen.off if op != lazy_zero] == [] and all(hv[n].device.type == "meta" for n in names)


# --- host reads -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe-device")
    return make_model_dir(d / "m"), make_data(d / "d.jsonl", n=32)


def settings(files, **more) -> dict:
    model_dir, data = files
    return {"model": str(model_dir), "data": str(data), "batch_size": 4, "max_length": 48, "device": "cpu", **more}


@pytest.mark.parametrize("newton", [0, 3], ids=["gradient", "newton"])
def test_the_probe_reads_back_once_whatever_the_number_of_batches(files, monkeypatch, newton):
    """run_probe's measurement (gradient_spectra or newton_spectra: everything before the ranks are allocated on the
    host) over 2 and over 4 batches of the tiny checkpoint, through the CLI's default loss and curvature."""
    log: list[Counter] = []
    for fn in ("gradient_spectra", "newton_spectra"):
        monkeypatch.setattr(probe_module, fn, counted_reads(getattr(probe_module, fn), log))
    for n in (2, 4):
        probe_task.run_probe(settings(files), batches=n, newton=newton, say=lambda msg: None)
    want = {"advise/probe.py:to_host": 1}
    if newton:  # ||g||² before the first step, two numbers per step in one read, the decrease after the last
        want["advise/gauss_newton.py:newton_step"] = 1 + newton + 1
    assert [dict(r) for r in log] == [want, want]


# --- float32 accumulation -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_probes():
    """A tiny Llama's probe with float64 accumulation and with float32 (as on MPS), gradient and Newton spectra."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (4, 16), generator=g)} for _ in range(4)]
    runs = {}
    for dtype in (torch.float64, torch.float32):
        with pytest.MonkeyPatch.context() as mp:
            for module in (probe_module, gauss_newton):
                mp.setattr(module, "accumulation_dtype", lambda device, dtype=dtype: dtype)
            for newton in (0, 10):
                runs[dtype, newton] = probe(model, batches, loss_fn=lm_loss, logits_fn=all_logits, newton=newton)
    return runs


@pytest.mark.parametrize("newton", [0, 10], ids=["gradient", "newton"])
def test_float32_accumulation_gives_the_same_ranks_and_spectra_within_the_bound(tiny_probes, newton):
    """The bound of lorafit.advise.probe's docstring: spectra within 1e-5 of each module's largest singular value,
    energies, curvatures and gains within 1e-5 relative (measured here: 6e-7 and 5e-7), the same ranks."""
    r64, r32 = tiny_probes[torch.float64, newton], tiny_probes[torch.float32, newton]
    assert r32.ranks == r64.ranks and any(r64.ranks.values())
    for a, b in zip(r64.modules, r32.modules):
        assert b.effective_rank == a.effective_rank, a.name
        assert float((b.spectrum.double() - a.spectrum.double()).abs().max()) <= 1e-5 * float(a.spectrum[0]), a.name
        for field in ("energy", "fisher", "gain"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-5), (a.name, field)
    assert r32.score == pytest.approx(r64.score, rel=1e-5)


# --- the CLI's --device ---------------------------------------------------------------------------------------------



@pytest.mark.parametrize("dtype", [None, "float32"], ids=["dtype-by-device", "dtype-given"])
def test_probe_on_an_absent_device_is_one_error_line_before_any_work(files, capsys, tmp_path, monkeypatch, machine,
                                                                     dtype):
    """Without a dtype the settings resolve the device to choose one; with one (in --config), run_probe does."""
    from transformers import AutoModelForCausalLM

    machine(0)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: pytest.fail("a model loaded"))
    model_dir, data = files
    config = tmp_path / "c.yaml"
    config.write_text(f"dtype: {dtype}\n" if dtype else "{}\n")
    out = tmp_path / "probe"
    code, stdout, err = run_cli(capsys, "probe", "--model", model_dir, "--data", data, "--config", config,
                                "--device", "cuda", "--output", out)
    assert code == 2 and stdout == "", err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: --device cuda: CUDA is not available"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        probe_task.run_probe(settings(files, device="cuda", dtype="float32"), say=lambda msg: None)


def test_probe_reads_the_model_onto_the_device_it_names(files, capsys, tmp_path, monkeypatch, machine):

    machine(1)
    asked = stop_at_load(monkeypatch)
    model_dir, data = files
    config = tmp_path / "c.yaml"
    config.write_text("dtype: float32\n")  # the default dtype of a GPU asks the GPU, which is pretended here
    from lorafit.cli import main

    with pytest.raises(Loaded):
        main(["probe", "--model", str(model_dir), "--data", str(data), "--config", str(config), "--device", "cuda",
              "--output", str(tmp_path / "probe")])
    assert asked == ["cuda:0"] and not (tmp_path / "probe").exists()
    assert capsys.readouterr().out.splitlines()[0] == "device: cuda:0 (Fake GPU, float32) (the current GPU)"
