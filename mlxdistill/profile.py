"""On-device numbers before shipping: latency, memory and fidelity per precision, and a
projection onto target devices.

Measured here, on the running machine: load time, time to first token, prefill and decode
tok/s (median and range over repeats, after a warm-up), peak memory, weight bytes, and
KL / top-1 agreement of each precision against the full-precision model on fixed rows.
Projected (estimates, labelled so): whether the model fits each device's app memory, and
its decode speed there. Decode is memory-bound, so tok/s scales with bandwidth:
    device tok/s ~= measured tok/s x device bandwidth / this machine's measured bandwidth.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import losses, models
from .config import ConfigError

DEVICES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "devices.json")
BITS = (32, 16, 8, 4)


def hardware() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "backend": "metal" if mx.metal.is_available() else "cpu",
            "device": str(mx.default_device())}
    try:
        d = mx.device_info()
        info.update({k: d[k] for k in ("device_name", "architecture", "memory_size")
                     if k in d})
    except Exception:  # device_info is Metal-only on some versions
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def memory_bandwidth_gbs(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Read bandwidth of this machine as MLX sees it: a sum over a large array."""
    x = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(x)
    mx.eval(x.sum())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(x.sum())
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def at_precision(path: str, bits: int, group_size: int):
    """The model at `bits`: 32/16 cast, 8/4 mlx_lm affine quantization."""
    from mlx_lm.utils import load as mlx_load

    model, tok, config = mlx_load(path, return_config=True)
    if bits == 32:
        model.set_dtype(mx.float32)
    elif bits == 16:
        model.set_dtype(mx.float16)
    else:
        model.set_dtype(mx.float16)
        model, _ = models.quantize(model, config, group_size, bits)
    mx.eval(model.parameters())
    return model, tok, config


def time_generation(model, prompt: mx.array, gen_tokens: int) -> dict:
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    ttft, n = None, 0
    for tok, _ in generate_step(prompt, model, max_tokens=gen_tokens):
        mx.eval(tok)
        n += 1
        if ttft is None:
            ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"ttft_s": ttft, "prefill_tok_s": prompt.size / ttft,
            "decode_tok_s": (n - 1) / max(total - ttft, 1e-9) if n > 1 else 0.0}


