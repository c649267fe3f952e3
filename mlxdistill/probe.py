"""`plan --probe`: run the teacher pass and the training step briefly on this machine, built
as `cache` and `train` build them, and measure their peak memory and speed."""

from __future__ import annotations

import gc
import time
from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from . import models, surgery
from . import xtok as xtok_mod
from .config import Config
from .objective import Objective, setup_hidden
from .shards import id_dtype
from .step import loop_memory, make_step
from .targets import from_logits


def _fake_targets(cfg: Config, batch: int, vocab: int) -> dict:
    """Cache-shaped teacher targets of the configured mode (values do not change the cost)."""
    c, L = cfg.cache, cfg.data.seq_len
    rng = np.random.default_rng(0)
    idt = id_dtype(vocab)
    if c.mode == "sample":
        return {"ids": mx.array(rng.integers(0, vocab, (batch, L, c.n)).astype(idt)),
                "counts": mx.array(np.ones((batch, L, c.n), np.uint8))}
    k = min(c.k, vocab)
    return {"ids": mx.array(rng.integers(0, vocab, (batch, L, k)).astype(idt)),
            "logprobs": mx.array(np.full((batch, L, k), -np.log(k + 1), np.float16)),
            "tail_logprob": mx.array(np.full((batch, L), -np.log(k + 1), np.float32))}


def baseline() -> int:
    """MLX memory already held by the process (unreachable arrays collected first), which a
    probe's peak must not count."""
    gc.collect()
    mx.synchronize()  # buffers of work still in flight are released once it finishes
    return mx.get_active_memory()


def _cross_targets(targets: dict, batch: int, L: int) -> dict:
    """What a batch in a cross-tokenizer student's tokens adds (xtok.AlignedReader): every
    position aligned and one-to-one, one chunk per position (the costliest case)."""
    ones = mx.ones((batch, L), dtype=mx.uint8)
    chunk = mx.broadcast_to(mx.arange(L, dtype=mx.int32), (batch, L))
    return {**targets, "aligned": ones, "one": ones, "s_chunk": chunk,
            "chunk_lp": mx.full((batch, L), -1.0), "chunk_mask": ones}


def probe_training(cfg: Config, steps: int = 2, teacher_config: Optional[dict] = None,
                   xtok: str = "", student_config: Optional[dict] = None) -> dict:
    """Load the student as `train` does and run `steps` optimizer steps of the configured
    micro-batch on random tokens, the step and its objective built as the trainer builds
    them (the hidden-state term included when the cache holds teacher states; their width
    and depth come from `teacher_config`; the cross-tokenizer loss `xtok` for a student of
    another tokenizer): peak MLX memory (weights included) and seconds per step after the
    first (compiled) one, under the trainer's loop memory setup. `student_config`: a student
    not written yet (one `prune` would cut), built from it at random weights."""
    t = cfg.train
    base = baseline()
    if student_config is None:
        model, _, scfg = models.load(cfg.student.model, "student")
    else:
        model, scfg = _random_model(student_config), student_config
    vocab = models.logits_size(scfg)
    surgery.setup_training(model, t.mode, t.lora_rank, t.lora_layers, t.lora_scale,
                           t.lora_dropout)
    L = cfg.data.seq_len
    t_vocab = models.logits_size(teacher_config) if xtok and teacher_config else vocab
    targets = _fake_targets(cfg, t.batch_size, t_vocab)
    id_map = None
    if xtok:
        targets = _cross_targets(targets, t.batch_size, L)
        id_map = np.arange(t_vocab, dtype=np.int32) % vocab
    hidden = None
    if cfg.cache.hidden_layers and teacher_config is not None and not xtok:
        n_t = int(teacher_config["num_hidden_layers"])
        d_t = int(teacher_config["hidden_size"])
        layers = surgery.resolve_layers(cfg.cache.hidden_layers, n_t, "cache.hidden_layers")
        hidden = setup_hidden(cfg, model, scfg, layers, n_t, d_t)
        for layer in layers:  # the cache's float16 teacher states
            targets[f"hidden.{layer}"] = mx.zeros((t.batch_size, L, d_t), dtype=mx.float16)
    opt = optim.AdamW(learning_rate=t.lr, weight_decay=t.weight_decay)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    objective = Objective.from_config(cfg, xtok, xtok_mod.alpha(cfg) if xtok else None)
    loss_fn = objective.bind(model, vocab, hidden, id_map=id_map)
    step_fn = make_step(model, opt, loss_fn, t.grad_clip, t.grad_accum)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, vocab, (t.batch_size, L)).astype(np.int32))
    labels = mx.array(rng.integers(0, vocab, (t.batch_size, L)).astype(np.int32))
    mask = mx.ones((t.batch_size, L), dtype=mx.uint8)
    # The trainer keeps the validation rows' teacher distributions (float16) in memory.
    ev = mx.zeros((t.eval_rows, L, vocab), dtype=mx.float16) if cfg.data.valid and \
        t.eval_rows else None
    mx.eval(x, labels, mask, targets, ev)
    restore_memory = loop_memory()  # resets the peak, as the trainer's loop does
    times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            mx.eval(step_fn(x, mask, labels, targets), model.parameters(), opt.state)
            times.append(time.perf_counter() - t0)
        peak = mx.get_peak_memory() - base
    finally:
        restore_memory()
    return {"peak_bytes": int(peak), "step_s": float(np.median(times[1:] or times)),
            "tokens_per_step": t.batch_size * L}


