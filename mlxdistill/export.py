"""Export a trained student as a self-contained folder that mlx_lm and MLX Swift load:
LoRA/DoRA fused, optionally quantized, with a model card and a round-trip check.

MLX Swift's loader reads every *.safetensors in the folder, quantizes exactly the modules
whose `<path>.scales` exist (config.json's "quantization" block gives bits and group size)
and fails on extra or missing keys; tokenizers come from tokenizer.json +
tokenizer_config.json. The round trip reloads the written folder with `mlx_lm.load` and
compares its logits with the model that was evaluated, on fixed rows of held-out text.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_unflatten

from . import data as data_mod
from . import fallback, files, losses, models, saving
from .fallback import TARGET_QUALITY
from . import gguf as gguf_mod
from .cache import ShardReader
from .config import ConfigError
from .evaluate import fallback_summary
from .rundir import RunDir
from .shards import CacheError
from .step import to_arrays

BITS = (16, 8, 4)
ROUND_TRIP_ROWS = 4
TUNE_EVAL_ROWS = 8
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def fuse_adapters(model) -> int:
    """Replace every LoRA/DoRA layer by the plain layer with the update folded in."""
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def _check_out(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):  # --force replaces folders only
        raise ConfigError(f"output {out} is a file, not a folder; choose another -o (or move "
                          "the file away)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise ConfigError(f"output {out} exists and is not empty; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"output folder's parent {parent} is not an existing folder; "
                          "create it or choose another -o")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output folder's parent {parent} is not writable")


def _logits(model, x: mx.array, vocab: int) -> mx.array:
    return models.logits_fn(model, vocab)(x).astype(mx.float32)


def as_evaluated(model):
    """On a CPU, evaluation computes in float32 (mlx[cpu] has no fast float16 or quantized
    kernels: a 4-bit forward is ~50x slower), so a reloaded folder is dequantized there —
    the very weights stored, only the arithmetic is wider. On Metal: exactly as loaded."""
    if models.compute_dtype() is None:
        return model
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)
    model.set_dtype(models.compute_dtype())
    return model


def round_trip(ref_logits: mx.array, out: str, rows: mx.array, vocab: int) -> dict:
    """Reload `out` as an app would (mlx_lm.load, the weights as stored) and compare its
    logits with those of the evaluated model."""
    from mlx_lm.utils import load as mlx_load

    reloaded = as_evaluated(mlx_load(out)[0])
    a, b = ref_logits, _logits(reloaded, rows, vocab)
    kl = losses.dense_kl_pos(losses.log_softmax(b), losses.log_softmax(a)).mean()
    delta = mx.abs(a - b)
    diff = delta.max().item()
    flips = mx.argmax(a, -1) != mx.argmax(b, -1)
    # A position whose top two reference logits are closer than rounding moves a logit can
    # change its top-1 under any rounding; elsewhere a flip means the weights are wrong. The
    # rounding's size: the 99.9th percentile of the changes (one wrong logit does not set it).
    noise = float(np.quantile(np.array(delta).ravel(), 0.999))
    top2 = mx.topk(a, 2, axis=-1)
    gap = mx.abs(top2[..., 1] - top2[..., 0])
    return {"rows": int(rows.shape[0]), "positions": int(rows.size),
            "max_abs_logit_diff": round(diff, 6),
            "top1_agreement": round(1 - flips.mean().item(), 6),
            "top1_flips": int(flips.sum().item()),
            "flips_at_near_ties": int((flips & (gap <= 2 * noise)).sum().item()),
            "kl_reference_to_export": round(kl.item(), 8)}


def round_trip_check(rt: dict, bits: int) -> str:
    """16-bit: "pass" when the top-1 token is the float32 model's at every position but
    near-ties (top-2 gap within twice the rounding's size) and those are rare (agreement
    >= 0.99), else "FAIL"; quantized: "reported" (its agreement is the measurement)."""
    if bits != 16:
        return "reported"
    ok = rt["top1_flips"] == rt["flips_at_near_ties"] and rt["top1_agreement"] >= 0.99
    return "pass" if ok else "FAIL"


def _tunable(m) -> bool:
    return isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and \
        getattr(m, "mode", "affine") == "affine"


def tune_quantized(model, reader, vocab: int, iters: int, lr: float, batch_size: int,
                   seed: int, measure=None) -> tuple[list[float], tuple]:
    """Distillation-aware quantization: train only the quantization scales and biases so the
    quantized student's distribution moves back towards the teacher's, from the same cache
    the student was trained on (mlx_lm's DWQ idea, without a second teacher pass). The packed
    integer weights stay fixed. Returns the loss per step and `measure(model)` before and
    after tuning, taken on the float32 form of exactly the weights that are stored.

    The steps run on float32 weights rebuilt as q * scale + bias from the fixed integers q,
    which is exactly what the quantized matmul computes, differentiable in scale and bias, and
    on a CPU far faster than the quantized kernels (no fast path there)."""
    qmods = {name: m for name, m in model.named_modules() if _tunable(m)}
    if not qmods:
        raise ConfigError("--tune-iters: the model has no affine-quantized layer to tune")
    ints, params, floats = {}, {}, []
    for name, m in qmods.items():
        # Dequantizing with scale 1 and bias 0 recovers the integer levels exactly.
        ints[name] = mx.dequantize(m.weight, mx.ones_like(m.scales), mx.zeros_like(m.biases),
                                   m.group_size, m.bits).astype(mx.float32)
        params[name] = {"scales": m.scales.astype(mx.float32),
                        "biases": m.biases.astype(mx.float32)}
        if isinstance(m, nn.QuantizedLinear):
            f = nn.Linear(ints[name].shape[1], ints[name].shape[0], bias="bias" in m)
            if "bias" in m:
                f.bias = m.bias.astype(mx.float32)
        else:
            f = nn.Embedding(*ints[name].shape)
        floats.append((name, f))
    dtypes = {name: m.scales.dtype for name, m in qmods.items()}
    model.update_modules(tree_unflatten(floats))
    model.set_dtype(mx.float32)
    model.freeze()

    def weights(p):
        out = []
        for name, q in ints.items():
            m = qmods[name]
            g = q.reshape(q.shape[0], -1, m.group_size)
            w = g * p[name]["scales"][..., None] + p[name]["biases"][..., None]
            out.append((name + ".weight", w.reshape(q.shape)))
        return tree_unflatten(out)

    def loss_fn(p, x, mask, targets):
        model.update(weights(p))
        return losses.kd_loss(_logits(model, x, vocab), targets, mask)[0]

    def stored(p):  # the scales and biases as they will be saved
        return {n: {k: v.astype(dtypes[n]).astype(mx.float32) for k, v in d.items()}
                for n, d in p.items()}

    measured = []
    if measure:
        model.update(weights(stored(params)))
        measured.append(measure(model))
    opt = optim.Adam(learning_rate=lr, bias_correction=True)
    grad_fn = mx.value_and_grad(loss_fn)
    history = []
    for _, batch in zip(range(iters), reader.batches(batch_size, seed)):
        x, mask, _labels, targets = to_arrays(batch)
        loss, grads = grad_fn(params, x, mask, targets)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, loss)
        history.append(loss.item())
    if measure:
        model.update(weights(stored(params)))
        measured.append(measure(model))
    # Back to the quantized modules, with the tuned scales and biases in their own dtype.
    for name, m in qmods.items():
        m.scales = params[name]["scales"].astype(dtypes[name])
        m.biases = params[name]["biases"].astype(dtypes[name])
    model.update_modules(tree_unflatten(list(qmods.items())))
    model.set_dtype(next(iter(dtypes.values())))  # the float dtype the model was quantized in
    mx.eval(model.parameters())
    return history, tuple(measured)


def teacher_kl(model, teacher_lp: mx.array, rows: mx.array, vocab: int) -> float:
    lp = losses.log_softmax(_logits(model, rows, vocab))
    return round(losses.dense_kl_pos(lp, teacher_lp).mean().item(), 6)


CARD_TAGS = ["mlx", "distillation", "knowledge-distillation", "mlxdistill"]


def hub_name(model: str) -> str:
    """A model as a card names it: a hub id as it is; a local folder by its folder name,
    never its path (a card is published, and a path on this machine means nothing there)."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def card_metadata(teacher: str, student: str, bits: int) -> dict:
    """The card's YAML front matter, as the Hugging Face Hub reads it: the student's base is
    `base_model` (a distilled fine-tune of it: `base_model_relation: finetune`, quantized or
    not); the Hub has no key for a teacher, so it gets a custom one (`teacher_model`)."""
    return {"base_model": hub_name(student), "base_model_relation": "finetune",
            "library_name": "mlx", "pipeline_tag": "text-generation",
            "tags": CARD_TAGS + ([f"{bits}-bit"] if bits < 16 else []),
            "teacher_model": hub_name(teacher)}


def model_card(run_dir: str, teacher: str, student: str, bits: int, rt: dict,
               ev: Optional[dict], fb: Optional[dict] = None, tuning: Optional[dict] = None,
               prof: Optional[list] = None) -> str:
    meta = card_metadata(teacher, student, bits)
    local = [f"`{meta[k]}` ({k}) is the name of a local folder: set it to the model's Hub "
             "id before uploading" for k, m in (("base_model", student),
                                                 ("teacher_model", teacher))
             if os.path.isdir(m)]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip("\n"), "---", "",
             f"# {os.path.basename(os.path.abspath(run_dir))} (mlxdistill export)", "",
             f"Distilled with mlxdistill from the teacher `{meta['teacher_model']}` into the "
             f"student `{meta['base_model']}`; {bits}-bit weights.", ""]
    lines += ["; ".join(local) + ".", ""] if local else []
    lines += ["```bash", "mlx_lm.generate --model . --prompt \"...\"", "```", ""]
    if ev:
        lines += ["## Evaluation against the teacher", "",
                  f"On `{ev.get('data')}` ({ev.get('tokens')} tokens), before export:", "",
                  "| model | CE | next-token accuracy | KL(teacher‖student) | top-1 agreement |",
                  "|---|---|---|---|---|"]
        for name in ("teacher", "student_before", "student_after"):
            r = ev.get(name, {})
            lines.append(f"| {name.replace('_', ' ')} | {r.get('ce', '-')} | "
                         f"{r.get('accuracy', '-')} | {r.get('kl', '-')} | "
                         f"{r.get('agree_top1', '-')} |")
        lines.append("")
    if tuning:
        lines += ["## Distillation-aware quantization", "",
                  f"Quantization scales and biases tuned for {tuning['iters']} steps against "
                  f"the teacher cache: held-out KL to the teacher {tuning['kl_to_teacher_before']}"
                  f" → {tuning['kl_to_teacher_after']}.", ""]
    lines += ["## Round-trip check", "",
              f"Reloaded with `mlx_lm.load` and compared with the evaluated model on "
              f"{rt['positions']} positions: max |Δlogit| {rt['max_abs_logit_diff']}, "
              f"top-1 agreement {rt['top1_agreement']}"
              + (f" ({rt['top1_flips']} positions differ, {rt['flips_at_near_ties']} of them "
                 "near-ties of the reference)" if rt.get("top1_flips") else "") + ".", ""]
    if prof:
        lines += ["## Profile", "", f"Measured by `mlxdistill profile` on the "
                  f"{prof[0]['backend']} backend (figures from a Linux CPU do not transfer "
                  "to Apple devices):", "",
                  "| bits | peak MB | decode tok/s | TTFT ms |", "|---|---|---|---|"]
        for r in prof:
            lines.append(f"| {r['bits']} | {r['peak_memory_bytes'] / 1e6:.1f} | "
                         f"{r['decode_tok_s']['median']:.1f} | {r['ttft_s']['median'] * 1e3:.1f} |")
        lines.append("")
    if fb:
        lines += fallback.card_section(fb)
    return "\n".join(lines)


