"""The one training loop, for every mode (full / LoRA / DoRA) and every kind of target.

`fit` reads top to bottom: setup (the batches, the student, the objective, the optimizer, a
checkpoint to resume from), the loop (batch -> one compiled step, step.py; reports,
validation and checkpoints at their steps), and the finish (the student saved as mlx_lm
reads it). Only the command layer (api.py) imports it; evaluation after training is the
command's business, not the loop's.

Checkpoints hold weights, optimizer state and the step; the data order and the RNG are pure
functions of (seed, step), so a resumed run continues exactly as if never stopped.
"""

from __future__ import annotations

import json
import os
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from . import cache as cache_mod
from . import data as data_mod
from . import (files, losses, models, multi, onpolicy, plots, remote, surgery, tracking,
               validation, xtok)
from .config import Config, ConfigError
from .distributed import World
from .multi import MixedReader
from .objective import Objective, setup_hidden
from .progress import Progress
from .rundir import RunDir, RunLock
from .step import CE, HIDDEN, KD, LOSS, NTOK, loop_memory, make_step, to_arrays


def lr_schedule(cfg) -> optim.schedulers:
    t = cfg.train
    decay = max(1, t.iters - t.warmup)
    cosine = optim.cosine_decay(t.lr, decay, end=t.lr * t.min_lr_ratio)
    if t.warmup == 0:
        return cosine
    warm = optim.linear_schedule(t.lr / t.warmup, t.lr, t.warmup - 1) if t.warmup > 1 else \
        (lambda step: mx.array(t.lr))
    return optim.join_schedules([warm, cosine], [t.warmup])


@dataclass
class Source:
    """Where the teacher's targets come from: a verified cache (teacher not in memory) or
    packed rows plus the live teacher (`teacher.mode: online`)."""
    batches: object  # .batches(batch_size, seed, start_step, rank, size) and .rows
    vocab: int
    fingerprint: str
    teacher: object = None  # the live teacher model (online mode)
    manifest: Optional[dict] = None  # the cache's (cache mode)
    xtok: str = ""  # the cross-tokenizer loss, when the student has its own tokenizer
    id_map: Optional[np.ndarray] = None  # teacher id -> student id of the same string
    # teachers of different tokenizers: the other caches' paths, one cache per step
    also: list = field(default_factory=list)
    weights: Optional[list] = None  # each path's share of the steps (this one first)


def batch_source(cfg: Config, teacher: models.Lazy, quiet: bool, log, world: World) -> Source:
    if cfg.teacher.mode == "cache":
        reader = cache_mod.ensure(cfg, quiet, log, world, teacher)
        m = reader.manifest
        scfg, stok = models.load_meta_role(cfg, "student")
        sfp = models.vocab_fingerprint(stok)
        c = cfg.cache
        mix = [cache_mod.ShardReader(d, rows=cfg.data.max_rows) for d in c.mix]
        weights = list(c.mix_weights) or [1.0] * (len(c.mix) + 1)
        weights = [w / sum(weights) for w in weights]
        if mix and any(r.manifest["tokenizer_fingerprint"] != sfp for r in [reader, *mix]):
            return per_step_source(cfg, [reader, *mix], weights, stok, scfg, quiet, log, world)
        if m["tokenizer_fingerprint"] != sfp:
            # an HTTP teacher's tokens are read with its local tokenizer (api_cache.py)
            tpath = cfg.teacher.tokenizer if remote.is_url(cfg.teacher.model) else None
            return cross_source(cfg, reader, tpath or cfg.teacher.model, stok, scfg, quiet,
                                log, world)
        if mix:
            reader = MixedReader([reader] + mix, weights, c.mix_mode)
            log(f"multi-teacher: {len(weights)} caches, {c.mix_mode} "
                + ("" if c.mix_mode == "confidence" else
                   "(" + ", ".join(f"{w:.2f}" for w in weights) + ")"))
        return Source(reader, m["vocab_size"], m["tokenizer_fingerprint"], manifest=m)
    model, ttok, tcfg = teacher.get()
    scfg, stok = models.load_meta_role(cfg, "student")
    match = models.check_pair(ttok, tcfg, stok, scfg, cfg.data.seq_len)
    packed = data_mod.pack(cfg.data.train, ttok, cfg.data.seq_len, cfg.data.mask_prompt,
                           cfg.data.max_rows, cfg.data.long_lines, cfg.data.packing)
    if (note := packed.long_report(cfg.data.seq_len, cfg.data.long_lines, cfg.data.train)):
        log(note)
    return Source(data_mod.PackedRows(packed), match.vocab_size, match.fingerprint, model)


