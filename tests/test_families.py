"""The model families users distil, as tiny random models with each family's real quirks:
cache -> train (full and LoRA) -> export -> reload, through the Python API.

Quirks covered: tied and untied embeddings, Gemma-2 final logit soft-capping, a teacher whose
embedding is padded past the student's (Qwen2.5-7B 152064 rows vs 0.5B 151936, one
tokenizer), a 4-bit quantized teacher and a 4-bit student trained with LoRA (QLoRA)."""

from __future__ import annotations

import json
import os

import mlxdistill  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import pytest
from conftest import make_text, make_tokenizer
from mlx.utils import tree_flatten

QUIET = dict(quiet=True, log=lambda m: None)
GROUP = 32  # quantization group: every tiny linear layer has a multiple of 32 inputs


def family_config(family: str, dim: int, layers: int, vocab: int, tied: bool = True) -> dict:
    """A config.json for `family`, with the keys its real checkpoints carry."""
    heads, kv = 2, 1
    common = dict(hidden_size=dim, num_hidden_layers=layers, intermediate_size=2 * dim,
                  num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                  rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=2)  # the test tokenizer's <s> and </s>
    specific = {
        "llama": dict(rope_theta=500000.0),
        "mistral": dict(rope_theta=1000000.0, sliding_window=None),
        "qwen2": dict(rope_theta=1000000.0),
        "qwen3": dict(rope_theta=1000000.0, head_dim=dim // heads),
        "phi3": dict(rope_theta=10000.0, num_key_value_heads=heads),
        # Gemma always ties; the soft-cap keeps logits in (-cap, cap).
        "gemma2": dict(head_dim=dim // heads, query_pre_attn_scalar=dim // heads,
                       attn_logit_softcapping=50.0, final_logit_softcapping=5.0,
                       tie_word_embeddings=True),
        "gemma3_text": dict(head_dim=dim // heads, query_pre_attn_scalar=dim // heads,
                            sliding_window=16, sliding_window_pattern=2,
                            tie_word_embeddings=True),
        "starcoder2": dict(norm_epsilon=1e-5, rope_theta=100000.0),
    }[family]
    return {"model_type": family, **common, **specific}


def make_family_model(path: str, family: str, dim: int = 32, layers: int = 2, vocab: int = 64,
                      tied: bool = True, bits: int | None = None, seed: int = 0,
                      sharpen: float = 1.0) -> str:
    """A random `family` model saved as an mlx_lm folder (optionally 4/8-bit quantized)."""
    from mlx_lm.utils import _get_classes, save_config, save_model

    from mlxdistill import models

    os.makedirs(path, exist_ok=True)
    cfg = family_config(family, dim, layers, vocab, tied)
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(cfg))
    # `sharpen` peaks the output distribution, as a trained teacher's is, not near-uniform.
    emb = model.model.embed_tokens
    emb.weight = emb.weight * sharpen
    mx.eval(model.parameters())
    if bits:
        model, cfg = models.quantize(model, cfg, GROUP, bits)
    save_model(path, model)
    save_config(cfg, os.path.join(path, "config.json"))
    make_tokenizer(path)
    return path


# (case, family, teacher kwargs, student kwargs, train.mode). Full and LoRA alternate across
# families (both on llama) so every family trains and the matrix stays a few seconds each.
CASES = [
    ("llama-full", "llama", dict(dim=48), dict(), "full"),
    ("llama-lora", "llama", dict(dim=48), dict(), "lora"),
    ("mistral-untied", "mistral", dict(dim=48, tied=False), dict(tied=False), "full"),
    ("qwen2-padded-vocab", "qwen2", dict(dim=48, vocab=80, tied=False), dict(vocab=64), "lora"),
    ("qwen3-4bit-teacher", "qwen3", dict(dim=64, bits=4), dict(), "full"),
    ("gemma2-softcap", "gemma2", dict(dim=48), dict(), "lora"),
    # Gemma-3 alternates sliding-window and global layers: two layers hold one of each.
    ("gemma3-text", "gemma3_text", dict(dim=48), dict(layers=2), "full"),
    ("phi3-untied", "phi3", dict(dim=48, tied=False), dict(tied=False), "lora"),
    ("starcoder2-qlora", "starcoder2", dict(dim=48), dict(dim=64, bits=4), "lora"),
]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("family-data")
    return {k: make_text(str(d / f"{k}.jsonl"), n, seed=i)
            for i, (k, n) in enumerate([("train", 40), ("valid", 6), ("test", 6)])}


