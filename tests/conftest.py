"""Tiny models, tokenizers and data made in-test: the suite needs no network and runs in
seconds per test on a 2-core CPU."""

from __future__ import annotations

import json
import os
import random

import mlxdistill  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="session")
def _hash_memo(tmp_path_factory):
    """Weight hashes remembered in the session's own file, not the user's ~/.cache (tests
    that check the memo set their own); subprocesses inherit it through the environment."""
    if "MLXDISTILL_HASH_MEMO" not in os.environ:
        os.environ["MLXDISTILL_HASH_MEMO"] = str(tmp_path_factory.mktemp("memo") / "hashes.json")
WORDS = ("the king queen lord lady sword crown night day love death ghost castle sea storm "
         "speak hear see come go stay fly fight weep laugh dream sleep wake my thy your "
         "our his her and but or yet not now then here there").split()


def make_tokenizer(path: str, words=WORDS) -> None:
    """A word-level tokenizer in tokenizer.json form (what mlx_lm and MLX Swift read)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ".": 3, ",": 4}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)


def make_model(path: str, vocab: int = 64, dim: int = 32, layers: int = 2, seed: int = 0,
               sharpen: float = 1.0, ctx: int = 512, words=WORDS) -> str:
    """A random Llama saved as an mlx_lm folder. `sharpen` scales the (tied) embedding so the
    output distribution is peaked, like a trained model's, instead of near-uniform."""
    from mlx_lm.models import llama

    os.makedirs(path, exist_ok=True)
    cfg = dict(model_type="llama", hidden_size=dim, num_hidden_layers=layers,
               intermediate_size=2 * dim, num_attention_heads=2, num_key_value_heads=2,
               rms_norm_eps=1e-5, vocab_size=vocab, tie_word_embeddings=True,
               max_position_embeddings=ctx, rope_theta=10000.0)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * sharpen
    mx.save_safetensors(os.path.join(path, "model.safetensors"), weights)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    make_tokenizer(path, words)
    return path


def make_text(path: str, n_docs: int = 60, seed: int = 0, words=WORDS) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            sent = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + " ."
                    for _ in range(rng.randint(3, 8))]
            f.write(json.dumps({"text": " ".join(sent)}) + "\n")
    return path


def prompt_completion(text_path: str, out: str, prompt_words: int,
                      completion_words: int | None = None) -> str:
    """The text records of `text_path` as prompt/completion records: the first
    `prompt_words` words the prompt, the next `completion_words` (all: None) the completion."""
    end = None if completion_words is None else prompt_words + completion_words
    with open(text_path) as f, open(out, "w") as o:
        for line in f:
            words = json.loads(line)["text"].split()
            o.write(json.dumps({"prompt": " ".join(words[:prompt_words]),
                                "completion": " " + " ".join(words[prompt_words:end])}) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A teacher/student pair sharing one tokenizer, and train/valid/test text."""
    d = tmp_path_factory.mktemp("tiny")
    return {
        "teacher": make_model(str(d / "teacher"), dim=48, layers=2, seed=1, sharpen=4.0),
        "student": make_model(str(d / "student"), dim=16, layers=1, seed=2),
        "train": make_text(str(d / "train.jsonl"), 80, seed=0),
        "valid": make_text(str(d / "valid.jsonl"), 10, seed=1),
        "test": make_text(str(d / "test.jsonl"), 10, seed=2),
        "dir": d,
    }


def tiny_overrides(tiny: dict, tmp, **extra) -> list[str]:
    """KEY=VALUE overrides that point the default config at the tiny pair."""
    base = {
        "teacher.model": tiny["teacher"], "student.model": tiny["student"],
        "data.train": tiny["train"], "data.valid": tiny["valid"], "data.test": tiny["test"],
        "data.seq_len": 32, "data.max_rows": None, "cache.dir": str(tmp / "cache"),
        "cache.shard_rows": 16, "run.dir": str(tmp / "run"), "train.iters": 8,
        "train.batch_size": 4, "train.eval_every": 4, "train.save_every": 4,
        "train.warmup": 2, "train.eval_rows": 4, "train.lr": 3e-3,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]