def cross_source(cfg: Config, reader, teacher_path: str, stok, scfg, quiet: bool, log,
                 world: World) -> Source:
    """A student of another tokenizer on a cache: its rows re-tokenized and aligned once
    (xtok.ensure, kept beside the cache), the cross-tokenizer loss of loss.xtok."""
    kind = xtok.pick(cfg)
    m = reader.manifest
    if kind in xtok.NEEDS and not m.get(xtok.NEEDS[kind]):
        raise ConfigError(f"loss.xtok={kind} needs the teacher's next-token log-probabilities, "
                          f"which cache {reader.dir} does not hold: add "
                          f"cache.{xtok.NEEDS[kind]}=true cache.dir={reader.dir}-logprob (a "
                          "teacher pass that stores them), or pick loss.xtok=mapped")
    _, ttok = models.load_meta(teacher_path, f"teacher of cache {reader.dir}")
    models.check_alignable(ttok, stok)
    a = xtok.alpha(cfg)
    how = ("auto: the recommended one" if cfg.loss.xtok == "auto" else "loss.xtok")
    log(f"student {cfg.student.model} has another tokenizer than the teacher of "
        f"{reader.dir}: cross-tokenizer distillation, loss {kind}"
        + (f" + {a:g} CE" if a else "") + f" ({how})")
    aligned = None
    if world.main:
        aligned = xtok.ensure(reader, ttok, stok, cfg.student.model, quiet, log)
    world.barrier("aligning the cache to the student's tokenizer")
    if not world.main:
        aligned = xtok.ensure(reader, ttok, stok, cfg.student.model, True, lambda m: None,
                              build=False)
    log(f"aligned: {aligned.aligned:.1%} of the student's trained positions share a token "
        f"boundary with the teacher, {aligned.one_to_one:.1%} predict a next token of the same "
        "bytes")
    if m.get("hidden_resolved"):
        log(f"the hidden states in {reader.dir} are not used across tokenizers")
    return Source(xtok.AlignedReader(reader, aligned, kind == "chunk"),
                  models.logits_size(scfg), models.vocab_fingerprint(stok),
                  manifest={**m, "hidden_resolved": []}, xtok=kind, id_map=aligned.id_map)


def per_step_source(cfg: Config, readers: list, weights: list, stok, scfg, quiet: bool, log,
                    world: World) -> Source:
    """Teachers of different tokenizers in one run: their caches' rows are different
    stretches of text, so they cannot be combined position by position (multi.py's
    MixedReader); each cache reaches the student through its own path (the one sharing the
    student's tokenizer as usual, the others aligned), and each step trains on one of them,
    drawn by cache.mix_weights (multi.step_teacher)."""
    if cfg.cache.mix_mode != "weights":
        raise ConfigError("cache.mix_mode=confidence compares teachers position by position, "
                          "which teachers of different tokenizers do not share; use "
                          "cache.mix_mode=weights (each step trains on one teacher's cache, "
                          "drawn by cache.mix_weights)")
    sfp = models.vocab_fingerprint(stok)
    teachers = [cfg.teacher.model] + [r.manifest.get("teacher") for r in readers[1:]]
    paths = []
    for r, t in zip(readers, teachers):
        m = r.manifest
        if m["tokenizer_fingerprint"] == sfp:
            models.check_student(stok, scfg, sfp, m["vocab_size"], cfg.data.seq_len, t,
                                 cfg.student.model)
            paths.append(Source(r, m["vocab_size"], sfp, manifest={**m, "hidden_resolved": []}))
        else:
            paths.append(cross_source(cfg, r, t, stok, scfg, quiet, log, world))
    log(f"multi-teacher across tokenizers: {len(paths)} caches, each step on one of them "
        "(" + ", ".join(f"{r.dir} {w:.2f}" for r, w in zip(readers, weights)) + ")")
    return dataclasses.replace(paths[0], also=paths[1:], weights=weights)


def online_targets(forward, x: mx.array, temperature: float) -> dict:
    """Dense targets from the live teacher; no gradient flows into it."""
    return {"logprobs": losses.log_softmax(mx.stop_gradient(forward(x)), temperature)}


