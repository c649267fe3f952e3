"""Cross-tokenizer distillation on the embedded pair: weights/teacher (SentencePiece BPE) into
weights/student-xtok (byte-level BPE), every row with the default run's data, steps,
schedule and seed, evaluated on held-out Hamlet (data.test) in bits per byte.

    python scripts/xtok.py                 # every row (a rerun skips finished runs)
    python scripts/xtok.py --only mapped,uld
    python scripts/xtok.py --steps-only    # only the in-process step-time comparison

Rows: the byte-level student before training; plain CE on the training text; sequence-level
KD (CE on text the teacher wrote from the training records' openings, `generate`); each
cross-tokenizer loss from the teacher's cache, and with 50 % CE where that is how their
references pair them (or the default picks it); a control (the same-tokenizer student through the
cross-tokenizer path, its tokenizer's fingerprint changed and nothing else); and, for
reference, the same-tokenizer student (weights/student) trained with plain CE and distilled
the usual way (the default run). `--markdown` rewrites results/xtok.md from the JSON.
Runs go to runs/xtok/NAME (the same-tokenizer ones share runs/default and
runs/default-ce with scripts/ablate.py); results/xtok.json is rewritten after every row,
results/xtok.md at the end.

Step time is measured twice: each run's own throughput (noisy on a shared machine: rows run
minutes apart), and an in-process comparison that alternates compiled steps of the
same-tokenizer default and of each cross-tokenizer loss on the same cache batches (the
ratio the goal is stated in).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

from mlxdistill import api, cache, files, models, xtok  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402
from mlxdistill.objective import Objective  # noqa: E402
from mlxdistill.step import loop_memory, make_step, to_arrays  # noqa: E402

OUT = "runs/xtok"
RESULTS = "results"
XTOK = "weights/student-xtok"
GENERATED = os.path.join(OUT, "generated.jsonl")
PROMPTS = os.path.join(OUT, "prompts.jsonl")
ROWS = {
    "ce": ("plain CE on the training text", {"loss.alpha": 1.0}),
    "seqkd": ("sequence-level KD: CE on teacher-written text",
              {"loss.alpha": 1.0, "data.train": GENERATED, "cache.dir": "caches/xtok-seqkd"}),
    "uld": ("ULD (sorted probabilities)", {"loss.xtok": "uld"}),
    "mapped": ("exact-string KL + tail bucket", {"loss.xtok": "mapped"}),
    "hybrid": ("exact-string KL + ULD in the tail (GOLD)", {"loss.xtok": "hybrid"}),
    "chunk": ("chunk likelihood (ALM)", {"loss.xtok": "chunk", "cache.next_logprob": True,
                                          "cache.dir": "caches/default-logprob"}),
    "mapped_alpha05": ("exact-string KL + tail, 50 % CE (what `auto` trains)",
                       {"loss.xtok": "mapped", "loss.alpha": 0.5}),
    "uld_alpha05": ("ULD, 50 % CE (as the ULD paper pairs it)", {"loss.xtok": "uld",
                                                                "loss.alpha": 0.5}),
    "control": ("control: weights/student through the cross-tokenizer path (mapped)",
                {"student.model": os.path.join(OUT, "student-control"), "loss.xtok": "mapped"}),
    "same_ce": ("same tokenizer (weights/student): plain CE",
                {"student.model": "weights/student", "loss.alpha": 1.0,
                 "run.dir": "runs/default-ce"}),
    "same_kd": ("same tokenizer (weights/student): forward KL, the default run",
                {"student.model": "weights/student", "run.dir": "runs/default"}),
}
PROMPT_WORDS = 16  # each training record's opening words: the teacher writes the rest
PROMPTS_MAX = 1400  # records whose openings are used: enough text for data.max_rows rows


def config(name: str, extra: dict, overrides: list[str]):
    base = {"student.model": XTOK, "run.dir": os.path.join(OUT, name), **extra}
    return load_config("configs/default.yaml",
                       [f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                        for k, v in base.items()] + overrides)


def control_student() -> None:
    """weights/student with its tokenizer's unknown token renamed: the same ids, pieces and
    vocabulary size, another vocabulary fingerprint, so it trains through the
    cross-tokenizer path (an identity alignment). What that path costs, against the usual
    one on the same student."""
    dest = os.path.join(OUT, "student-control")
    if os.path.isdir(dest):
        return
    with files.atomic_dir(dest) as tmp:
        for name in os.listdir("weights/student"):
            src = os.path.join("weights/student", name)
            if name.endswith(".json") and name.startswith(("tokenizer", "special_tokens")):
                with open(src, encoding="utf-8") as f:
                    text = f.read().replace('"<unk>"', '"<unk_>"')
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
            else:
                shutil.copy(src, tmp)


def teacher_text(overrides: list[str]) -> None:
    """The sequence-level KD data: the teacher continues the opening of each training record
    the default run trains on, as long as a row (generate.max_tokens = data.seq_len)."""
    if os.path.isfile(GENERATED):
        return
    cfg = config("seqkd", {}, overrides)
    os.makedirs(OUT, exist_ok=True)
    with open(cfg.data.train, encoding="utf-8") as f:
        records = [json.loads(line)["text"] for line in f]
    with files.atomic_path(PROMPTS) as tmp, open(tmp, "w", encoding="utf-8") as o:
        for text in records[:PROMPTS_MAX]:
            words = text.split()
            if len(words) > PROMPT_WORDS:
                o.write(json.dumps({"prompt": " ".join(words[:PROMPT_WORDS])}) + "\n")
    gen = load_config("configs/default.yaml", overrides + [
        f"generate.prompts={PROMPTS}", f"generate.out={GENERATED}",
        f"generate.max_tokens={cfg.data.seq_len}", "generate.temperature=1.0",
        "generate.batch_size=32"])
    api.generate(gen)


def step_ms(run_dir: str, batch: int, width: int) -> float:
    """Median milliseconds per step from a run's metrics (tok_per_s counts the batch's
    B x width tokens)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rates = [r["tok_per_s"] for r in map(json.loads, f) if "tok_per_s" in r]
    return round(1000 * batch * width / statistics.median(rates), 1)


