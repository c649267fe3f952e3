"""Build the embedded tokenizers, teachers and students under weights/ from data/train.jsonl.

    python scripts/build_weights.py                  # everything (resumes where it stopped)
    python scripts/build_weights.py --stage student  # one stage only

Stages:
  tokenizer  SentencePiece BPE, vocab 4096, byte fallback, trained on the train split;
             exported as tokenizer.model and an equivalent tokenizer.json (checked to
             encode the held-out splits identically), so mlx_lm and MLX Swift both load it.
  teacher    Llama, 6 x 384, ~12 M parameters, AdamW (wd 0.1), warmup + cosine,
             16 x 256-token batches, several epochs over the train split.
  teacher2   Llama, 4 x 256, ~4 M parameters, another seed, 300 steps: the second teacher
             of the multi-teacher run.
  student    Llama, 4 x 128, ~1.3 M parameters (14x fewer non-embedding parameters),
             briefly pre-trained with plain cross-entropy: weak, but not random.
  tokenizer-xtok
             a tokenizer of the other kind: byte-level BPE (GPT-2's ByteLevel pre-tokenizer
             and decoder, Ġ for a space, all 256 bytes in the initial alphabet, so any text
             encodes without an unknown token), vocab 4096 like the teacher's, trained with
             `tokenizers` on the same train split; <pad>, <s>, </s> at ids 0, 1, 2. Trained
             twice and compared byte for byte; mlx_lm and transformers must both load it and
             encode the held-out splits as `tokenizers` does, each record round-tripping.
  student-xtok
             the student with that tokenizer: weights/student's shape and CE pre-training
             (steps, lr, warmup, seed, data order) on the train split tokenized by it; only
             vocab_size follows the tokenizer. The student of cross-tokenizer distillation
             (align.py, xlosses.py) from the teacher's cache.
  bpb        bits per UTF-8 byte of every shipped model on the held-out splits: the one
             cross-entropy figure comparable across tokenizers. A forward pass, no training.

Seeded and deterministic; every stage checkpoints into --work and a killed build resumes
at the last checkpoint with the same data order. Weights are stored float16 (training is
float32). Held-out cross-entropy of each model goes to weights/build.json. `all` runs the
stages in the order above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

VOCAB = 4096
SEQ = 256
BATCH = 16
MODELS = {
    "teacher": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1024,
                    num_attention_heads=6, steps=1000, lr=1e-3, warmup=100, seed=1),
    # A second, smaller and differently seeded teacher: the other voice of the multi-teacher
    # run and a cheaper teacher for hidden-state distillation experiments.
    "teacher2": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704,
                     num_attention_heads=4, steps=300, lr=1.5e-3, warmup=60, seed=3),
    "student": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=320,
                    num_attention_heads=2, steps=60, lr=2e-3, warmup=10, seed=2),
}
# The student of the other tokenizer kind: MODELS["student"] in every respect but vocab_size.
XTOK = "student-xtok"
# Byte-level BPE needs no <unk> (every byte is a token); its id 0 is a pad instead, so <s>
# and </s> keep the ids model_args writes (1, 2).
XTOK_SPECIALS = ("<pad>", "<s>", "</s>")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ---------------------------------------------------------------- tokenizer

def save_fast(fast, folder: str) -> None:
    """tokenizer.json + tokenizer_config.json of a fast tokenizer, the config naming the
    generic class (what older transformers and swift-transformers know) and adding no
    BOS/EOS of its own (the data pipeline decides)."""
    fast.save_pretrained(folder)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False,
               add_eos_token=False)
    atomic_json(cfg_path, cfg)


def build_tokenizer(data: str, work: str) -> str:
    out = os.path.join(work, "tokenizer")
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        return out
    import io

    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    log("training SentencePiece tokenizer")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(read_texts(os.path.join(data, "train.jsonl"))),
        model_writer=buf, vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        # Keep newlines and indentation: the plays' line structure is part of the text.
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], max_sentence_length=100000,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())

    # The same BPE as a `tokenizers` object: transformers' own SentencePiece converter needs
    # protobuf and a slow tokenizer class; building it directly is short and checkable.
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    scores = {p: sp.get_score(i) for i, p in enumerate(pieces)}
    tk = Tokenizer(BPE(vocab, generate_merges(vocab, scores), unk_token="<unk>",
                       fuse_unk=True, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False)
                           for p in ("<unk>", "<s>", "</s>")])
    tk.add_tokens([AddedToken("\n", normalized=False, special=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=4096,
                                   clean_up_tokenization_spaces=False)
    for split in ("valid", "test"):
        for text in read_texts(os.path.join(data, f"{split}.jsonl")):
            if fast.encode(text, add_special_tokens=False) != sp.encode(text):
                raise SystemExit(f"error: tokenizer.json disagrees with SentencePiece on {split}")
    save_fast(fast, tmp)
    os.replace(tmp, out)
    return out


def _train_bytelevel(texts: list[str]):
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tk = Tokenizer(BPE())  # no unk_token: every byte is in the vocabulary
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                         special_tokens=list(XTOK_SPECIALS),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return tk


def build_tokenizer_xtok(data: str, work: str) -> str:
    """A byte-level BPE (GPT-2's kind) over the train split, as tokenizer.json and
    tokenizer_config.json in WORK/tokenizer-xtok."""
    out = os.path.join(work, "tokenizer-xtok")
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        return out
    from pathlib import Path

    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    log("training byte-level BPE tokenizer")
    texts = read_texts(os.path.join(data, "train.jsonl"))
    tk = _train_bytelevel(texts)
    # BpeTrainer counts words in hash maps: train again and compare, so that a rebuild can
    # never silently ship another vocabulary.
    if _train_bytelevel(texts).to_str() != tk.to_str():
        raise SystemExit("error: the byte-level BPE is not deterministic (two trainings differ)")
    got = [tk.token_to_id(t) for t in XTOK_SPECIALS]
    if got != [0, 1, 2] or tk.get_vocab_size() != VOCAB:
        raise SystemExit(f"error: byte-level BPE has specials at {got}, "
                         f"vocab {tk.get_vocab_size()}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=4096,
                                   clean_up_tokenization_spaces=False)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_fast(fast, tmp)
    # What users load (transformers, mlx_lm) encodes as `tokenizers` does, and every held-out
    # record decodes back to itself: no unknowns, nothing lost.
    loaded = [AutoTokenizer.from_pretrained(tmp), load_tokenizer(Path(tmp))]
    for split in ("valid", "test"):
        for text in read_texts(os.path.join(data, f"{split}.jsonl")):
            ids = tk.encode(text).ids
            if any(t.encode(text, add_special_tokens=False) != ids for t in loaded):
                raise SystemExit(f"error: a loaded tokenizer-xtok disagrees on {split}")
            if min(ids) < len(XTOK_SPECIALS) or tk.decode(ids) != text:
                raise SystemExit(f"error: tokenizer-xtok does not round-trip {split}")
    os.replace(tmp, out)
    return out


def token_stream(tok_dir: str, path: str) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids: list[int] = []
    for text in read_texts(path):
        ids.extend(tok.encode(text, add_special_tokens=False))
        ids.append(tok.eos_token_id)
    return np.asarray(ids, dtype=np.int32)


# ---------------------------------------------------------------- training

def model_args(spec: dict, vocab: int = VOCAB, max_positions: int = 1024) -> dict:
    """The mlx_lm Llama config of a MODELS entry (tied embeddings, ids 1/2 for <s>/</s>)."""
    heads = spec["num_attention_heads"]
    return dict(model_type="llama", hidden_size=spec["hidden_size"],
                num_hidden_layers=spec["num_hidden_layers"],
                intermediate_size=spec["intermediate_size"], num_attention_heads=heads,
                num_key_value_heads=heads, rms_norm_eps=1e-5, vocab_size=vocab,
                tie_word_embeddings=True, max_position_embeddings=max_positions,
                rope_theta=10000.0, bos_token_id=1, eos_token_id=2)


def batch_for_step(stream: np.ndarray, step: int, seed: int) -> np.ndarray:
    """Windows for `step`: each epoch is a seeded permutation of non-overlapping windows at a
    seeded offset, so the order is a pure function of (seed, step) and resume is exact."""
    n = (len(stream) - SEQ - 1) // SEQ
    epoch, i = divmod(step * BATCH, n)
    rows = []
    for j in range(BATCH):
        e, k = divmod(i + j, n)
        rng = np.random.default_rng([seed, epoch + e])
        off = int(rng.integers(0, SEQ))
        start = off + int(rng.permutation(n)[k]) * SEQ
        rows.append(stream[start:start + SEQ + 1])
    return np.stack(rows)


def lr_at(step: int, spec: dict) -> float:
    warm, total, peak = spec["warmup"], spec["steps"], spec["lr"]
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def heldout_ce(model, stream: np.ndarray) -> float:
    n = (len(stream) - 1) // SEQ
    x = stream[: n * SEQ + 1]
    tot, cnt = 0.0, 0
    for s in range(0, n, 16):
        rows = np.stack([x[r * SEQ:(r + 1) * SEQ + 1] for r in range(s, min(n, s + 16))])
        logits = model(mx.array(rows[:, :-1]))
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(rows[:, 1:]))
        tot += ce.sum().item()
        cnt += ce.size
    return tot / cnt


def bits_per_byte(model, tok_dir: str, data: str, recorded: dict | None = None) -> dict:
    """Bits per UTF-8 byte of the held-out splits: the nats of every token of the stream but
    the first (heldout_ce's windows, then the shorter last one), / ln 2 / the bytes of the
    split's text. Unlike CE per token, comparable across tokenizers. With `recorded` (a
    build.json entry), its valid_ce / test_ce must be what the same windows give now."""
    out = {}
    for split in ("valid", "test"):
        path = os.path.join(data, f"{split}.jsonl")
        stream = token_stream(tok_dir, path)
        n = (len(stream) - 1) // SEQ
        ce = heldout_ce(model, stream)
        if recorded and abs(ce - recorded[f"{split}_ce"]) > 2e-3:
            raise SystemExit(f"error: {tok_dir} gives {split} CE {ce:.4f}, build.json "
                             f"{recorded[f'{split}_ce']}: not the model it describes")
        nats = ce * n * SEQ
        rest = stream[n * SEQ:]
        if len(rest) > 1:
            logits = model(mx.array(rest[None, :-1]))
            nats += nn.losses.cross_entropy(logits.astype(mx.float32),
                                            mx.array(rest[None, 1:])).sum().item()
        nbytes = sum(len(t.encode("utf-8")) for t in read_texts(path))
        out[f"{split}_bpb"] = round(nats / math.log(2) / nbytes, 4)
    return out


def load_shipped(dest: str):
    """A shipped folder's model as the build measures it: float16 weights, float32 compute."""
    with open(os.path.join(dest, "config.json")) as f:
        model = llama.Model(llama.ModelArgs.from_dict(json.load(f)))
    model.load_weights(os.path.join(dest, "model.safetensors"))
    model.set_dtype(mx.float32)
    return model


def save_checkpoint(ckdir: str, step: int, model, opt) -> None:
    """Weights + optimizer state as step-NNNNNN (temp dir renamed), then latest.json; only
    the newest checkpoint is kept."""
    d = os.path.join(ckdir, f"step-{step:06d}")
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_weights(os.path.join(tmp, "model.safetensors"))
    mx.save_safetensors(os.path.join(tmp, "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    atomic_json(os.path.join(ckdir, "latest.json"), {"step": step})
    for old in os.listdir(ckdir):
        if old.startswith("step-") and old != os.path.basename(d):
            shutil.rmtree(os.path.join(ckdir, old), ignore_errors=True)


def restore_checkpoint(ckdir: str, name: str, model, opt) -> int:
    """The step of the last checkpoint in ckdir, loaded into model and opt (0 if none)."""
    latest = os.path.join(ckdir, "latest.json")
    if not os.path.exists(latest):
        return 0
    with open(latest) as f:
        step = json.load(f)["step"]
    d = os.path.join(ckdir, f"step-{step:06d}")
    model.load_weights(os.path.join(d, "model.safetensors"))
    opt.init(model.trainable_parameters())
    opt.state = tree_unflatten(list(mx.load(os.path.join(d, "optimizer.safetensors")).items()))
    log(f"{name}: resuming at step {step}")
    return step


def train_model(name: str, spec: dict, train: np.ndarray, valid: np.ndarray, work: str,
                vocab: int = VOCAB):
    ckdir = os.path.join(work, name)
    os.makedirs(ckdir, exist_ok=True)
    mx.random.seed(spec["seed"])
    model = llama.Model(llama.ModelArgs.from_dict(model_args(spec, vocab)))
    opt = optim.AdamW(learning_rate=spec["lr"], weight_decay=0.1)
    step = restore_checkpoint(ckdir, name, model, opt)
    mx.eval(model.parameters())
    nparams = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"{name}: {nparams / 1e6:.2f} M parameters, {spec['steps']} steps of {BATCH}x{SEQ}")

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y).mean()

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    t0, seen, losses = time.time(), 0, []
    while step < spec["steps"]:
        opt.learning_rate = mx.array(lr_at(step, spec))
        b = mx.array(batch_for_step(train, step, spec["seed"]))
        loss = train_step(b[:, :-1], b[:, 1:])
        mx.eval(loss, state)
        losses.append(loss.item())
        step += 1
        seen += BATCH * SEQ
        if step % 25 == 0 or step == spec["steps"]:
            tps = seen / (time.time() - t0)
            log(f"{name}: step {step}/{spec['steps']} loss {np.mean(losses):.3f} "
                f"lr {lr_at(step - 1, spec):.2e} {tps:.0f} tok/s")
            losses = []
        if step % 50 == 0 or step == spec["steps"]:
            save_checkpoint(ckdir, step, model, opt)
    return model


def export(name: str, spec: dict, model, tok_dir: str, out: str, **args) -> str:
    """OUT/NAME as an mlx_lm folder: float16 weights, config (model_args(spec, **args)) and
    the tokenizer files, written under a temp name and renamed."""
    dest = os.path.join(out, name)
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(os.path.join(tmp, "model.safetensors"), weights,
                        metadata={"format": "mlx"})
    cfg = model_args(spec, **args)
    cfg["torch_dtype"] = "float16"
    atomic_json(os.path.join(tmp, "config.json"), cfg)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def other_kind(args, stage: str) -> None:
    """The stages of the byte-level tokenizer and its student, and bits per byte of every
    shipped model (all three for `all`)."""
    from tokenizers import Tokenizer

    tok_dir = build_tokenizer_xtok(args.data, args.work)
    if stage == "tokenizer-xtok":
        return
    report_path = os.path.join(args.out, "build.json")
    report = {}
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    if stage in ("all", XTOK):
        vocab = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).get_vocab_size()
        train = token_stream(tok_dir, os.path.join(args.data, "train.jsonl"))
        valid = token_stream(tok_dir, os.path.join(args.data, "valid.jsonl"))
        test = token_stream(tok_dir, os.path.join(args.data, "test.jsonl"))
        log(f"{XTOK} tokens: train {len(train)}, valid {len(valid)}, test {len(test)}")
        spec = MODELS["student"]  # --student-steps included: the same pre-training
        t0 = time.time()
        model = train_model(XTOK, spec, train, valid, args.work, vocab=vocab)
        dest = export(XTOK, spec, model, tok_dir, args.out, vocab=vocab)
        model.load_weights(os.path.join(dest, "model.safetensors"))
        model.set_dtype(mx.float32)
        nparams = sum(v.size for _, v in tree_flatten(model.parameters()))
        report[XTOK] = dict(
            tokenizer="byte-level BPE", vocab_size=vocab,
            params=nparams, non_embedding_params=nparams - vocab * spec["hidden_size"],
            steps=spec["steps"], tokens_seen=spec["steps"] * BATCH * SEQ,
            epochs=round(spec["steps"] * BATCH * SEQ / len(train), 2),
            valid_ce=round(heldout_ce(model, valid), 4), test_ce=round(heldout_ce(model, test), 4),
            **bits_per_byte(model, dest, args.data),
            train_minutes_this_run=round((time.time() - t0) / 60, 1),
        )
        log(f"{XTOK}: {report[XTOK]}")
        os.makedirs(args.out, exist_ok=True)
        atomic_json(report_path, report)
    if stage in ("all", "bpb"):
        for name in report:
            dest = os.path.join(args.out, name)
            if os.path.exists(os.path.join(dest, "model.safetensors")):
                t0 = time.time()
                report[name].update(bits_per_byte(load_shipped(dest), dest, args.data,
                                                  recorded=report[name]))
                log(f"{name}: {report[name]} ({time.time() - t0:.0f} s)")
                atomic_json(report_path, report)


