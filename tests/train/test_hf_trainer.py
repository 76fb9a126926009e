"""lorafit adapters with transformers' own PEFT integration (``load_adapter``) and training loops (``Trainer``,
TRL's ``SFTTrainer``) through ``lorafit.hf_trainer.adapter_checkpoints``.

Tolerances: lorafit and PEFT/transformers compute the same function in different orders, so logits agree to rounding
(``close_to_scale``, 1e-5 of the largest |logit|); a resumed run replays the same float operations as an
uninterrupted one on one process (the same batches, RNG states, optimizer state), and is checked with
``close`` at rtol = atol = 1e-5 (it is bit-identical on CPU); lorafit's own save/load round trip is exact.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lorafit
from helpers import close, close_to_scale, make_model_dir, make_tokenizer, perturb_trainable
from lorafit.errors import AdapterError
from lorafit.hf_trainer import adapter_checkpoints, load_adapter, restore_adapter
from lorafit.peft_format import adapter_state_dict

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

RTOL = 1e-5
IDS = torch.tensor([[1, 5, 9, 30, 41, 77, 100, 120, 150, 6], [1, 60, 7, 8, 200, 33, 11, 90, 13, 2]])  # (2, 10)


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


# --- transformers' load_adapter reads lorafit's folders ---------------------------------------------------

DORA_UPSTREAM = ("transformers 5's load_adapter renames file keys with PEFT's build_peft_weight_mapping, which maps "
                 "the on-disk `lora_magnitude_vector` to `lora_magnitude_vector.default` instead of "
                 "`...default.weight` (PeftModel's own loader adds the `.weight`): DoRA magnitudes are reported "
                 "UNEXPECTED/MISSING and left at their init. Adapters saved by PEFT itself fail the same way; "
                 "lorafit.hf_trainer.load_adapter works around it (next test).")

LOAD_ADAPTER_CASES = {
    "lora": dict(target_modules="all-linear"),
    "rslora": dict(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "dora": dict(target_modules="all-linear", use_dora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules="all-linear",
                     rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6},
                     alpha_pattern={"v_proj": 3.0, "down_proj": 16}),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("llama") / "base")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=DORA_UPSTREAM))
                                  if c == "dora" else c for c in LOAD_ADAPTER_CASES])
def test_transformers_load_adapter_reads_lorafit_folders(case, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = lorafit.LoraConfig(**LOAD_ADAPTER_CASES[case])
    model = lorafit.attach(AutoModelForCausalLM.from_pretrained(llama_dir), cfg)
    perturb_trainable(model)
    lorafit.save(model, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    hf.load_adapter(str(tmp_path / "adapter"))
    close_to_scale(logits(hf), logits(model), rtol=RTOL, msg=f"load_adapter {case} vs lorafit")


@pytest.mark.parametrize("case", list(LOAD_ADAPTER_CASES))
def test_lorafit_load_adapter_reads_every_variant_into_transformers(case, llama_dir, tmp_path):
    """``lorafit.hf_trainer.load_adapter(hf_model, folder)``: transformers' own load_adapter, given the file's tensors
    with the magnitude keys its renaming maps (the workaround for the DoRA case above); PEFT's own DoRA folder too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = lorafit.LoraConfig(**LOAD_ADAPTER_CASES[case])
    model = lorafit.attach(AutoModelForCausalLM.from_pretrained(llama_dir), cfg)
    perturb_trainable(model)
    lorafit.save(model, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    info = load_adapter(hf, tmp_path / "adapter")
    assert not info.missing_keys and not info.unexpected_keys
    close_to_scale(logits(hf), logits(model), rtol=RTOL, msg=f"load_adapter {case} vs lorafit")
    if case == "dora":  # PEFT's own file of the same adapter
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter")
        peft_model.save_pretrained(tmp_path / "peft")
        hf2 = AutoModelForCausalLM.from_pretrained(llama_dir)
        load_adapter(hf2, tmp_path / "peft")
        close_to_scale(logits(hf2), logits(model), rtol=RTOL, msg="load_adapter of PEFT's DoRA folder")


def test_lorafit_load_adapter_names_what_it_left_unloaded(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = lorafit.attach(AutoModelForCausalLM.from_pretrained(llama_dir),
                           lorafit.LoraConfig(target_modules=["q_proj"]))
    lorafit.save(model, tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**raw, "target_modules": ["q_proj", "v_proj"]}))  # v_proj has no tensors
    with pytest.raises(AdapterError, match="partly unloaded: missing"):
        load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter")


# --- Trainer and SFTTrainer ---------------------------------------------------------------------------------