def family_pair(d, family: str, tkw: dict, skw: dict) -> tuple[str, str]:
    teacher = make_family_model(str(d / "teacher"), family, **{"layers": 2, "seed": 1, "sharpen": 4.0,
                                                               **tkw})
    student = make_family_model(str(d / "student"), family, **{"dim": 32, "layers": 1,
                                                               "seed": 2, **skw})
    return teacher, student


def overrides(teacher: str, student: str, texts: dict, d, mode: str) -> list[str]:
    o = {"teacher.model": teacher, "student.model": student, "data.train": texts["train"],
         "data.valid": texts["valid"], "data.test": texts["test"], "data.seq_len": 32,
         "data.max_rows": "null", "cache.dir": str(d / "cache"), "cache.shard_rows": 16,
         "run.dir": str(d / "run"), "train.mode": mode, "train.iters": 12,
         "train.batch_size": 4, "train.eval_every": 12, "train.save_every": 12,
         "train.warmup": 2, "train.eval_rows": 4, "train.lr": 1e-3 if mode == "lora" else 3e-3,
         "train.lora_rank": 4}
    return [f"{k}={v}" for k, v in o.items()]


@pytest.mark.parametrize("case,family,tkw,skw,mode", CASES, ids=[c[0] for c in CASES])
def test_family_cache_train_export_reload(case, family, tkw, skw, mode, texts, tmp_path):
    from mlx_lm.utils import load as mlx_load

    from mlxdistill import cache, export, models, trainer
    from mlxdistill.config import load_config

    teacher, student = family_pair(tmp_path, family, tkw, skw)
    cfg = load_config(None, overrides(teacher, student, texts, tmp_path, mode))
    res = trainer.train(cfg, **QUIET)

    # The cache covers the logits both models share: padded teacher rows are sliced off.
    m = cache.read_manifest(cfg.cache.dir)
    assert m["complete"] and m["vocab_size"] == min(tkw.get("vocab", 64), skw.get("vocab", 64))
    # Distillation moved the student towards the teacher on held-out text.
    before, after = res["student_before"], res["student_after"]
    assert after["kl"] < before["kl"], (case, before, after)

    run = cfg.run.dir
    if mode == "full":
        assert os.path.isfile(os.path.join(run, "model", "config.json"))
        saved = json.load(open(os.path.join(run, "model", "config.json")))
        assert saved["model_type"] == family
    else:
        ac = json.load(open(os.path.join(run, "adapter_config.json")))
        assert ac["fine_tune_type"] == "lora" and ac["model"] == student
        # mlx_lm reads the adapters back onto the student as they were trained.
        mlx_load(student, adapter_path=run)

    out = str(tmp_path / "export")
    rep = export.export_run(run, out, bits=16, log=lambda m: None)
    rt = rep["round_trip"]
    # float16 weights: the same predictions, logits within rounding
    assert rt["top1_agreement"] == 1.0 and rt["kl_reference_to_export"] < 1e-3, (case, rt)
    model, tok, config = models.load(out, "exported student")
    assert config["model_type"] == family
    if skw.get("bits"):  # QLoRA: the fused student stays 4-bit
        assert config["quantization"]["bits"] == skw["bits"]
    logits = model(mx.array([[1, 5, 6, 7, 8]]))
    assert logits.shape[-1] == config["vocab_size"] and mx.isfinite(logits).all().item()
    if family == "gemma2":  # soft-capped logits stay inside the cap after training
        assert mx.abs(logits).max().item() <= config["final_logit_softcapping"] + 1e-3