def _fallback(cfg, folder: str, tok, vocab: int, target: float) -> Optional[dict]:
    """The cloud-fallback rule measured on the exported model itself: its confidence is
    what the app will compare with the threshold, and quantization shifts it. Fitted on
    data.valid and reported on data.test as `eval` does (evaluate.fallback_summary), for
    this one target."""
    from mlx_lm.utils import load as mlx_load

    held = cfg.data.test or cfg.data.valid
    if not held:
        return None
    shipped = as_evaluated(mlx_load(folder)[0])
    teacher, ttok, _ = models.load_role(cfg, "teacher")
    summary = fallback_summary(teacher, shipped, tok, cfg, vocab, held, cfg.data.test_records,
                               teacher_tok=ttok, targets=(target,))
    res = fallback.threshold_for(summary, target)
    if res is not None:
        # what an app needs to compute the same signal (confidence.answer_signals's vocab)
        res["vocab"] = res["rule"]["vocab"] = vocab
    return res


def export_run(run_dir: str, out: str, bits: int = 16, group_size: int = 64,
               force: bool = False, log=print, tune_iters: int = 0,
               tune_lr: float = 1e-5, gguf: bool = False,
               target_quality: float = TARGET_QUALITY) -> dict:
    from mlx_lm.utils import save_config, save_model

    saving.check_quant(bits, group_size, BITS)
    if not 0.0 < target_quality <= 1.0:
        raise ConfigError(f"--target-quality {target_quality} must be a fraction of the "
                          "teacher's quality in (0, 1], e.g. 0.9")
    _check_out(out, force)
    run = RunDir(run_dir)
    cfg = run.load_config()
    src = run.model if os.path.isdir(run.model) else cfg.student.model
    config, tok = models.load_meta(src, "student")
    tok = models.use_chat_template(tok, cfg)  # held-out rows as trained
    config = dict(config)
    # The tokenizer files come from the student itself (training never changes them).
    tok_src = saving.local_folder(cfg.student.model) or src
    if gguf:
        gguf_mod.check(config, bits, tok_src)  # before any compute
    model = run.load_student(cfg)
    vocab = models.logits_size(config)
    nfused = fuse_adapters(model)
    model.eval()

    # Fixed rows of held-out text: the same positions for every export of this run.
    test = cfg.data.test or cfg.data.valid or cfg.data.train
    packed = data_mod.pack(test, tok, cfg.data.seq_len, cfg.data.mask_prompt, ROUND_TRIP_ROWS,
                           packing=cfg.data.packing)
    rows = mx.array(packed.input_ids)
    ref_logits = _logits(model, rows, vocab)  # the model as evaluated after training
    mx.eval(ref_logits)

    tuning = None
    # Apps run float16: the unquantized parameters (norms, and scales and biases when
    # quantized) are stored as float16 too, as mlx_lm.convert does.
    model.set_dtype(mx.float16)
    config["torch_dtype"] = "float16"
    if bits < 16:
        model, config = saving.quantize(model, config, group_size, bits)
        if tune_iters > 0:
            tuning = _tune(cfg, model, tok, vocab, tune_iters, tune_lr, log)
    config.pop("quantization_config", None)

    # Everything is written into a temporary folder that replaces `out` as a whole only once
    # it is complete and checked (a non-empty `out` only with --force: _check_out), and is
    # removed if anything fails on the way. atomic_dir also gives the files the umask's
    # mode: MLX writes its files 0644 whatever the umask allows.
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(files.atomic_dir(out))  # creating it can fail too
            save_model(tmp, model)
        except OSError as e:
            raise ConfigError(f"cannot write the export to {out}: {e.strerror or e}; choose a "
                              "writable -o folder") from None
        save_config(config, os.path.join(tmp, "config.json"))
        saving.copy_tokenizer(tok, tok_src, tmp,
                              data_mod.chat_template_text(cfg.data.chat_template))
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(tmp, f))]
        if missing:
            raise ConfigError(f"the student's tokenizer could not be written as {missing}; MLX "
                              "Swift needs tokenizer.json: convert the tokenizer with "
                              "transformers first")
        gguf_rep = gguf_mod.write(model, config, tok, tmp) if gguf else None

        # Round trip against the float32 reference, before the folder takes its final name.
        rt = round_trip(ref_logits, tmp, rows, vocab)
        rt["check"] = round_trip_check(rt, bits)
        fb = _fallback(cfg, tmp, tok, vocab, target_quality)
        ev = json.load(open(run.eval_json)) if os.path.exists(run.eval_json) else None
        prof = _profile_rows(run_dir, bits)
        report = {"run_dir": run_dir, "bits": bits,
                  "group_size": group_size if bits < 16 else None,
                  "fused_layers": nfused, "round_trip": rt, "tuning": tuning, "gguf": gguf_rep,
                  "fallback": fb, "profile": prof,
                  "files": sorted(os.listdir(tmp)) + ["README.md", "export.json"],
                  "size_bytes": sum(os.path.getsize(p)
                                    for p in glob.glob(os.path.join(tmp, "*")))}
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(run_dir, cfg.teacher.model, cfg.student.model, bits, rt, ev,
                               fb, tuning, prof))
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(report, f, indent=2)
    log(f"exported {run_dir} -> {out} ({bits}-bit, {report['size_bytes'] / 1e6:.1f} MB); "
        f"round trip: top-1 agreement {rt['top1_agreement']}, max |Δlogit| "
        f"{rt['max_abs_logit_diff']}")
    if fb:
        t = fb["test"]
        log(f"cloud fallback for {target_quality:.0%} of the teacher's quality (fitted on "
            f"{fb['data']['fit']}): {fb['rule_text']}; on {fb['data']['report']} "
            f"{t['deferred_fraction']:.0%} of queries deferred, "
            f"{t['gain_at_rate']:+.3f} {fb['quality']} over random deferral of that share")
    return report