class Pending:
    """Steps not yet read back to the host. Their values are read at report, eval and save
    steps only (one transfer for all of them), so the loop never waits on a step's scalars.
    A step whose loss or gradient was not finite is skipped (its weights were kept) up to
    `train.nonfinite_skips` times; past that, training stops."""

    def __init__(self, nonfinite_skips: int, skipped: int, history: list, log):
        self.steps: list = []
        self.last: dict = {}
        self.history, self.skipped = history, skipped
        self.nonfinite_skips, self.log = nonfinite_skips, log

    def add(self, step: int, on_policy: bool, out: tuple) -> None:
        # Wait for the previous step only: the host prepares the next batch while the
        # device computes, with at most one step in flight.
        if self.steps:
            mx.eval(self.steps[-1][2:])
        self.steps.append((step, on_policy, *out))

    def settle(self, run: RunDir) -> None:
        if not self.steps:
            return
        rows = mx.stack([mx.concatenate([st, g[None], ok.astype(mx.float32)[None]])
                         for _, _, st, g, ok in self.steps]).tolist()
        steps, self.steps = self.steps, []
        for (at, on, *_), (*stats, grad_norm, ok) in zip(steps, rows):
            ntok = max(stats[NTOK], 1.0)
            loss_v, kd_v, ce_v, hid_v = (stats[i] / ntok for i in (LOSS, KD, CE, HIDDEN))
            # An on-policy step has no hard labels: its CE is absent, not a perfect 0.
            self.last.update(loss=loss_v, kd=kd_v, ce=None if on else ce_v, hidden=hid_v,
                             grad_norm=grad_norm)
            if ok:
                self.history.append(float(loss_v))
            elif self.skipped < self.nonfinite_skips:
                self.skipped += 1  # the weights stayed as they were; the data moves on
                self.log(f"step {at}: loss {loss_v}, gradient norm {grad_norm}; update "
                         f"skipped ({self.skipped} of train.nonfinite_skips="
                         f"{self.nonfinite_skips})")
            else:
                kept = run.checkpoints()
                raise FloatingPointError(
                    f"loss {loss_v}, gradient norm {grad_norm} at step {at}; "
                    + (f"the last good checkpoint ({os.path.basename(kept[-1])}) is kept; "
                       if kept else "") + "lower train.lr or raise train.warmup"
                    + ("" if self.nonfinite_skips else
                       ", or let train.nonfinite_skips=N skip such steps"))


def report(cfg: Config, step: int, pending: Pending, opt, tokens: int, seconds: float,
           hidden: bool) -> dict:
    """One metrics.jsonl record: the mean loss since the last report (absent when every
    step since was skipped), the last step's parts, and the throughput."""
    last = pending.last
    rec = {"step": step, **({"loss": round(float(np.mean(pending.history)), 5)}
                            if pending.history else {}),
           "kd": round(float(last["kd"]), 5),
           **({} if last["ce"] is None else {"ce": round(float(last["ce"]), 5)}),
           "grad_norm": round(last["grad_norm"], 4),
           "lr": float(opt.learning_rate.item()),
           "tok_per_s": round(tokens / max(seconds, 1e-9), 1),
           "peak_mem_gb": round(mx.get_peak_memory() / 1e9, 3)}
    if hidden:
        rec["hidden"] = round(float(last["hidden"]), 5)
    if pending.skipped:
        rec["skipped"] = pending.skipped
    if cfg.loss.lmbda > 0:
        rec["on_policy_steps"] = onpolicy.count(cfg.loss.lmbda, cfg.run.seed, step)
    return rec


def validation_line(rec: dict, iters: int) -> str:
    """The validation metrics first, then the training loss and speed: the whole record is
    in metrics.jsonl, and this line should fit a terminal."""
    parts = [f"{k} {rec[k]:.4g}" for k in rec if k.startswith("val_")]
    if "loss" in rec:
        parts.append(f"loss {rec['loss']:.4g}")
    if "tok_per_s" in rec:
        parts.append(f"{rec['tok_per_s']:,.0f} tok/s")
    return f"step {rec['step']}/{iters}: " + ", ".join(parts)