def aligned(cfg) -> tuple[int, float | None]:
    """(row width the student trains on, bytes per cached teacher token of the aligned
    shards kept beside the cache); (data.seq_len, None) for a same-tokenizer run."""
    _, stok = models.load_meta(cfg.student.model, "student")
    side = xtok.side_dir(cfg.cache.dir, models.vocab_fingerprint(stok))
    if not os.path.isdir(side):  # a student of the teacher's tokenizer
        return cfg.data.seq_len, None
    with open(os.path.join(side, "manifest.json")) as f:
        shards = json.load(f)["shards"].values()
    size = sum(os.path.getsize(os.path.join(side, s["file"])) for s in shards)
    return max(s["width"] for s in shards), round(size / sum(s["rows"] for s in shards)
                                                  / cfg.data.seq_len, 2)


def row(name: str, label: str, extra: dict, overrides: list[str]) -> dict:
    cfg = config(name, extra, overrides)
    t0 = time.time()
    res = api.train(cfg, quiet=True, log=lambda m: None)
    if "byte_agree" not in res["student_after"]:  # an eval.json from before the metric
        res = api.evaluate(cfg.run.dir, quiet=True, log=lambda m: None)
    target_bpt, _ = cache.ShardReader(cfg.cache.dir, rows=cfg.data.max_rows).bytes_per_token()
    width, aligned_bpt = aligned(cfg)
    return {"label": label, "overrides": extra, "iters": cfg.train.iters,
            "wall_s": round(time.time() - t0),
            "step_ms": step_ms(cfg.run.dir, cfg.train.batch_size, width),
            "cache_bytes_per_token": round(target_bpt, 2),
            "aligned_bytes_per_token": aligned_bpt, "teacher": res["teacher"],
            "before": res["student_before"], "after": res["student_after"]}