STEPS, SAVE_AT = 6, 3
CONFIG = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
TEXTS = [("Review: the movie was good\nSentiment:", " positive"), ("Review: awful dull plot\nSentiment:", " negative"),
         ("Review: a superb actor\nSentiment:", " positive"), ("Review: boring and bad\nSentiment:", " negative")] * 2


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A Llama wide enough (hidden 512, 5.0M parameters, a 20 MB model.safetensors) that a checkpoint's fixed
    files (tokenizer, trainer state, rng, args: ~60 kB) do not decide the size comparison."""
    return make_model_dir(tmp_path_factory.mktemp("trainer") / "base", hidden=512, intermediate=1024, heads=8,
                          kv_heads=4, positions=64)


def _model(base_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)  # the adapter's init (overwritten on resume)
    return lorafit.attach(AutoModelForCausalLM.from_pretrained(base_dir), lorafit.LoraConfig(**CONFIG))


def _trainer(kind: str, model, out):
    """A Trainer or SFTTrainer on the tiny data: no dropout, fixed seeds, float32 (SFTConfig defaults to bf16)."""
    tok = make_tokenizer()
    common = dict(output_dir=str(out), max_steps=STEPS, save_steps=SAVE_AT, per_device_train_batch_size=2,
                  learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0,
                  data_seed=0)
    if kind == "trainer":
        from transformers import Trainer, TrainingArguments

        enc = tok([p + c for p, c in TEXTS], padding="max_length", max_length=16, truncation=True)
        labels = [[t if m else -100 for t, m in zip(ids, mask)]
                  for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        data = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                           "labels": labels})
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, processing_class=tok)
    else:
        from trl import SFTConfig, SFTTrainer

        data = datasets.Dataset.from_dict({"prompt": [p for p, _ in TEXTS], "completion": [c for _, c in TEXTS]})
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, bf16=False, max_length=32), train_dataset=data,
                             processing_class=tok)
    return adapter_checkpoints(trainer)


@pytest.fixture(scope="module", params=["trainer", "sft"])
def run(request, base_dir, tmp_path_factory):
    """One uninterrupted run (checkpoints at steps 3 and 6, then ``save_model`` into its own folder)."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    trainer = _trainer(request.param, _model(base_dir), out)
    trainer.train()
    trainer.save_model()  # args.output_dir
    trainer.save_model(str(out / "final"))
    return request.param, out, trainer.model


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_checkpoint_holds_the_adapter_not_the_model(run, base_dir):
    _, out, _ = run
    ckpt = out / f"checkpoint-{SAVE_AT}"
    names = {f.name for f in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "training_args.bin"} <= names, names
    assert not any(n.startswith(("model", "pytorch_model")) or n == "config.json" for n in names), names
    # every file of the checkpoint against the base's weights file (what Trainer would have written as model.*)
    full = (base_dir / "model.safetensors").stat().st_size
    assert _size(ckpt) < 0.05 * full, (_size(ckpt), full)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in out.iterdir()}  # save_model()


def test_resume_ends_with_the_uninterrupted_adapter(run, base_dir, tmp_path):
    kind, out, trained = run
    shutil.copytree(out / f"checkpoint-{SAVE_AT}", tmp_path / "run" / f"checkpoint-{SAVE_AT}")
    fresh = _model(base_dir)  # the run's own init: without the restore, steps 4-6 would start from it and differ
    trainer = _trainer(kind, fresh, tmp_path / "run")
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == STEPS
    close(adapter_state_dict(fresh), adapter_state_dict(trained), rtol=1e-5, atol=1e-5,
          msg=f"{kind} resumed vs uninterrupted")


def test_final_adapter_loads_with_lorafit_and_peft(run, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kind, out, trained = run
    want = logits(trained)
    mine = lorafit.load(AutoModelForCausalLM.from_pretrained(base_dir), out / "final")
    assert torch.equal(logits(mine), want), kind  # the same tensors through the same code
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out / "final"))
    close_to_scale(logits(peft_model), want, rtol=RTOL, msg=f"{kind}: PeftModel vs the trained model")


def test_restore_refuses_another_adapter(run, base_dir):
    from transformers import AutoModelForCausalLM

    _, out, _ = run
    other = lorafit.attach(AutoModelForCausalLM.from_pretrained(base_dir),
                           lorafit.LoraConfig(r=4, target_modules=["q_proj"]))
    before = {k: t.clone() for k, t in adapter_state_dict(other).items()}  # (CPU tensors alias the model's)
    with pytest.raises(AdapterError, match="another config"):
        restore_adapter(other, out / "final")
    close(adapter_state_dict(other), before, rtol=0, atol=0)


def test_a_model_without_adapter_saves_as_trainer_does(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    adapter_checkpoints(Trainer(model=model, args=args)).save_model()
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