def main() -> None:
    ap = argparse.ArgumentParser(description="Build weights/ (tokenizer, teacher, student).")
    ap.add_argument("--data", default="data")
    ap.add_argument("--out", default="weights")
    ap.add_argument("--work", default="build/weights", help="checkpoints (resumable)")
    ap.add_argument("--stage", choices=["all", "tokenizer", "teacher", "teacher2", "student",
                                        "tokenizer-xtok", XTOK, "bpb"], default="all")
    ap.add_argument("--teacher-steps", type=int, default=MODELS["teacher"]["steps"])
    ap.add_argument("--student-steps", type=int, default=MODELS["student"]["steps"])
    args = ap.parse_args()
    MODELS["teacher"]["steps"] = args.teacher_steps
    MODELS["student"]["steps"] = args.student_steps
    os.makedirs(args.work, exist_ok=True)
    if args.stage in ("tokenizer-xtok", XTOK, "bpb"):
        return other_kind(args, args.stage)
    tok_dir = build_tokenizer(args.data, args.work)
    if args.stage == "tokenizer":
        return
    train = token_stream(tok_dir, os.path.join(args.data, "train.jsonl"))
    valid = token_stream(tok_dir, os.path.join(args.data, "valid.jsonl"))
    test = token_stream(tok_dir, os.path.join(args.data, "test.jsonl"))
    log(f"tokens: train {len(train)}, valid {len(valid)}, test {len(test)}")
    report_path = os.path.join(args.out, "build.json")
    report = {}
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    for name in ("teacher", "teacher2", "student"):
        if args.stage not in ("all", name):
            continue
        spec = MODELS[name]
        t0 = time.time()
        model = train_model(name, spec, train, valid, args.work)
        dest = export(name, spec, model, tok_dir, args.out)
        # Measure what is shipped: the float16 weights, as a user will load them.
        model.load_weights(os.path.join(dest, "model.safetensors"))
        model.set_dtype(mx.float32)
        nparams = sum(v.size for _, v in tree_flatten(model.parameters()))
        emb = VOCAB * spec["hidden_size"]
        report[name] = dict(
            params=nparams, non_embedding_params=nparams - emb, steps=spec["steps"],
            tokens_seen=spec["steps"] * BATCH * SEQ, epochs=round(spec["steps"] * BATCH * SEQ
                                                                  / len(train), 2),
            valid_ce=round(heldout_ce(model, valid), 4), test_ce=round(heldout_ce(model, test), 4),
            train_minutes_this_run=round((time.time() - t0) / 60, 1),
        )
        log(f"{name}: {report[name]}")
        os.makedirs(args.out, exist_ok=True)
        atomic_json(report_path, report)
    if args.stage == "all":
        other_kind(args, "all")


if __name__ == "__main__":
    main()
