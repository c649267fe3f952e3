"""The one training loop for every mode (full / LoRA / DoRA) and every target kind.

Read top to bottom: resolve the cache (building it if missing), load the student, restore a
checkpoint if the run directory has one, then step: batch -> one compiled step (step.py:
loss, gradients, clipping, AdamW).
Checkpoints hold weights, optimizer state and the step; the data order and the RNG are pure
functions of (seed, step), so a resumed run continues exactly as if never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from . import cache as cache_mod
from . import data as data_mod
from . import files, losses, models, onpolicy
from .config import Config, ConfigError, from_dict, save_config
from .distributed import World
from .progress import Progress
# step_loss is imported from here by plan's probe and the benchmark
from .step import NTOK, kd_objective, loop_memory, make_step, step_loss  # noqa: F401

# Keys that may change between a run and its resume without changing what is computed.
RESUMABLE_CHANGES = {("train", "iters"), ("train", "save_every"), ("train", "eval_every"),
                     ("train", "report_every"), ("train", "keep_checkpoints"),
                     ("train", "nonfinite_skips"), ("run", "dist_timeout")}


def lr_schedule(cfg) -> optim.schedulers:
    t = cfg.train
    decay = max(1, t.iters - t.warmup)
    cosine = optim.cosine_decay(t.lr, decay, end=t.lr * t.min_lr_ratio)
    if t.warmup == 0:
        return cosine
    warm = optim.linear_schedule(t.lr / t.warmup, t.lr, t.warmup - 1) if t.warmup > 1 else \
        (lambda step: mx.array(t.lr))
    return optim.join_schedules([warm, cosine], [t.warmup])


def ensure_cache(cfg: Config, quiet: bool, log, world: Optional[World] = None
                 ) -> cache_mod.ShardReader:
    """The verified cache of `cfg`, built first if missing or incomplete. Under several ranks
    all of them run the teacher (rank 0's view of the cache decides), and rank 0 verifies
    the shards before the others, which then find them already verified."""
    world = world or World(cfg.run.dist_timeout)
    mpath = os.path.join(cfg.cache.dir, cache_mod.MANIFEST)
    need = world.main and (not os.path.exists(mpath)
                           or not cache_mod.read_manifest(cfg.cache.dir).get("complete"))
    if world.bcast(need, "checking the cache"):
        cache_mod.build(cfg, quiet=quiet, log=log, world=world)
    if not world.main:
        world.barrier("rank 0's cache verification")
    reader = cache_mod.ShardReader(cfg.cache.dir)
    if world.main:
        world.barrier("rank 0's cache verification")
    cache_mod.check_compatible(reader.manifest, cache_mod.config_identity(cfg), cfg.cache.dir)
    return reader


def batch_source(cfg: Config, quiet: bool, log, world: Optional[World] = None):
    """(batches, vocab size, tokenizer fingerprint, live teacher or None, cache manifest or
    None) for the teacher mode: a verified cache (built if missing), or packed rows plus the
    teacher kept in memory."""
    if cfg.teacher.mode == "cache":
        reader = ensure_cache(cfg, quiet, log, world)
        m = reader.manifest
        if cfg.cache.mix:
            from .multi import MixedReader

            c = cfg.cache
            weights = list(c.mix_weights) or [1.0] * (len(c.mix) + 1)
            weights = [w / sum(weights) for w in weights]
            reader = MixedReader([reader] + [cache_mod.ShardReader(d) for d in c.mix],
                                 weights, c.mix_mode)
            log(f"multi-teacher: {len(weights)} caches, {c.mix_mode} "
                + ("" if c.mix_mode == "confidence" else
                   "(" + ", ".join(f"{w:.2f}" for w in weights) + ")"))
        return reader, m["vocab_size"], m["tokenizer_fingerprint"], None, m
    teacher, ttok, tcfg = models.load_role(cfg, "teacher")
    scfg, stok = models.load_meta(cfg.student.model, "student")
    match = models.check_vocab(ttok, tcfg, stok, scfg)
    models.check_seq_len(cfg.data.seq_len, tcfg, "teacher")
    packed = data_mod.pack(cfg.data.train, ttok, cfg.data.seq_len, cfg.data.mask_prompt,
                           cfg.data.max_rows, cfg.data.long_lines, cfg.data.packing)
    if (note := packed.long_report(cfg.data.seq_len, cfg.data.long_lines, cfg.data.train)):
        log(note)
    return data_mod.PackedRows(packed), match.vocab_size, match.fingerprint, teacher, None


def setup_hidden(cfg: Config, model, student_cfg: dict, manifest: Optional[dict]):
    """Hidden-state distillation when the cache holds teacher states: capture the mapped
    student blocks and attach one learned projection per pair. Returns ([(student layer,
    teacher layer)], captured outputs) or None. The projector rides on the student as
    `distill_proj` so the one optimizer and checkpoint cover it; it is taken off before the
    student is saved."""
    t_layers = (manifest or {}).get("hidden_resolved") or []
    if not t_layers:
        return None
    n_s = models.num_layers(model)
    s_layers = list(cfg.loss.hidden_student_layers) or models.default_layer_map(
        t_layers, manifest["teacher_layers"], n_s)
    if len(s_layers) != len(t_layers):
        raise ConfigError(f"loss.hidden_student_layers has {len(s_layers)} entries for "
                          f"{len(t_layers)} cached teacher layers {t_layers}")
    s_layers = models.resolve_layers(s_layers, n_s, "loss.hidden_student_layers")
    store, _ = models.capture_layers(model, s_layers)
    model.distill_proj = models.Projector(int(student_cfg["hidden_size"]),
                                          manifest["hidden_size"], len(t_layers))
    return list(zip(s_layers, t_layers)), store


def _checkpoints(run_dir: str) -> list[str]:
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, n) for n in os.listdir(d)
                  if n.startswith("step-") and not files.is_tmp(n)
                  and os.path.isfile(os.path.join(d, n, "state.json")))


def _check_same_run(cfg: Config, run_dir: str) -> None:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = from_dict(yaml.safe_load(f) or {}, source=path).to_dict()
    new = cfg.to_dict()
    for section, body in new.items():
        for key, value in body.items():
            if (section, key) not in RESUMABLE_CHANGES and old[section][key] != value:
                raise ConfigError(
                    f"run dir {run_dir} holds a run with {section}.{key}={old[section][key]!r}, "
                    f"not {value!r}; resume with the same config or choose another run.dir")


def eval_targets(cfg: Config, run_dir: str, vocab_size: int, log,
                 teacher=None) -> Optional[dict]:
    """Teacher log-probabilities (float16, full vocabulary) on the first `train.eval_rows`
    validation rows, computed once and kept in the run dir: periodic validation reports
    full-vocabulary KL without holding the teacher in memory during training."""
    if not cfg.data.valid or cfg.train.eval_rows == 0:
        return None
    path = os.path.join(run_dir, "eval_teacher.safetensors")
    if os.path.exists(path):
        return dict(mx.load(path))
    if teacher is None:  # cache mode: load it for this once, freed on return
        teacher, ttok, _ = models.load_role(cfg, "teacher")
    else:
        _, ttok = models.load_meta(cfg.teacher.model, "teacher")
    packed = data_mod.pack(cfg.data.valid, ttok, cfg.data.seq_len, cfg.data.mask_prompt,
                           cfg.train.eval_rows, packing=cfg.data.packing)
    x = mx.array(packed.input_ids)
    lp = []
    for b in range(0, x.shape[0], 4):
        logits = models.logits_fn(teacher, vocab_size)(x[b:b + 4])
        lp.append(losses.log_softmax(logits).astype(mx.float16))
    out = {"input_ids": x, "loss_mask": mx.array(packed.loss_mask),
           "labels": mx.array(data_mod.hard_targets(packed.input_ids, packed.next_ids)),
           "teacher_logprobs": mx.concatenate(lp)}
    mx.eval(out)
    with files.atomic_path(path) as tmp:
        mx.save_safetensors(tmp, out)
    log(f"validation: {packed.rows} rows of {cfg.data.valid} with teacher distributions")
    return out


def validate(model, ev: dict, vocab_size: int) -> dict:
    logits = models.logits_fn(model, vocab_size)(ev["input_ids"])
    mask = ev["loss_mask"]
    ce, n = losses.ce_loss(logits, ev["labels"], mask)
    kl, _ = losses.kd_loss(logits, {"logprobs": ev["teacher_logprobs"]}, mask)
    agree = (mx.argmax(logits, -1) == mx.argmax(ev["teacher_logprobs"], -1)).astype(mx.float32)
    ag, _ = losses.masked_mean(agree, mask)
    return {"val_ce": round(ce.item(), 4), "val_kl": round(kl.item(), 4),
            "val_agree": round(ag.item(), 4)}


def save_checkpoint(run_dir: str, step: int, model, opt, state: dict, keep: int) -> None:
    """Weights, optimizer state and `state` (step, data position, ...) under
    checkpoints/step-NNNNNN, written as a temp directory and renamed: a save killed half way
    leaves the previous checkpoints untouched. The newest `keep` are kept."""
    d = os.path.join(run_dir, "checkpoints", f"step-{step:06d}")
    with files.atomic_dir(d) as tmp:
        mx.save_safetensors(os.path.join(tmp, "weights.safetensors"),
                            dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(os.path.join(tmp, "optimizer.safetensors"),
                            dict(tree_flatten(opt.state)))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **state}, f)
    for old in _checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(ckpt: str, model, opt) -> dict:
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    model.load_weights(list(mx.load(os.path.join(ckpt, "weights.safetensors")).items()),
                       strict=False)
    opt.init(model.trainable_parameters())
    opt.state = tree_unflatten(list(mx.load(os.path.join(ckpt, "optimizer.safetensors")).items()))
    return state


def to_arrays(batch: data_mod.Batch) -> tuple:
    labels = data_mod.hard_targets(batch.input_ids, batch.next_ids)
    targets = {k: mx.array(v) for k, v in batch.targets.items()}
    return mx.array(batch.input_ids), mx.array(batch.loss_mask), mx.array(labels), targets


def train(cfg: Config, quiet: bool = False, log=print) -> Optional[dict]:
    """Train the student from the teacher, then evaluate it against the teacher (rank 0)."""
    from . import evaluate

    if not fit(cfg, quiet, log):  # returns once the student is saved and freed
        return None
    return evaluate.evaluate_run(cfg.run.dir, quiet=quiet, log=log)


class RunLock:
    """One `train` per run directory: a second one would interleave checkpoints and metrics.
    The lock file holds the owner's pid; a lock whose process is gone is stale and taken."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        pid = int(f.read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and files.pid_alive(pid):
                    raise ConfigError(f"run dir {os.path.dirname(self.path)} is in use by "
                                      f"process {pid}; wait for it or choose another run.dir")
                os.remove(self.path)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ConfigError(f"cannot take the lock {self.path}; remove it if no run is active")

    def __exit__(self, *exc):
        try:
            os.remove(self.path)
        except OSError:
            pass


def _load_student(cfg: Config, fingerprint: str, vocab: int):
    model, tok, scfg = models.load_role(cfg, "student")
    models.check_seq_len(cfg.data.seq_len, scfg, "student")
    if models.vocab_fingerprint(tok) != fingerprint:
        raise ConfigError(f"student {cfg.student.model} has another tokenizer than the teacher "
                          f"{cfg.teacher.model} (vocabulary fingerprints: teacher "
                          f"{fingerprint[:12]}, student {models.vocab_fingerprint(tok)[:12]}); "
                          "use a student of the teacher's family")
    if models.logits_size(scfg) < vocab:
        raise ConfigError(f"student vocab_size {models.logits_size(scfg)} is below the "
                          f"teacher's {vocab}")
    return model, tok, scfg


def _restore(run_dir: str, model, opt, metrics_path: str, log) -> dict:
    files.remove_stale_tmp(os.path.join(run_dir, "checkpoints"))  # saves cut by a kill
    ckpts = _checkpoints(run_dir)
    if not ckpts:
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
        return {"step": 0}
    state = restore_checkpoint(ckpts[-1], model, opt)
    # Drop metrics logged after the checkpoint: they will be logged again.
    if os.path.exists(metrics_path):
        with open(metrics_path, "r+b") as f:
            f.truncate(state["metrics_bytes"])
    log(f"resuming {run_dir} at step {state['step']}")
    return state


def fit(cfg: Config, quiet: bool = False, log=print) -> bool:
    """The training loop. Under `mlx.launch` every rank takes its share of each global batch
    and gradients are averaged; rank 0 alone writes. Returns True on rank 0."""
    world = World(cfg.run.dist_timeout)
    if not world.main:
        return _fit(cfg, world, True, lambda m: None)
    files.ensure_dir(cfg.run.dir, "run.dir")
    with RunLock(cfg.run.dir):
        return _fit(cfg, world, quiet, log)


def _fit(cfg: Config, world: "World", quiet: bool, log) -> bool:
    from . import plots

    t = cfg.train
    if t.batch_size % (world.size * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by ranks "
                          f"({world.size}) x train.grad_accum ({t.grad_accum})")
    run_dir = cfg.run.dir
    log(world.describe())
    if world.main:
        files.ensure_dir(run_dir, "run.dir")
        _check_same_run(cfg, run_dir)
    # A missing cache is built by all ranks together.
    source, vocab, fingerprint, teacher, manifest = batch_source(cfg, quiet, log, world)
    if world.size > 1:
        log(f"data parallel: {world.size} ranks, {t.batch_size // world.size} rows each")

    mx.random.seed(cfg.run.seed)
    model, tok, scfg = _load_student(cfg, fingerprint, vocab)
    ev = None
    if world.main:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        ev = eval_targets(cfg, run_dir, vocab, log, teacher)
    teacher_targets = None
    if teacher is not None:
        t_forward = models.logits_fn(teacher, vocab)

        def teacher_targets(x):
            # Dense targets from the live teacher; no gradient flows into it.
            lp = losses.log_softmax(mx.stop_gradient(t_forward(x)), cfg.loss.temperature)
            return {"logprobs": lp}

    adapter_cfg = models.setup_training(model, t.mode, t.lora_rank, t.lora_layers,
                                        t.lora_scale, t.lora_dropout)
    hidden = setup_hidden(cfg, model, scfg, manifest)
    opt = optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=t.weight_decay)
    opt.init(model.trainable_parameters())
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    resumed = _restore(run_dir, model, opt, metrics_path, log) if world.main else {"step": 0}
    step, history = resumed["step"], resumed.get("loss_window", [])
    skipped = resumed.get("skipped", 0)
    # Every rank starts from rank 0's weights, optimizer state and step.
    step = int(world.sum(np.array([step]), "agreeing on the resume step")[0])
    model.update(world.from_main(model.trainable_parameters(), "sharing rank 0's weights"))
    opt.state = world.from_main(opt.state, "sharing rank 0's optimizer state")
    mx.eval(model.parameters(), opt.state)
    log(f"student: {models.trainable_count(model):,} trainable parameters ({t.mode}), "
        f"{source.rows} {'cached' if teacher is None else 'online'} rows, {t.iters} steps "
        f"of {t.batch_size}x{cfg.data.seq_len}")

    lc = cfg.loss
    objective = kd_objective(cfg, model, vocab, log)

    def loss_fn(_model, x, mask, labels, targets):
        loss, ntok, kd, ce = objective(x, targets, labels, mask)
        hid = mx.array(0.0)
        if hidden is not None:
            pairs, store = hidden
            for j, (ls, lt) in enumerate(pairs):
                pred = model.distill_proj.maps[j](store[ls])
                hid = hid + losses.hidden_loss(pred, targets[f"hidden.{lt}"], mask,
                                               lc.hidden_loss)[0] / len(pairs)
            loss = loss + lc.hidden_weight * hid
        return loss, (ntok, kd, ce, hid)

    step_fn = make_step(model, opt, loss_fn, t.grad_clip, t.grad_accum, world)
    batches = source.batches(t.batch_size, cfg.run.seed, start_step=step, rank=world.rank,
                             size=world.size)
    bar = Progress(t.iters, "train", "tok", quiet)
    bar.done = step
    t_report, tok_report = time.time(), 0
    metrics_f = open(metrics_path, "a") if world.main else None
    # Steps not yet read back to the host: their values are read at report, eval and save
    # steps only (one transfer for all of them), so the loop never waits on a step's scalars.
    pending: list = []
    last: dict = {}

    def settle() -> None:
        nonlocal skipped
        if not pending:
            return
        rows = mx.stack([mx.concatenate([st, g[None], ok.astype(mx.float32)[None]])
                         for _, _, st, g, ok in pending]).tolist()
        for (at, on, *_), r in zip(pending, rows):
            loss_v, kd_v, ce_v, hid_v = (v / max(r[NTOK], 1.0) for v in r[1:5])
            # An on-policy step has no hard labels: its CE is absent, not a perfect 0.
            last.update(loss=loss_v, kd=kd_v, ce=None if on else ce_v, hidden=hid_v,
                        grad_norm=r[5])
            if r[6]:
                history.append(float(loss_v))
            elif skipped < t.nonfinite_skips:
                skipped += 1  # the weights stayed as they were; the data moves on
                log(f"step {at}: loss {loss_v}, gradient norm {r[5]}; update skipped "
                    f"({skipped} of train.nonfinite_skips={t.nonfinite_skips})")
            else:
                kept = _checkpoints(run_dir)
                pending.clear()
                raise FloatingPointError(
                    f"loss {loss_v}, gradient norm {r[5]} at step {at}; "
                    + (f"the last good checkpoint ({os.path.basename(kept[-1])}) is kept; "
                       if kept else "") + "lower train.lr or raise train.warmup"
                    + ("" if t.nonfinite_skips else
                       ", or let train.nonfinite_skips=N skip such steps"))
        pending.clear()

    restore_memory = loop_memory()
    try:
        while step < t.iters:
            # RNG is a function of the step, and of the rank: ranks must not share dropout
            # masks or on-policy samples (one process: rank 0 of 1, the same seed as ever)
            mx.random.seed((cfg.run.seed * 1_000_003 + step) * world.size + world.rank)
            x, mask, labels, targets = to_arrays(next(batches))
            if (on := onpolicy.is_on_policy(lc.lmbda, cfg.run.seed, step)):
                x, mask, labels = onpolicy.on_policy_batch(model, vocab, x)
            if teacher_targets is not None:
                targets = teacher_targets(x)
            out = step_fn(x, mask, labels, targets, f"step {step + 1}")
            # Queue this step and wait for the previous one: the host prepares the next
            # batch while the device computes, with at most one step in flight.
            mx.async_eval(out, model.parameters(), opt.state)
            if pending:
                mx.eval(pending[-1][2:])
            step += 1
            pending.append((step, on, *out))
            tok_report += x.size * world.size
            # Every rank settles at the same steps: a non-finite step stops all of them.
            if step == t.iters or not (step % t.report_every and step % t.save_every
                                       and step % t.eval_every):
                settle()
            bar.update(1, units=x.size * world.size,
                       postfix=f"loss {last['loss']:.3f}" if not pending and last else None)
            if not world.main:
                continue
            rec = None
            if step % t.report_every == 0 or step == t.iters:
                dt = time.time() - t_report
                # No "loss" when every step since the last report was skipped.
                rec = {"step": step, **({"loss": round(float(np.mean(history)), 5)}
                                        if history else {}),
                       "kd": round(float(last["kd"]), 5),
                       **({} if last["ce"] is None else {"ce": round(float(last["ce"]), 5)}),
                       "grad_norm": round(last["grad_norm"], 4),
                       "lr": float(opt.learning_rate.item()),
                       "tok_per_s": round(tok_report / max(dt, 1e-9), 1),
                       "peak_mem_gb": round(mx.get_peak_memory() / 1e9, 3)}
                if hidden is not None:
                    rec["hidden"] = round(float(last["hidden"]), 5)
                if skipped:
                    rec["skipped"] = skipped
                if lc.lmbda > 0:
                    rec["on_policy_steps"] = onpolicy.count(lc.lmbda, cfg.run.seed, step)
                history, t_report, tok_report = [], time.time(), 0
            if ev is not None and (step % t.eval_every == 0 or step == t.iters):
                rec = {**(rec or {"step": step}), **validate(model, ev, vocab)}
                if not bar.enabled and not quiet:
                    log(f"step {step}/{t.iters}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in rec.items() if k != "step"))
            if rec is not None:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
            if step % t.save_every == 0 or step == t.iters:
                # The data position is the step itself (the order is a function of seed and
                # step); metrics_bytes lets a resume cut metrics.jsonl back to this point, and
                # the loss window makes the next logged mean equal an uninterrupted run's.
                save_checkpoint(run_dir, step, model, opt,
                                {"data_step": step, "metrics_bytes": metrics_f.tell(),
                                 "loss_window": history, "skipped": skipped},
                                t.keep_checkpoints)
    finally:
        restore_memory()
        if metrics_f is not None:
            metrics_f.close()
        bar.close()

    if not world.main:
        return False
    if hidden is not None:  # training-only: keep it beside the student, not inside it
        mx.save_safetensors(os.path.join(run_dir, "hidden_projector.safetensors"),
                            dict(tree_flatten(model.pop("distill_proj").parameters())))
    if t.mode == "full":
        models.save_full_model(model, tok, scfg, cfg.student.model,
                               os.path.join(run_dir, "model"))
        log(f"saved the student to {os.path.join(run_dir, 'model')} (mlx_lm folder)")
    else:
        models.save_adapters(model, adapter_cfg, cfg.student.model, run_dir)
        log(f"saved {t.mode} adapters to {run_dir} (mlx_lm.generate --model "
            f"{cfg.student.model} --adapter-path {run_dir})")
    plots.plot_metrics(metrics_path, os.path.join(run_dir, "plots"))
    return True