def load_student(cfg: Config, source: Source):
    """The student to train, checked against the teacher's vocabulary and the context."""
    model, tok, scfg = models.load_role(cfg, "student")
    models.check_student(tok, scfg, source.fingerprint, source.vocab, cfg.data.seq_len,
                         cfg.teacher.model, cfg.student.model)
    return model, tok, scfg


def fit(cfg: Config, quiet: bool = False, log=print,
        teacher: Optional[models.Lazy] = None) -> bool:
    """Train the student. Under `mlx.launch` every rank takes its share of each global batch
    and gradients are averaged; rank 0 alone writes. `teacher` is loaded only when needed
    (building a missing cache, the validation targets, online targets) and, in cache mode,
    released before the loop. Returns True on rank 0; a run already trained to
    train.iters is not loaded again."""
    world = World(cfg.run.dist_timeout)
    if world.main:
        tracking.check(cfg)  # a missing tracker package fails before any work
    teacher = teacher or models.Lazy(cfg, "teacher")
    if not world.main:
        return _fit(cfg, world, teacher, True, lambda m: None)
    files.ensure_dir(cfg.run.dir, "run.dir")
    with RunLock(cfg.run.dir):
        return _fit(cfg, world, teacher, quiet, log)


def _fit(cfg: Config, world: World, teacher: models.Lazy, quiet: bool, log) -> bool:
    # ---------------------------------------------------------------- setup
    t = cfg.train
    if t.batch_size % (world.size * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by ranks "
                          f"({world.size}) x train.grad_accum ({t.grad_accum})")
    run = RunDir(cfg.run.dir)
    log(world.describe())
    if world.main:
        files.ensure_dir(run.path, "run.dir")
        run.check_same_run(cfg)
    # A finished run is not loaded again (cache, teacher, student) only to save the same
    # student: rerunning the command costs nothing.
    if world.bcast(world.main and run.finished(t.iters), "checking whether the run is done"):
        if world.main:
            run.save_config(cfg)  # keys that may change on a resume (RESUMABLE_CHANGES)
        log(f"{run.path} has finished its {t.iters} training steps; nothing to train")
        return world.main
    # A missing cache is built by all ranks together.
    source = batch_source(cfg, teacher, quiet, log, world)
    vocab = source.vocab
    if world.size > 1:
        log(f"data parallel: {world.size} ranks, {t.batch_size // world.size} rows each")

    mx.random.seed(cfg.run.seed)
    model, tok, scfg = load_student(cfg, source)
    ev = None
    if world.main:
        run.save_config(cfg)
        # An HTTP teacher gives no distributions on the validation rows: CE alone there.
        ev = (validation.student_rows(cfg, tok)
              if source.xtok or source.also or remote.is_url(cfg.teacher.model) else
              validation.teacher_targets(cfg, run.eval_teacher, vocab, teacher, log))
    if source.teacher is None:
        teacher.release()  # cache mode: no teacher in memory while the student trains

    # LoRA's initial weights are drawn here: from the seed alone, whatever was loaded (or
    # not) since, so a cache built in this process and one built before give one run.
    mx.random.seed(cfg.run.seed)
    adapter_cfg = surgery.setup_training(model, t.mode, t.lora_rank, t.lora_layers,
                                         t.lora_scale, t.lora_dropout)
    m = source.manifest or {}
    hidden = setup_hidden(cfg, model, scfg, m.get("hidden_resolved") or [],
                          m.get("teacher_layers", 0), m.get("hidden_size") or 0)
    opt = optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=t.weight_decay)
    opt.init(model.trainable_parameters())
    resumed = run.restore(model, opt, log) if world.main else {"step": 0}
    # Every rank starts from rank 0's weights, optimizer state and step.
    step = int(world.sum(np.array([resumed["step"]]), "agreeing on the resume step")[0])
    model.update(world.from_main(model.trainable_parameters(), "sharing rank 0's weights"))
    opt.state = world.from_main(opt.state, "sharing rank 0's optimizer state")
    mx.eval(model.parameters(), opt.state)
    log(f"student: {surgery.trainable_count(model):,} trainable parameters ({t.mode}), "
        f"{source.batches.rows} {'online' if source.teacher is not None else 'cached'} rows, "
        f"{t.iters} step{'s' * (t.iters != 1)} of {t.batch_size}x"
        f"{getattr(source.batches, 'width', cfg.data.seq_len)}")

    paths = [source, *source.also]
    step_fns = []
    for i, p in enumerate(paths):
        objective = Objective.from_config(cfg, p.xtok, xtok.alpha(cfg) if p.xtok else None)
        if i:  # the model's blocks are changed for gradient checkpointing once
            objective = dataclasses.replace(objective, grad_checkpoint=False)
        loss_fn = objective.bind(model, p.vocab, hidden if i == 0 else None, log,
                                 cfg.student.model, p.id_map)
        step_fns.append(make_step(model, opt, loss_fn, t.grad_clip, t.grad_accum, world))
    t_forward = models.logits_fn(source.teacher, vocab) if source.teacher is not None else None
    # each path's stream resumes after the steps it trained (one path: all of them)
    starts = multi.steps_per_teacher(cfg.run.seed, step, source.weights) if source.also \
        else [step]
    streams = [p.batches.batches(t.batch_size, cfg.run.seed, start_step=k, rank=world.rank,
                                 size=world.size) for p, k in zip(paths, starts)]
    pending = Pending(t.nonfinite_skips, resumed.get("skipped", 0),
                      resumed.get("loss_window", []), log)

    # ---------------------------------------------------------------- the loop
    bar = Progress(t.iters, "train", "tok", quiet)
    bar.done = step
    t_report, tok_report = time.time(), 0
    tracker = tracking.open_tracker(cfg, world.main)  # first: it may refuse (no login)
    metrics_f = open(run.metrics, "a") if world.main else None
    restore_memory = loop_memory()
    try:
        while step < t.iters:
            # RNG is a function of the step, and of the rank: ranks must not share dropout
            # masks or on-policy samples (one process: rank 0 of 1). The prime factor keeps
            # the seeds of two runs' steps apart (below a million steps, no (seed, step) pair
            # repeats another's).
            mx.random.seed((cfg.run.seed * 1_000_003 + step) * world.size + world.rank)
            path = multi.step_teacher(cfg.run.seed, step, source.weights) if source.also else 0
            x, mask, labels, targets = to_arrays(next(streams[path]))
            if (on := onpolicy.is_on_policy(cfg.loss.lmbda, cfg.run.seed, step)):
                x, mask, labels = onpolicy.on_policy_batch(model, vocab, x)
            if t_forward is not None:
                targets = online_targets(t_forward, x, cfg.loss.temperature)
            out = step_fns[path](x, mask, labels, targets, f"step {step + 1}")
            mx.async_eval(out, model.parameters(), opt.state)
            pending.add(step + 1, on, out)
            step += 1
            tok_report += x.size * world.size
            # Every rank settles at the same steps: a non-finite step stops all of them.
            if step == t.iters or not (step % t.report_every and step % t.save_every
                                       and step % t.eval_every):
                pending.settle(run)
            bar.update(1, units=x.size * world.size,
                       postfix=f"loss {pending.last['loss']:.3f}"
                       if not pending.steps and pending.last else None)
            if not world.main:
                continue
            rec = None
            if step % t.report_every == 0 or step == t.iters:
                rec = report(cfg, step, pending, opt, tok_report, time.time() - t_report,
                             hidden is not None)
                pending.history, t_report, tok_report = [], time.time(), 0
            if ev is not None and (step % t.eval_every == 0 or step == t.iters):
                rec = {**(rec or {"step": step}), **validation.validate(model, ev, vocab)}
                if not quiet:
                    bar.message(validation_line(rec, t.iters), log)
            if rec is not None:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                tracker.log(rec)
            if step % t.save_every == 0 or step == t.iters:
                # The data position is the step itself (the order is a function of seed and
                # step); metrics_bytes lets a resume cut metrics.jsonl back to this point, and
                # the loss window makes the next logged mean equal an uninterrupted run's.
                run.save_checkpoint(step, model, opt,
                                    {"data_step": step, "metrics_bytes": metrics_f.tell(),
                                     "loss_window": pending.history,
                                     "skipped": pending.skipped}, t.keep_checkpoints)
    finally:
        restore_memory()
        if metrics_f is not None:
            metrics_f.close()
        tracker.close()
        bar.close()

    # ---------------------------------------------------------------- finish
    if not world.main:
        return False
    run.save_student(model, tok, scfg, cfg, adapter_cfg, log)
    plots.plot_metrics(run.metrics, run.plots)
    return True