def _profile_rows(run_dir: str, bits: int) -> Optional[list]:
    """The student's rows at `bits` from RUN_DIR/profile/profile.json, if it was profiled."""
    path = os.path.join(RunDir(run_dir).profile, "profile.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rep = json.load(f)
    rows = [r for r in rep.get("results", []) if r.get("role") == "student" and r["bits"] == bits]
    return [{"backend": rep["hardware"].get("backend"), **r} for r in rows] or None


def _tune(cfg, model, tok, vocab: int, iters: int, lr: float, log) -> dict:
    """Tune a quantized student against the run's teacher cache; KL to the live teacher on
    held-out rows before and after says whether it helped."""

    if cfg.teacher.mode != "cache":
        raise ConfigError("quantization tuning reads the run's teacher cache; this run used "
                          "teacher.mode=online")
    try:
        reader = ShardReader(cfg.cache.dir, rows=cfg.data.max_rows)  # the rows it trained on
    except CacheError as e:
        raise ConfigError(f"quantization tuning needs the run's cache: {e}") from None
    teacher = models.load_role(cfg, "teacher")[0]
    held = cfg.data.test or cfg.data.valid
    packed = data_mod.pack(held, tok, cfg.data.seq_len, cfg.data.mask_prompt, TUNE_EVAL_ROWS,
                           packing=cfg.data.packing)
    rows = mx.array(packed.input_ids)
    teacher_lp = losses.log_softmax(_logits(teacher, rows, vocab))
    mx.eval(teacher_lp)
    del teacher
    hist, (before, after) = tune_quantized(
        model, reader, vocab, iters, lr, cfg.train.batch_size, cfg.run.seed,
        measure=lambda m: teacher_kl(m, teacher_lp, rows, vocab))
    log(f"quantization tuning: {iters} steps, held-out KL to teacher {before} -> {after}")
    return {"iters": iters, "lr": lr, "heldout_rows": int(rows.shape[0]),
            "kl_to_teacher_before": before, "kl_to_teacher_after": after,
            "loss_first": round(hist[0], 5), "loss_last": round(hist[-1], 5)}
