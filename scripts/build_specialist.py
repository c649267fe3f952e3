"""Build the embedded task specialist under weights/specialist/ from data/task/ (see
scripts/make_task.py): a character-level tokenizer, a teacher trained on the worked
solutions, and an untrained student more than 8x smaller for the distillation benchmark.

    python scripts/build_specialist.py                     # everything (resumes)
    python scripts/build_specialist.py --steps 20         # a smoke run
    python scripts/build_specialist.py --stage tokenizer

Stages:
  tokenizer  one token per character of the task's alphabet (digits, + - = : c b, the place
             tags u t h k U T H K, the letters of "Answer", space, newline) plus <unk> <s>
             </s>, as tokenizer.json: arithmetic is learnt column by column, which a
             tokenizer that merges digits would hide. mlx_lm and MLX Swift load it;
             encode/decode is checked to round-trip every held-out record through mlx_lm's
             loader.
  teacher    Llama 4 x 256 (3.42 M parameters, under 10 MB in float16), trained with
             cross-entropy on the completions (prompt masked) of data/task/train.jsonl.
  student    Llama 3 x 96, random initialisation (seeded): what every benchmark variant
             starts from, so they differ only in what they are trained on.

Every stage checkpoints into --work; a killed build resumes at the last checkpoint with the
same batch order. The teacher's held-out task accuracy and the sizes go to OUT/build.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import mlxdistill  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
import build_weights  # noqa: E402
from build_weights import (atomic_json, log, lr_at, restore_checkpoint,  # noqa: E402
                           save_checkpoint)
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

from make_task import TEMPLATE  # noqa: E402

SEQ = 96  # one problem of the index-hint format (<= 86 tokens) per row
BATCH = 32
MAX_TEACHER_BYTES = 10_000_000
MODELS = {
    "teacher": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768,
                    num_attention_heads=4, steps=2000, lr=1e-3, warmup=100, seed=1),
    "student": dict(hidden_size=96, num_hidden_layers=3, intermediate_size=256,
                    num_attention_heads=2, steps=0, lr=0.0, warmup=1, seed=2),
}
SPECIALS = ("<unk>", "<s>", "</s>")
# Turns rendered as their bare text, one after the other: mlx_lm's own completions dataset
# (mlx_lm.lora) joins prompt and completion through the chat template, and this makes that
# exactly prompt + completion, as mlxdistill and the training here see them.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def task_records(data: str, split: str) -> list[dict]:
    with open(os.path.join(data, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- tokenizer

def build_tokenizer(data: str, work: str) -> str:
    out = os.path.join(work, "tokenizer")
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        return out
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for split in ("train", "valid", "test")
                    for r in task_records(data, split) for c in r["prompt"] + r["completion"]})
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in chars:
        vocab[c] = len(vocab)
    # BPE without merges and without a pre-tokenizer: every character is its own token,
    # spaces and newlines included, and decoding concatenates them back.
    tk = Tokenizer(BPE(vocab, [], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=SEQ * 4,
                                   clean_up_tokenization_spaces=False)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False,
               add_eos_token=False, chat_template=CHAT_TEMPLATE)
    atomic_json(cfg_path, cfg)
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(Path(tmp))
    for split in ("valid", "test"):
        for r in task_records(data, split):
            text = r["prompt"] + r["completion"]
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) != len(text) or tok.decode(ids) != text:
                raise SystemExit(f"error: the character tokenizer does not round-trip {text!r}")
    os.replace(tmp, out)
    log(f"tokenizer: {len(vocab)} tokens")
    return out


# ---------------------------------------------------------------- training

def model_args(spec: dict, vocab: int) -> dict:
    return build_weights.model_args(spec, vocab, SEQ * 4)


def packed_split(tok_dir: str, path: str):
    """(inputs, labels, mask) rows: problems packed into SEQ-token rows, none split across
    two (data.packing auto), only the worked solutions (and the end of each) trained on."""
    from transformers import AutoTokenizer

    from mlxdistill.data import hard_targets, pack

    p = pack(path, AutoTokenizer.from_pretrained(tok_dir), SEQ, mask_prompt=True)
    labels = hard_targets(p.input_ids, p.next_ids)
    return p.input_ids, np.maximum(labels, 0), p.loss_mask * (labels >= 0)


def batch_for_step(rows: int, step: int, seed: int) -> np.ndarray:
    """Row indices of `step`: a seeded permutation per epoch, a pure function of (seed,
    step), so a resumed build sees the same batches."""
    per_epoch = rows // BATCH
    epoch, i = divmod(step, per_epoch)
    return np.sort(np.random.default_rng([seed, epoch]).permutation(rows)[
        i * BATCH:(i + 1) * BATCH])


def train_model(name: str, spec: dict, vocab: int, train, work: str, save_every: int):
    ckdir = os.path.join(work, name)
    os.makedirs(ckdir, exist_ok=True)
    mx.random.seed(spec["seed"])
    model = llama.Model(llama.ModelArgs.from_dict(model_args(spec, vocab)))
    opt = optim.AdamW(learning_rate=spec["lr"], weight_decay=0.1)
    step = restore_checkpoint(ckdir, name, model, opt)
    mx.eval(model.parameters())
    if step >= spec["steps"]:
        return model
    inputs, labels, mask = train
    log(f"{name}: {sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6:.2f} M "
        f"parameters, {spec['steps']} steps of {BATCH}x{SEQ} ({inputs.shape[0]} rows)")

    def loss_fn(m, x, y, w):
        ce = nn.losses.cross_entropy(m(x), y) * w
        return ce.sum() / mx.maximum(w.sum(), 1)

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x, y, w):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y, w)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    t0, seen, window = time.time(), 0, []
    while step < spec["steps"]:
        opt.learning_rate = mx.array(lr_at(step, spec))
        idx = batch_for_step(inputs.shape[0], step, spec["seed"])
        loss = train_step(mx.array(inputs[idx]), mx.array(labels[idx]),
                          mx.array(mask[idx].astype(np.float32)))
        mx.eval(loss, state)
        window.append(loss.item())
        step += 1
        seen += BATCH * SEQ
        if step % 25 == 0 or step == spec["steps"]:
            log(f"{name}: step {step}/{spec['steps']} loss {np.mean(window):.3f} "
                f"{seen / (time.time() - t0):.0f} tok/s")
            window = []
        if step % save_every == 0 or step == spec["steps"]:
            save_checkpoint(ckdir, step, model, opt)
    return model


def export(name: str, spec: dict, vocab: int, model, tok_dir: str, out: str) -> str:
    return build_weights.export(name, spec, model, tok_dir, out, vocab=vocab,
                                max_positions=SEQ * 4)


def task_accuracy(folder: str, data: str, n: int) -> float:
    """Greedy held-out accuracy of the exported (float16) model, as `mlxdistill eval` scores."""
    from mlxdistill import models
    from mlxdistill.config import load_config
    from mlxdistill.task import greedy_answers, score, task_prompts

    g = dataclasses.replace(load_config().generate, verifier="exact", max_tokens=96,
                            reasoning=TEMPLATE)
    model, tok, _ = models.load(folder, "specialist")
    prompts = task_prompts(os.path.join(data, "test.jsonl"), n)
    return score(prompts, greedy_answers(model, tok, prompts, g), g)["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/task")
    ap.add_argument("--out", default="weights/specialist")
    ap.add_argument("--work", default="build/specialist", help="checkpoints (resumable)")
    ap.add_argument("--stage", choices=["all", "tokenizer", "teacher", "student"], default="all")
    ap.add_argument("--teacher-steps", "--steps", type=int, default=MODELS["teacher"]["steps"],
                    help="teacher training steps (a few for a smoke run)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--eval-prompts", type=int, default=200,
                    help="held-out problems the teacher's accuracy is measured on")
    args = ap.parse_args()
    MODELS["teacher"]["steps"] = args.teacher_steps
    os.makedirs(args.work, exist_ok=True)
    tok_dir = build_tokenizer(args.data, args.work)
    if args.stage == "tokenizer":
        return
    with open(os.path.join(tok_dir, "tokenizer.json")) as f:
        vocab = len(json.load(f)["model"]["vocab"])
    train = packed_split(tok_dir, os.path.join(args.data, "train.jsonl"))
    report_path = os.path.join(args.out, "build.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {}
    for name in ("teacher", "student"):
        if args.stage not in ("all", name):
            continue
        spec = MODELS[name]
        t0 = time.time()
        model = train_model(name, spec, vocab, train, args.work, args.save_every)
        dest = export(name, spec, vocab, model, tok_dir, args.out)
        size = os.path.getsize(os.path.join(dest, "model.safetensors"))
        if name == "teacher" and size > MAX_TEACHER_BYTES:
            raise SystemExit(f"error: the teacher is {size / 1e6:.1f} MB, over the 10 MB budget")
        params = sum(v.size for _, v in tree_flatten(model.parameters()))
        report[name] = dict(params=params, bytes=size, steps=spec["steps"],
                            train_minutes_this_run=round((time.time() - t0) / 60, 1))
        if name == "teacher":
            report[name]["test_accuracy"] = task_accuracy(dest, args.data, args.eval_prompts)
            report[name]["eval_prompts"] = args.eval_prompts
        log(f"{name}: {report[name]}")
        os.makedirs(args.out, exist_ok=True)
        atomic_json(report_path, report)
    if "teacher" in report and "student" in report:
        ratio = report["teacher"]["params"] / report["student"]["params"]
        report["teacher_to_student_params"] = round(ratio, 1)
        if ratio < 8:
            raise SystemExit(f"error: the student is only {ratio:.1f}x smaller than the teacher")
        atomic_json(report_path, report)


if __name__ == "__main__":
    main()