def step_times(overrides: list[str], steps: int, rounds: int) -> dict:
    """Milliseconds per compiled optimizer step, in one process, of the same-tokenizer
    default (weights/student on the default cache) and of each cross-tokenizer loss
    (weights/student-xtok on the same cache, aligned), built as the trainer builds them,
    on the cache's own batches. The variants take turns, `steps` steps a turn, `rounds`
    turns each (the first turn's first step, which compiles, is left out); the median
    step of each, and its ratio to the same-tokenizer step."""
    variants = {"same": config("same_kd", ROWS["same_kd"][1], overrides)}
    for kind in xtok.LOSSES:
        extra = dict(ROWS[kind][1])
        variants[kind] = config(kind, extra, overrides)
    built = {}
    for name, cfg in variants.items():
        try:
            reader = cache.ShardReader(cfg.cache.dir, rows=cfg.data.max_rows)
        except cache.CacheError:
            continue  # its cache is not built (run the row first)
        model, stok, scfg = models.load(cfg.student.model, "student")
        vocab, id_map, kind = reader.manifest["vocab_size"], None, ""
        if name != "same":
            _, ttok = models.load_meta(cfg.teacher.model, "teacher")
            al = xtok.ensure(reader, ttok, stok, cfg.student.model, True, lambda m: None)
            reader = xtok.AlignedReader(reader, al, name == "chunk")
            vocab, id_map, kind = models.logits_size(scfg), al.id_map, name
        opt = optim.AdamW(learning_rate=1e-4)
        opt.init(model.trainable_parameters())
        loss_fn = Objective.from_config(cfg, kind).bind(model, vocab, id_map=id_map)
        built[name] = (make_step(model, opt, loss_fn, cfg.train.grad_clip),
                       reader.batches(cfg.train.batch_size, cfg.run.seed), model, opt)
    times: dict = {name: [] for name in built}
    restore = loop_memory()
    try:
        for r in range(rounds):
            for name, (step, batches, model, opt) in built.items():
                for i in range(steps):
                    x, mask, labels, targets = to_arrays(next(batches))
                    mx.eval(x, mask, labels, targets)
                    t0 = time.perf_counter()
                    mx.eval(step(x, mask, labels, targets), model.parameters(), opt.state)
                    if r or i:
                        times[name].append(1000 * (time.perf_counter() - t0))
    finally:
        restore()
    same = statistics.median(times["same"])
    return {name: {"ms": round(statistics.median(t), 1),
                   "ratio": round(statistics.median(t) / same, 3)} for name, t in times.items()}


def markdown(out: dict) -> str:
    """The table of results/xtok.md (and the README's): every measured row, its bits per
    byte and next-byte agreement on data.test after training, step time, cache bytes."""
    rows = out["rows"]
    steps = out.get("step_times", {})
    head = ("| row | bits per byte | next-byte agreement | next-byte KL | ms/step (run) | "
            "step vs same-tokenizer (in process) | cache B/token |")
    lines = [head, "|" + "---|" * 7]
    any_x = next((r for n, r in rows.items() if not n.startswith("same")), None)
    if any_x:
        b = any_x["before"]
        lines.append(f"| student-xtok before training | {b['bpb']:.3f} | {b['byte_agree']:.3f} | "
                     f"{b['byte_kl']:.3f} | - | - | - |")
    for name, r in sorted(rows.items(), key=lambda kv: list(ROWS).index(kv[0])
                          if kv[0] in ROWS else len(ROWS)):
        a = r["after"]
        ratio = steps.get({"same_kd": "same"}.get(name, name), {}).get("ratio")
        cache_b = f"{r['cache_bytes_per_token']:g}" + (
            f" + {r['aligned_bytes_per_token']:g} aligned" if r["aligned_bytes_per_token"]
            else "")
        label = ROWS[name][0] if name in ROWS else r["label"]
        lines.append(f"| {label} | {a['bpb']:.3f} | {a['byte_agree']:.3f} | "
                     f"{a['byte_kl']:.3f} | {r['step_ms']:.0f} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {cache_b} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--fit-only", action="store_true",
                    help="train the rows' runs, evaluate nothing (a later run evaluates)")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the in-process step-time comparison")
    ap.add_argument("--steps", type=int, default=10, help="steps per turn (step times)")
    ap.add_argument("--rounds", type=int, default=3, help="turns per variant (step times)")
    ap.add_argument("--markdown", action="store_true",
                    help="only rewrite results/xtok.md from results/xtok.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = ([] if args.steps_only or args.markdown else
             args.only.split(",") if args.only else list(ROWS))
    path = os.path.join(RESULTS, "xtok.json")
    out = json.load(open(path)) if os.path.isfile(path) else {"rows": {}}
    out["overrides"] = args.overrides
    for name in names:
        label, extra = ROWS[name]
        if name == "seqkd":
            teacher_text(args.overrides)
        if name == "control":
            control_student()
        print(f"== {name}: {label}", flush=True)
        if args.fit_only:
            api.fit(config(name, extra, args.overrides), quiet=True, log=lambda m: None)
            continue
        out["rows"][name] = row(name, label, extra, args.overrides)
        files.atomic_json(path, out)
        r = out["rows"][name]
        print(f"   bpb {r['after'].get('bpb')}  byte agreement {r['after'].get('byte_agree')}"
              f"  {r['step_ms']} ms/step", flush=True)
    if args.fit_only:
        return
    if args.steps_only or not (args.only or args.markdown):
        out["step_times"] = step_times(args.overrides, args.steps, args.rounds)
        out["step_times_setup"] = {"steps": args.steps, "rounds": args.rounds}
        files.atomic_json(path, out)
        print("step times:", json.dumps(out["step_times"]), flush=True)
    with files.atomic_path(os.path.join(RESULTS, "xtok.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
