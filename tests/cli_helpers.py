"""A tiny random Llama checkpoint with a real (tiny, trained-here) tokenizer, and small data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("good great fine awful bad poor movie film plot actor scene story boring lovely dull superb "
         "terrible nice review sentiment positive negative the a was is and but very not").split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 4 + [" positive negative"] * 20 + ["Review: the movie was good\nSentiment: positive"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def make_model_dir(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_data(path: Path, n: int = 64, kind: str = "pc", seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            good = rng.random() < 0.5
            words = " ".join(rng.choice(WORDS[:8] if good else WORDS[3:11]) for _ in range(6))
            if kind == "pc":
                f.write(json.dumps({"prompt": f"Review: {words}\nSentiment:",
                                    "completion": " positive" if good else " negative"}) + "\n")
            else:
                f.write(json.dumps({"text": f"{words} is {'good' if good else 'bad'}"}) + "\n")
    return path