def _stat(values: list) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def profile_model(path: str, bits_list, prompt_tokens: int, gen_tokens: int,
                  repeats: int, group_size: int, rows: Optional[mx.array] = None,
                  log=print) -> list[dict]:
    out = []
    reference = None
    for bits in bits_list:
        t0 = time.perf_counter()
        model, tok, config = at_precision(path, bits, group_size)
        load_s = time.perf_counter() - t0
        vocab = models.logits_size(config)
        if rows is None:
            rows = mx.random.randint(3, vocab, (2, 64), key=mx.random.key(0))
        prompt = rows.reshape(-1)[:prompt_tokens]
        if prompt.size < prompt_tokens:
            prompt = mx.tile(prompt, (prompt_tokens // prompt.size + 1,))[:prompt_tokens]
        time_generation(model, prompt, 2)  # warm-up: compile kernels, allocate caches
        runs = []
        for _ in range(repeats):
            mx.reset_peak_memory()
            runs.append(time_generation(model, prompt, gen_tokens))
        peak = mx.get_peak_memory()
        logits = models.logits_fn(model, vocab)(rows).astype(mx.float32)
        if reference is None:
            reference = logits  # the first (highest) precision is the reference
        kl = losses.dense_kl_pos(losses.log_softmax(logits), losses.log_softmax(reference))
        rec = {"model": path, "bits": bits, "load_s": round(load_s, 3),
               "weight_bytes": weight_bytes(model), "peak_memory_bytes": int(peak),
               "ttft_s": _stat([r["ttft_s"] for r in runs]),
               "prefill_tok_s": _stat([r["prefill_tok_s"] for r in runs]),
               "decode_tok_s": _stat([r["decode_tok_s"] for r in runs]),
               "kl_to_reference": round(kl.mean().item(), 6),
               "top1_agreement": round((mx.argmax(logits, -1) == mx.argmax(reference, -1))
                                       .mean().item(), 4)}
        log(f"{os.path.basename(path.rstrip('/'))} {bits}-bit: decode "
            f"{rec['decode_tok_s']['median']:.1f} tok/s, peak {peak / 1e6:.1f} MB")
        out.append(rec)
        del model
    return out


def load_devices(path: str = DEVICES) -> list[dict]:
    with open(path) as f:
        return json.load(f)["devices"]


def project(rec: dict, devices: list[dict], local_bw_gbs: float) -> list[dict]:
    """Fit and estimated decode speed of one profiled model on each device (estimates)."""
    out = []
    need = rec["peak_memory_bytes"] / 2**30
    for d in devices:
        budget = d["app_memory_gb"]
        out.append({
            "device": d["name"], "app_memory_gb": budget, "needs_gb": round(need, 3),
            "fits": need <= budget, "headroom_gb": round(budget - need, 3),
            "est_decode_tok_s": round(rec["decode_tok_s"]["median"] * d["bandwidth_gbs"]
                                      / local_bw_gbs, 1),
            "bandwidth_is_estimate": d.get("bandwidth_is_estimate", False),
        })
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{os.path.basename(r['model'].rstrip('/'))}\n{r['bits']}-bit" for r in results]
    axes[0].bar(labels, [r["decode_tok_s"]["median"] for r in results])
    axes[0].set_title("decode tok/s (this machine)")
    axes[1].bar(labels, [r["peak_memory_bytes"] / 1e6 for r in results])
    axes[1].set_title("peak memory (MB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def resolve_targets(target: str) -> tuple[list[tuple[str, str]], Optional[str]]:
    """[(label, model folder)], run dir or None. A run profiles its teacher and student."""
    if os.path.isfile(os.path.join(target, "config.yaml")):
        from .evaluate import _load_run_config

        cfg = _load_run_config(target)
        student = os.path.join(target, "model")
        if not os.path.isdir(student):
            raise ConfigError(f"{target} is a LoRA run: profile a folder made by "
                              f"`mlxdistill export {target} -o OUT` (adapters fused)")
        return [("teacher", cfg.teacher.model), ("student", student)], target
    if not os.path.isfile(os.path.join(target, "config.json")):
        raise ConfigError(f"{target} is neither a model folder (config.json) nor a run "
                          "directory (config.yaml)")
    return [("model", target)], None


def run_profile(target: str, bits_list, prompt_tokens: int = 128, gen_tokens: int = 64,
                repeats: int = 3, group_size: int = 64, out_dir: Optional[str] = None,
                log=print) -> dict:
    for b in bits_list:
        if b not in BITS:
            raise ConfigError(f"--bits {b} is not supported; use some of 32, 16, 8, 4")
    if prompt_tokens < 1 or gen_tokens < 2 or repeats < 1:
        raise ConfigError("--prompt-tokens must be >= 1, --gen-tokens >= 2, --repeats >= 1")
    targets, run_dir = resolve_targets(target)
    bw = memory_bandwidth_gbs()
    results = []
    for label, path in targets:
        for rec in profile_model(path, bits_list, prompt_tokens, gen_tokens, repeats,
                                 group_size, log=log):
            rec["role"] = label
            results.append(rec)
    devices = load_devices()
    report = {
        "hardware": {**hardware(), "measured_bandwidth_gbs": round(bw, 1)},
        "settings": {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
                     "repeats": repeats, "group_size": group_size},
        "results": results,
        "projection": {
            "method": "fits: peak memory <= the device's app memory budget; decode tok/s: "
                      "measured median x device bandwidth / this machine's measured read "
                      "bandwidth (decode is memory-bound). Estimates, not measurements.",
            "per_model": [{"role": r["role"], "bits": r["bits"],
                           "devices": project(r, devices, bw)} for r in results]},
    }
    out_dir = out_dir or (os.path.join(run_dir, "profile") if run_dir else None)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "profile.json.tmp"), "w") as f:
            json.dump(report, f, indent=2)
        os.replace(os.path.join(out_dir, "profile.json.tmp"),
                   os.path.join(out_dir, "profile.json"))
        plot(results, os.path.join(out_dir, "profile.png"))
        report["written"] = out_dir
    return report


def format_report(rep: dict) -> str:
    h = rep["hardware"]
    lines = [f"hardware: {h.get('device_name', h['machine'])}, backend {h['backend']}, "
             f"measured read bandwidth {h['measured_bandwidth_gbs']} GB/s",
             f"{'model':<9}{'bits':>5}{'MB':>8}{'peak MB':>9}{'TTFT ms':>9}"
             f"{'prefill/s':>11}{'decode/s':>10}{'KL':>9}{'top-1':>7}"]
    for r in rep["results"]:
        lines.append(f"{r['role']:<9}{r['bits']:>5}{r['weight_bytes'] / 1e6:>8.1f}"
                     f"{r['peak_memory_bytes'] / 1e6:>9.1f}{r['ttft_s']['median'] * 1e3:>9.1f}"
                     f"{r['prefill_tok_s']['median']:>11.0f}{r['decode_tok_s']['median']:>10.1f}"
                     f"{r['kl_to_reference']:>9.4f}{r['top1_agreement']:>7.3f}")
    lines.append("projection (estimates): " + rep["projection"]["method"])
    for pm in rep["projection"]["per_model"]:
        fits = [f"{d['device']}: {'fits' if d['fits'] else 'NO'} ~{d['est_decode_tok_s']:.0f} tok/s"
                for d in pm["devices"]]
        lines.append(f"  {pm['role']} {pm['bits']}-bit: " + "; ".join(fits))
    return "\n".join(lines)
