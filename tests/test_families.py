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
from conftest import WORDS, make_text, make_tokenizer

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

    from mlxdistill import saving

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
        model, cfg = saving.quantize(model, cfg, GROUP, bits)
    save_model(path, model)
    save_config(cfg, os.path.join(path, "config.json"))
    # transformers builds a Qwen2Tokenizer (byte-level BPE) for model_type qwen2 whatever the
    # tokenizer.json holds, so a Qwen model gets a byte-level BPE vocabulary, like the real one.
    make_bpe_tokenizer(path) if family == "qwen2" else make_tokenizer(path)
    return path


def make_bpe_tokenizer(path: str) -> None:
    """A byte-level BPE trained on the test words (about 300 tokens; deterministic, so two
    folders made by it share one vocabulary fingerprint)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([" ".join(WORDS)] * 5 + [" " + w for w in WORDS], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


# (case, family, teacher kwargs, student kwargs, train.mode). Full and LoRA alternate across
# families (both on llama) so every family trains and the matrix stays a few seconds each.
CASES = [
    ("llama-full", "llama", dict(dim=48), dict(), "full"),
    ("llama-lora", "llama", dict(dim=48), dict(), "lora"),
    ("mistral-untied", "mistral", dict(dim=48, tied=False), dict(tied=False), "full"),
    # Qwen2.5-7B pads its embedding past the 0.5B's (152064 vs 151936 rows), one tokenizer.
    ("qwen2-padded-vocab", "qwen2", dict(dim=48, vocab=384, tied=False), dict(vocab=320),
     "lora"),
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

    from mlxdistill import api, cache, export, models
    from mlxdistill.config import load_config

    teacher, student = family_pair(tmp_path, family, tkw, skw)
    cfg = load_config(None, overrides(teacher, student, texts, tmp_path, mode))
    res = api.train(cfg, **QUIET)

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


# ---------------------------------------------------------------- chat templates

def set_chat_template(model_dir: str, template: str) -> None:
    path = os.path.join(model_dir, "tokenizer_config.json")
    with open(path) as f:
        tc = json.load(f)
    tc["chat_template"] = template
    with open(path, "w") as f:
        json.dump(tc, f)


# Role markers are words of the test vocabulary, so the rendering is visible in the ids.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}lord {% else %}lady {% endif %}"
            "{{ m['content'] }} . {% endfor %}")


def chat_data(path) -> str:
    with open(path, "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": "speak the king"},
                {"role": "assistant", "content": "the queen weep" + " and" * (i % 3)}]}) + "\n")
    return str(path)


def chat_cfg(teacher, student, data, d):
    from mlxdistill.config import load_config

    return load_config(None, [f"teacher.model={teacher}", f"student.model={student}",
                              f"data.train={data}", "data.valid=null", "data.test=null",
                              "data.seq_len=16", f"cache.dir={d / 'cache'}",
                              f"run.dir={d / 'run'}"])


def test_chat_data_rendered_with_the_shared_template(tmp_path, caplog):
    """Both models carry the template: the cached rows (which the student trains on) are the
    template's rendering, assistant turns trained, no warning."""
    from mlxdistill import cache, models

    teacher, student = family_pair(tmp_path, "qwen3", dict(dim=32), dict())
    for m in (teacher, student):
        set_chat_template(m, TEMPLATE)
    cfg = chat_cfg(teacher, student, chat_data(tmp_path / "chat.jsonl"), tmp_path)
    with caplog.at_level("WARNING", logger="mlxdistill"):
        cache.build(cfg, quiet=True, log=lambda m: None)
    assert not [r for r in caplog.records if "chat template" in r.getMessage()]
    _, tok = models.load_meta(teacher, "teacher")
    first = cache.ShardReader(cfg.cache.dir).load_shard(0)
    rendered = list(tok.apply_chat_template(
        [{"role": "user", "content": "speak the king"},
         {"role": "assistant", "content": "the queen weep"}], tokenize=True))
    ids, mask = first["input_ids"][0], first["loss_mask"][0]
    assert list(ids[:len(rendered)]) == rendered
    vocab = tok.get_vocab()
    assert ids[0] == vocab["lord"] and vocab["lady"] in ids[:len(rendered)]
    # Position t trains token t+1: "speak the king ." (user) untrained, "the queen weep ." +
    # EOS (assistant and document end) trained.
    lady = list(ids).index(vocab["lady"])
    assert not mask[:lady - 1].any() and mask[lady:len(rendered)].all()


def test_differing_chat_templates_warn_with_the_reason(tmp_path, caplog):
    from mlxdistill import cache

    teacher, student = family_pair(tmp_path, "llama", dict(dim=32), dict())
    set_chat_template(teacher, TEMPLATE)
    set_chat_template(student, TEMPLATE.replace("lady", "lord"))
    cfg = chat_cfg(teacher, student, chat_data(tmp_path / "chat.jsonl"), tmp_path)
    with caplog.at_level("WARNING", logger="mlxdistill"):
        cache.build(cfg, quiet=True, log=lambda m: None)
    msgs = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert "'lord hello . lady hi . '" in msgs[0] and "'lord hello . lord hi . '" in msgs[0]
    assert "teacher's template for both" in msgs[0]


# ---------------------------------------------------------------- bad input, through the CLI

def test_different_tokenizers_one_error_with_both_fingerprints(texts, tmp_path):
    from click.testing import CliRunner
    from test_cli import assert_one_line_error

    from mlxdistill import models
    from mlxdistill.cli import main

    teacher, student = family_pair(tmp_path, "llama", dict(dim=32), dict())
    make_tokenizer(student, words=list(reversed(WORDS)))  # same words, other ids
    fps = [models.vocab_fingerprint(models.load_meta(p, "m")[1])[:12] for p in (teacher, student)]
    res = CliRunner().invoke(main, ["cache", "-q", *overrides(teacher, student, texts,
                                                               tmp_path, "full")])
    assert res.exit_code == 2
    assert_one_line_error(res, "tokenizers differ", f"teacher {fps[0]}", f"student {fps[1]}",
                          "teacher's family")
    # A cache built for a matching student, then trained with the other one: the same.
    same = make_family_model(str(tmp_path / "same"), "llama", layers=1, seed=3)
    res = CliRunner().invoke(main, ["cache", "-q", *overrides(teacher, same, texts, tmp_path,
                                                               "full")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train", "-q", *overrides(teacher, student, texts,
                                                               tmp_path, "full")])
    assert res.exit_code == 2
    assert_one_line_error(res, "tokenizers differ", f"teacher {fps[0]}", f"student {fps[1]}",
                          "cannot be aligned", "teacher's family")


@pytest.mark.parametrize("command", ["cache", "plan"])
def test_unknown_architecture_names_the_model_type(command, texts, tmp_path):
    from click.testing import CliRunner
    from test_cli import assert_one_line_error

    from mlxdistill.cli import main

    teacher, student = family_pair(tmp_path, "llama", dict(dim=32), dict())
    cpath = os.path.join(teacher, "config.json")
    cfg = json.load(open(cpath))
    cfg["model_type"] = "nosuchformer"
    json.dump(cfg, open(cpath, "w"))
    res = CliRunner().invoke(main, [command, *overrides(teacher, student, texts, tmp_path,
                                                        "full")])
    assert res.exit_code == 2
    assert_one_line_error(res, "'nosuchformer'", "mlx_lm does not support", teacher)
