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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import data as data_mod
from . import files, losses, models, saving
from .config import ConfigError
from .export import as_evaluated
from .rundir import RunDir

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
    """The model at `bits`: 32/16 cast, 8/4 mlx_lm affine quantization from float16 (as
    mlx_lm.convert does). Returns (model, config with its quantization block)."""
    from mlx_lm.utils import load as mlx_load

    model, _, config = mlx_load(path, return_config=True)
    config = dict(config)
    model.set_dtype(mx.float32 if bits == 32 else mx.float16)
    config["torch_dtype"] = "float32" if bits == 32 else "float16"
    if bits < 16:
        model, config = saving.quantize(model, config, group_size, bits)
    mx.eval(model.parameters())
    return model, config


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


def measure_folder(folder: str, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    """Load time, generation timings and peak memory of the model stored in `folder`, in
    this process. Meant to run in a fresh process (see `measure`), so that the peak is what
    an app holding only this model would need: weights as stored, KV cache, activations."""
    from mlx_lm.utils import load_model

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, config = load_model(Path(folder))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    vocab = models.logits_size(config)
    prompt = mx.random.randint(3, vocab, (prompt_tokens,), key=mx.random.key(0))
    time_generation(model, prompt, 2)  # warm-up: compile kernels, allocate caches
    runs = [time_generation(model, prompt, gen_tokens) for _ in range(repeats)]
    return {"load_s": round(load_s, 4), "weight_bytes": weight_bytes(model),
            "peak_memory_bytes": int(mx.get_peak_memory()),
            "ttft_s": _stat([r["ttft_s"] for r in runs]),
            "prefill_tok_s": _stat([r["prefill_tok_s"] for r in runs]),
            "decode_tok_s": _stat([r["decode_tok_s"] for r in runs])}


def measure(folder: str, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    """measure_folder in a fresh Python process: nothing else this process allocated (the
    other precisions, the reference logits) counts towards the peak."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-m", "mlxdistill.profile", folder,
                           str(prompt_tokens), str(gen_tokens), str(repeats)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"profiling {folder} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".safetensors"))


def profile_model(path: str, bits_list, prompt_tokens: int, gen_tokens: int,
                  repeats: int, group_size: int, rows: Optional[mx.array] = None,
                  log=print) -> list[dict]:
    """Per precision: the model is converted here, written to a temporary folder exactly as
    `export` would store it, and measured from that folder in a fresh process; fidelity (KL,
    top-1 agreement against the first precision) is computed here on fixed rows."""
    from mlx_lm.utils import save_config, save_model

    out = []
    reference = None
    for bits in bits_list:
        model, config = at_precision(path, bits, group_size)
        vocab = models.logits_size(config)
        if rows is None:
            rows = mx.random.randint(3, vocab, (2, 64), key=mx.random.key(0))
        with tempfile.TemporaryDirectory(prefix="mlxdistill-profile-") as d:
            save_model(d, model)
            config.pop("quantization_config", None)
            save_config(config, os.path.join(d, "config.json"))
            m = measure(d, prompt_tokens, gen_tokens, repeats)
            size = disk_bytes(d)
        # Fidelity of the stored weights; on a CPU computed in float32 like every evaluation
        # there (its float16 and quantized kernels are slow, not different in kind).

        model = as_evaluated(model)
        logits = models.logits_fn(model, vocab)(rows).astype(mx.float32)
        mx.eval(logits)
        del model
        if reference is None:
            reference = logits  # the first (highest) precision is the reference
        kl = losses.dense_kl_pos(losses.log_softmax(logits), losses.log_softmax(reference))
        rec = {"model": path, "bits": bits, "load_s": m["load_s"], "disk_bytes": size,
               "weight_bytes": m["weight_bytes"], "peak_memory_bytes": m["peak_memory_bytes"],
               "ttft_s": m["ttft_s"], "prefill_tok_s": m["prefill_tok_s"],
               "decode_tok_s": m["decode_tok_s"],
               "kl_to_reference": round(kl.mean().item(), 6),
               "top1_agreement": round((mx.argmax(logits, -1) == mx.argmax(reference, -1))
                                       .mean().item(), 4)}
        log(f"{os.path.basename(path.rstrip('/'))} {bits}-bit: decode "
            f"{rec['decode_tok_s']['median']:.1f} tok/s, peak {rec['peak_memory_bytes'] / 1e6:.1f} MB")
        out.append(rec)
    return out


def load_devices(path: str = DEVICES) -> list[dict]:
    with open(path) as f:
        return json.load(f)["devices"]


def project(rec: dict, devices: list[dict], local_bw_gbs: float,
            speed: bool = True) -> list[dict]:
    """Fit and estimated decode speed of one profiled model on each device (estimates).
    `speed=False` withholds the speed estimate (a measurement that does not scale)."""
    out = []
    need = rec["peak_memory_bytes"] / 2**30
    for d in devices:
        budget = d["app_memory_gb"]
        est = rec["decode_tok_s"]["median"] * d["bandwidth_gbs"] / local_bw_gbs
        out.append({
            "device": d["name"], "app_memory_gb": budget, "needs_gb": round(need, 4),
            "fits": need <= budget, "headroom_gb": round(budget - need, 3),
            "est_decode_tok_s": round(est, 1) if speed else None,
            "bandwidth_is_estimate": d.get("bandwidth_is_estimate", False),
        })
    return out


def plot(results: list[dict], path: str, backend: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r.get('role') or os.path.basename(r['model'].rstrip('/'))}\n{r['bits']}-bit"
              for r in results]
    dec = [r["decode_tok_s"] for r in results]
    axes[0].bar(labels, [d["median"] for d in dec],
                yerr=[[d["median"] - d["min"] for d in dec], [d["max"] - d["median"] for d in dec]],
                capsize=3)
    axes[0].set_title(f"decode tok/s, median and range ({backend} backend)")
    axes[1].bar(labels, [r["peak_memory_bytes"] / 1e6 for r in results])
    axes[1].set_title("peak memory (MB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def resolve_targets(target: str) -> tuple[list[tuple[str, str]], Optional[str]]:
    """[(label, model folder)], run dir or None. A run profiles its teacher and student."""
    run = RunDir(target)
    if run.is_run():
        cfg = run.load_config()
        student = run.model
        if not os.path.isdir(student):
            raise ConfigError(f"{target} is a LoRA run: profile a folder made by "
                              f"`mlxdistill export {target} -o OUT` (adapters fused)")
        return [("teacher", cfg.teacher.model), ("student", student)], target
    if not os.path.isfile(os.path.join(target, "config.json")):
        raise ConfigError(f"{target} is neither a model folder (config.json) nor a run "
                          "directory (config.yaml)")
    if not models.is_model_folder(target):
        raise ConfigError(f"model folder {target} has config.json but no *.safetensors "
                          "weights; convert it with `mlx_lm.convert` first")
    return [("model", target)], None


def fidelity_text(run_dir: Optional[str]) -> tuple[Optional[mx.array], str]:
    """Rows the precisions are compared on: a run's held-out text (2 x 64 tokens, what the
    model will see), else fixed random token ids (a bare model folder has no data)."""
    if run_dir:
        run = RunDir(run_dir)
        cfg = run.load_config()
        held = cfg.data.test or cfg.data.valid
        if held:
            _, tok = models.load_meta(run.model, "student")
            tok = models.use_chat_template(tok, cfg)
            packed = data_mod.pack(held, tok, 64, cfg.data.mask_prompt, 2)
            return mx.array(packed.input_ids), f"{held} (2 x 64 tokens)"
    return None, "random token ids (2 x 64, fixed seed)"


def run_profile(target: str, bits_list, prompt_tokens: int = 128, gen_tokens: int = 64,
                repeats: int = 3, group_size: int = 64, out_dir: Optional[str] = None,
                log=print) -> dict:
    saving.check_quant(bits_list, group_size, BITS, pick="some")
    if prompt_tokens < 1 or gen_tokens < 2 or repeats < 1:
        raise ConfigError("--prompt-tokens must be >= 1, --gen-tokens >= 2, --repeats >= 1")
    targets, run_dir = resolve_targets(target)
    out_dir = out_dir or (RunDir(run_dir).profile if run_dir else None)
    blocker = files.file_in_the_way(out_dir) if out_dir else None
    if blocker:  # before minutes of measurements, not after them
        raise ConfigError(f"cannot write the profile to {out_dir}: {blocker} is a file, not "
                          "a folder; choose another -o folder")
    rows, fidelity_rows = fidelity_text(run_dir)
    bw = memory_bandwidth_gbs()
    results = []
    for label, path in targets:
        for rec in profile_model(path, bits_list, prompt_tokens, gen_tokens, repeats,
                                 group_size, rows=rows, log=log):
            rec["role"] = label
            results.append(rec)
    devices = load_devices()
    hw = {**hardware(), "measured_bandwidth_gbs": round(bw, 1)}
    # Decode speed scales with bandwidth only from a GPU measurement: on a CPU the float16
    # and quantized kernels have no fast path, so those timings say nothing about a phone.
    speed = hw["backend"] != "cpu"
    report = {
        "hardware": hw,
        "settings": {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
                     "repeats": repeats, "group_size": group_size,
                     "fidelity_rows": fidelity_rows},
        "results": results,
        "projection": {
            "method": "fits: peak memory measured in a fresh process holding only this "
                      "model at this precision (weights as stored, KV cache, activations) "
                      "<= the device's app memory budget; decode tok/s: measured median x "
                      "device bandwidth / this machine's measured read bandwidth (decode is "
                      "memory-bound), only from a Metal measurement (null on the CPU "
                      "backend). Estimates, not measurements.",
            "per_model": [{"role": r["role"], "bits": r["bits"],
                           "devices": project(r, devices, bw, speed)} for r in results]},
    }
    if out_dir:
        try:
            os.makedirs(out_dir, exist_ok=True)
            for name, text in (("profile.json", json.dumps(report, indent=2)),
                               ("profile.md", format_markdown(report))):
                with files.atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "w") as f:
                    f.write(text + "\n")
            plot(results, os.path.join(out_dir, "profile.png"), hw["backend"])
        except OSError as e:
            raise ConfigError(f"cannot write the profile to {out_dir}: {e.strerror or e}; "
                              "choose a writable -o folder") from None
        report["written"] = out_dir
    return report


def format_report(rep: dict) -> str:
    h = rep["hardware"]
    lines = [f"hardware: {h.get('device_name', h['machine'])}, backend {h['backend']}, "
             f"measured read bandwidth {h['measured_bandwidth_gbs']} GB/s",
             f"{'model':<9}{'bits':>5}{'disk MB':>8}{'peak MB':>9}{'TTFT ms':>9}"
             f"{'prefill/s':>11}{'decode/s':>10}{'KL':>9}{'top-1':>7}"]
    for r in rep["results"]:
        lines.append(f"{r['role']:<9}{r['bits']:>5}{r['disk_bytes'] / 1e6:>8.2f}"
                     f"{r['peak_memory_bytes'] / 1e6:>9.1f}{r['ttft_s']['median'] * 1e3:>9.1f}"
                     f"{r['prefill_tok_s']['median']:>11.0f}{r['decode_tok_s']['median']:>10.1f}"
                     f"{r['kl_to_reference']:>9.4f}{r['top1_agreement']:>7.3f}")
    lines.append("projection (estimates): " + rep["projection"]["method"])
    for pm in rep["projection"]["per_model"]:
        fits = [f"{d['device']}: {'fits' if d['fits'] else 'NO'}"
                + (f" ~{d['est_decode_tok_s']:.0f} tok/s" if d["est_decode_tok_s"] else "")
                for d in pm["devices"]]
        lines.append(f"  {pm['role']} {pm['bits']}-bit: " + "; ".join(fits))
    return "\n".join(lines)


def format_markdown(rep: dict) -> str:
    """The report as Markdown tables (what README and model cards quote)."""
    h, s = rep["hardware"], rep["settings"]
    lines = [f"{h.get('device_name', h['machine'])}, **{h['backend']} backend**, "
             f"{h.get('memory_gb', '?')} GB; prompt {s['prompt_tokens']} tokens, "
             f"{s['gen_tokens']} generated, median [min–max] of {s['repeats']} runs after a "
             f"warm-up; group size {s['group_size']}; KL and top-1 agreement against the "
             f"first precision on {s.get('fidelity_rows', 'fixed rows')}.", "",
             "| model | bits | on disk MB | peak MB | load ms | TTFT ms | prefill tok/s | "
             "decode tok/s | KL to first | top-1 agree |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def num(x):
        return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"

    def rng(st, scale=1.0):
        return (f"{num(st['median'] * scale)} [{num(st['min'] * scale)}–"
                f"{num(st['max'] * scale)}]")

    seen = set()
    for r in rep["results"]:
        ref = r["role"] not in seen  # the first precision of each model is the reference
        seen.add(r["role"])
        kl = "ref." if ref else "<1e-6" if r["kl_to_reference"] == 0 else \
            f"{r['kl_to_reference']:.2g}"
        lines.append(f"| {r['role']} | {r['bits']} | {r['disk_bytes'] / 1e6:.2f} | "
                     f"{r['peak_memory_bytes'] / 1e6:.1f} | {r['load_s'] * 1e3:.0f} | "
                     f"{rng(r['ttft_s'], 1e3)} | {rng(r['prefill_tok_s'])} | "
                     f"{rng(r['decode_tok_s'])} | {kl} | {r['top1_agreement']:.3f} |")
    per = rep["projection"]["per_model"]
    lines += ["", "Device budget projection (estimates): " + rep["projection"]["method"], "",
              "| device | app budget GB | " + " | ".join(f"{p['role']} {p['bits']}-bit"
                                                      for p in per) + " |",
              "|---|---|" + "---|" * len(per)]
    for i, d in enumerate(per[0]["devices"] if per else []):
        cells = []
        for p in per:
            e = p["devices"][i]
            cell = f"{'fits' if e['fits'] else '**no**'} ({e['headroom_gb']:+.2f} GB)"
            if e["est_decode_tok_s"] is not None:
                cell += f" ~{e['est_decode_tok_s']:.0f} tok/s"
            cells.append(cell)
        lines.append(f"| {d['device']} | {d['app_memory_gb']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # the fresh process `measure` starts
    folder, p_tok, g_tok, reps = sys.argv[1], *map(int, sys.argv[2:5])
    print(json.dumps(measure_folder(folder, p_tok, g_tok, reps)))
