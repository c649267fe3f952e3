"""Export a trained student as a self-contained folder that mlx_lm and MLX Swift load:
LoRA/DoRA fused, optionally quantized, with a model card and a round-trip check.

MLX Swift's loader reads every *.safetensors in the folder, quantizes exactly the modules
whose `<path>.scales` exist (config.json's "quantization" block gives bits and group size)
and fails on extra or missing keys; tokenizers come from tokenizer.json +
tokenizer_config.json. The round trip reloads the written folder with `mlx_lm.load` and
compares its logits with the model that was evaluated, on fixed rows of held-out text.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import data as data_mod
from . import losses, models
from .config import ConfigError

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
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise ConfigError(f"output {out} exists and is not empty; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"output folder's parent {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output folder's parent {parent} is not writable")


def _logits(model, x: mx.array, vocab: int) -> mx.array:
    return models.logits_fn(model, vocab)(x).astype(mx.float32)


def round_trip(ref_logits: mx.array, out: str, rows: mx.array, vocab: int) -> dict:
    """Reload `out` exactly as an app would (mlx_lm.load, weights as stored) and compare its
    logits with those of the evaluated model."""
    from mlx_lm.utils import load as mlx_load

    reloaded, _ = mlx_load(out)
    a, b = ref_logits, _logits(reloaded, rows, vocab)
    kl = losses.dense_kl_pos(losses.log_softmax(b), losses.log_softmax(a)).mean()
    return {"rows": int(rows.shape[0]), "positions": int(rows.size),
            "max_abs_logit_diff": round(mx.abs(a - b).max().item(), 6),
            "top1_agreement": round((mx.argmax(a, -1) == mx.argmax(b, -1)).mean().item(), 6),
            "kl_reference_to_export": round(kl.item(), 8)}


def _tunable(m) -> bool:
    return isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and \
        getattr(m, "mode", "affine") == "affine"


def tune_quantized(model, reader, vocab: int, iters: int, lr: float, batch_size: int,
                   seed: int) -> list[float]:
    """Distillation-aware quantization: train only the quantization scales and biases so the
    quantized student's distribution moves back towards the teacher's, from the same cache
    the student was trained on (mlx_lm's DWQ idea, without a second teacher pass). The packed
    integer weights stay fixed. Returns the loss per step.

    The steps run on float32 weights rebuilt as q * scale + bias from the fixed integers q,
    which is exactly what the quantized matmul computes, differentiable in scale and bias, and
    on a CPU far faster than the quantized kernels (no fast path there)."""
    import mlx.optimizers as optim

    from .trainer import to_arrays

    qmods = {name: m for name, m in model.named_modules() if _tunable(m)}
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

    opt = optim.Adam(learning_rate=lr, bias_correction=True)
    grad_fn = mx.value_and_grad(loss_fn)
    history = []
    for _, batch in zip(range(iters), reader.batches(batch_size, seed)):
        x, mask, _labels, targets = to_arrays(batch)
        loss, grads = grad_fn(params, x, mask, targets)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, loss)
        history.append(loss.item())
    # Back to the quantized modules, with the tuned scales and biases in their own dtype.
    for name, m in qmods.items():
        m.scales = params[name]["scales"].astype(dtypes[name])
        m.biases = params[name]["biases"].astype(dtypes[name])
    model.update_modules(tree_unflatten(list(qmods.items())))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return history


def teacher_kl(model, teacher_lp: mx.array, rows: mx.array, vocab: int) -> float:
    lp = losses.log_softmax(_logits(model, rows, vocab))
    return round(losses.dense_kl_pos(lp, teacher_lp).mean().item(), 6)


def model_card(run_dir: str, base: str, bits: int, rt: dict, ev: Optional[dict]) -> str:
    lines = [f"# {os.path.basename(os.path.abspath(run_dir))} (mlxdistill export)", "",
             f"Student distilled from `{base}` with mlxdistill; {bits}-bit weights.", "",
             "```bash", "mlx_lm.generate --model . --prompt \"...\"", "```", ""]
    if ev:
        lines += ["## Evaluation against the teacher", "",
                  f"On `{ev.get('data')}` ({ev.get('tokens')} tokens):", "",
                  "| model | CE | next-token accuracy | KL(teacher‖student) | top-1 agreement |",
                  "|---|---|---|---|---|"]
        for name in ("teacher", "student_before", "student_after"):
            r = ev.get(name, {})
            lines.append(f"| {name.replace('_', ' ')} | {r.get('ce', '-')} | "
                         f"{r.get('accuracy', '-')} | {r.get('kl', '-')} | "
                         f"{r.get('agree_top1', '-')} |")
        lines.append("")
    lines += ["## Round-trip check", "",
              f"Reloaded with `mlx_lm.load` and compared with the evaluated model on "
              f"{rt['positions']} positions: max |Δlogit| {rt['max_abs_logit_diff']}, "
              f"top-1 agreement {rt['top1_agreement']}.", ""]
    return "\n".join(lines)


def export_run(run_dir: str, out: str, bits: int = 16, group_size: int = 64,
               force: bool = False, log=print, tune_iters: int = 0,
               tune_lr: float = 1e-4) -> dict:
    from mlx_lm.utils import save_config, save_model

    from .evaluate import _load_run_config, load_trained_student

    if bits not in BITS:
        raise ConfigError(f"--bits {bits} is not supported; use one of 16, 8, 4")
    _check_out(out, force)
    cfg = _load_run_config(run_dir)
    model = load_trained_student(run_dir, cfg)
    src = os.path.join(run_dir, "model") if os.path.isdir(os.path.join(run_dir, "model")) \
        else cfg.student.model
    config, tok = models.load_meta(src, "student")
    config = dict(config)
    vocab = models.logits_size(config)
    nfused = fuse_adapters(model)
    model.eval()

    # Fixed rows of held-out text: the same positions for every export of this run.
    test = cfg.data.test or cfg.data.valid or cfg.data.train
    packed = data_mod.pack(test, tok, cfg.data.seq_len, cfg.data.mask_prompt, ROUND_TRIP_ROWS)
    rows = mx.array(packed.input_ids)
    ref_logits = _logits(model, rows, vocab)  # the model as evaluated after training
    mx.eval(ref_logits)

    tuning = None
    # Apps run float16: the unquantized parameters (norms, and scales and biases when
    # quantized) are stored as float16 too, as mlx_lm.convert does.
    model.set_dtype(mx.float16)
    config["torch_dtype"] = "float16"
    if bits < 16:
        model, config = models.quantize(model, config, group_size, bits)
        if tune_iters > 0:
            tuning = _tune(cfg, model, tok, vocab, tune_iters, tune_lr, log)
    config.pop("quantization_config", None)

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model)
    save_config(config, os.path.join(tmp, "config.json"))
    tok.save_pretrained(tmp)
    for f in glob.glob(os.path.join(src, "tokenizer*")) + glob.glob(os.path.join(src, "*.model")):
        if not os.path.exists(os.path.join(tmp, os.path.basename(f))):
            shutil.copy(f, tmp)
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(tmp, f))]
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"the student's tokenizer could not be written as {missing}; MLX Swift "
                          "needs tokenizer.json: convert the tokenizer with transformers first")

    # Round trip against the float32 reference, before the folder takes its final name.
    rt = round_trip(ref_logits, tmp, rows, vocab)
    ev_path = os.path.join(run_dir, "eval.json")
    ev = json.load(open(ev_path)) if os.path.exists(ev_path) else None
    report = {"run_dir": run_dir, "bits": bits, "group_size": group_size if bits < 16 else None,
              "fused_layers": nfused, "round_trip": rt, "tuning": tuning,
              "files": sorted(os.listdir(tmp)) + ["README.md", "export.json"],
              "size_bytes": sum(os.path.getsize(p) for p in glob.glob(os.path.join(tmp, "*")))}
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(run_dir, cfg.teacher.model, bits, rt, ev))
    with open(os.path.join(tmp, "export.json"), "w") as f:
        json.dump(report, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"exported {run_dir} -> {out} ({bits}-bit, {report['size_bytes'] / 1e6:.1f} MB); "
        f"round trip: top-1 agreement {rt['top1_agreement']}, max |Δlogit| "
        f"{rt['max_abs_logit_diff']}")
    return report


def _tune(cfg, model, tok, vocab: int, iters: int, lr: float, log) -> dict:
    """Tune a quantized student against the run's teacher cache; KL to the live teacher on
    held-out rows before and after says whether it helped."""
    from .cache import CacheError, ShardReader

    if cfg.teacher.mode != "cache":
        raise ConfigError("quantization tuning reads the run's teacher cache; this run used "
                          "teacher.mode=online")
    try:
        reader = ShardReader(cfg.cache.dir)
    except CacheError as e:
        raise ConfigError(f"quantization tuning needs the run's cache: {e}") from None
    teacher = models.load_role(cfg, "teacher")[0]
    held = cfg.data.test or cfg.data.valid
    packed = data_mod.pack(held, tok, cfg.data.seq_len, cfg.data.mask_prompt, TUNE_EVAL_ROWS)
    rows = mx.array(packed.input_ids)
    teacher_lp = losses.log_softmax(_logits(teacher, rows, vocab))
    mx.eval(teacher_lp)
    del teacher
    before = teacher_kl(model, teacher_lp, rows, vocab)
    hist = tune_quantized(model, reader, vocab, iters, lr, cfg.train.batch_size, cfg.run.seed)
    after = teacher_kl(model, teacher_lp, rows, vocab)
    log(f"quantization tuning: {iters} steps, held-out KL to teacher {before} -> {after}")
    return {"iters": iters, "lr": lr, "heldout_rows": int(rows.shape[0]),
            "kl_to_teacher_before": before, "kl_to_teacher_after": after,
            "loss_first": round(hist[0], 5), "loss_last": round(hist[-1], 5)}