def add_measured(cfg: Config, teacher_est: Optional[dict], train_est: dict,
                 rows: Optional[int], teacher_config: dict, xtok: str,
                 student_config: Optional[dict]) -> None:
    """`plan --probe`: the peaks measured here added to plan's estimates of the teacher pass
    (None for an online teacher) and training, with the time each will take (`rows` rows)."""
    if teacher_est is not None:
        tp = probe_teacher(cfg)
        teacher_est.update(measured_peak_bytes=tp["peak_bytes"],
                           tok_per_s=round(tp["tok_per_s"], 1))
        if rows:
            teacher_est["seconds"] = round(rows * cfg.data.seq_len / tp["tok_per_s"], 1)
    sp = probe_training(cfg, teacher_config=teacher_config, xtok=xtok,
                        student_config=student_config)
    train_est.update(measured_peak_bytes=sp["peak_bytes"], step_s=round(sp["step_s"], 4),
                     seconds=round(cfg.train.iters * sp["step_s"], 1))


def _random_model(config: dict):
    """The mlx_lm model of `config` at random weights, in the dtype `models.load` would give
    its checkpoint (config.json's torch_dtype on a Mac GPU): a step's memory and time do not
    depend on the weights' values."""
    model_cls, args_cls = models.model_classes(config, "the pruned student")
    model = model_cls(args_cls.from_dict(config))
    dt = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    model.set_dtype(models.compute_dtype() or getattr(mx, dt, mx.bfloat16))
    return model


def probe_teacher(cfg: Config, batches: int = 2) -> dict:
    """Run the teacher over `batches` cache batches of random tokens as the cache pass does:
    peak MLX memory and tokens per second."""
    c = cfg.cache
    base = baseline()
    teacher, _, tcfg = models.load(cfg.teacher.model, "teacher")
    vocab = models.logits_size(tcfg)
    forward = models.logits_fn(teacher, vocab)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, vocab, (c.batch_size, cfg.data.seq_len)).astype(np.int32))
    mx.eval(x)
    mx.reset_peak_memory()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        from_logits(forward(x), c.mode, c.n, c.k, c.temperature, rng, c.keep_top1)
        times.append(time.perf_counter() - t0)
    peak = mx.get_peak_memory() - base
    dt = float(np.median(times[1:] or times))
    return {"peak_bytes": int(peak), "tok_per_s": x.size / dt}
