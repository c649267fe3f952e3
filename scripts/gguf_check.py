"""Load `export --gguf` files in llama.cpp (llama-cpp-python) and compare them with mlx_lm.

    python scripts/gguf_check.py                   # a 40-step LoRA run of the embedded student
    python scripts/gguf_check.py --run runs/lora   # export this run (configs/lora.yaml)
    python scripts/gguf_check.py --folder OUT      # an export folder holding ggml-model-f16.gguf

Needs `pip install llama-cpp-python` (builds llama.cpp from source: several minutes). Without
--run or --folder it uses runs/lora when it exists, else trains build/gguf_check/run (from
teacher2, online: no cache pass; reused by the next call).
For the student: on every record of data/test.jsonl, whether llama.cpp splits the text into
the token ids training used (data.py's encoding; llama.cpp asked to add the model's special
tokens, so a BOS it should not add shows up); on --rows packed held-out rows, max |Δlogit|
and top-1 agreement of llama.cpp against the same float16 weights computed in float32 by
mlx_lm; and --continuations greedy continuations of held-out prompts from both. Then the same
logits check on random models of each family `export --gguf` writes (grouped-query
attention, an explicit head_dim, Llama 3 RoPE scaling, a Mixtral), with the embedded
tokenizer. Writes --out (default results/gguf_check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxdistill import data as data_mod  # noqa: E402
from mlxdistill import files, gguf, models, saving  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = os.path.join("weights", "student")  # paths from the repository root
TEST = os.path.join("data", "test.jsonl")
WORK = os.path.join("build", "gguf_check")  # kept: a second call reuses the run
FAMILIES = {  # random models over the embedded tokenizer's 4,096 tokens
    "llama-gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "mistral-head-dim": dict(model_type="mistral", num_attention_heads=4,
                             num_key_value_heads=1, head_dim=48),
    "llama3-rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}),
    "mixtral": dict(model_type="mixtral", num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2),
    # over byte-level BPEs with Llama 3's and GPT-2's pre-tokenizers, trained here
    "llama3-tokenizer": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=1024),
    "gpt2-tokenizer": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=1024),
}


def quick_run(work: str) -> str:
    """A short LoRA distillation of the embedded student from teacher2 (online teacher, no
    cache pass), trained but not evaluated: minutes on 2 cores. A finished run is reused."""
    from mlxdistill import api
    from mlxdistill.config import load_config

    run = os.path.join(work, "run")
    cfg = load_config(os.path.join("configs", "lora.yaml"), [
        "teacher.model=weights/teacher2", "teacher.mode=online", f"student.model={STUDENT}",
        "train.iters=40", "train.eval_every=40", "train.save_every=40", f"run.dir={run}",
        f"cache.dir={os.path.join(work, 'cache')}"])
    api.fit(cfg, quiet=True, log=lambda m: None)
    return run


def load_llama(path: str, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True,
                 verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def compare_logits(llm, model, rows: np.ndarray) -> dict:
    worst, agree, n = 0.0, 0, 0
    for row in rows:
        a = np.array(model(mx.array(row[None]))[0].astype(mx.float32))
        b = llama_logits(llm, [int(t) for t in row])
        worst = max(worst, float(np.abs(a - b[:, : a.shape[-1]]).max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += len(row)
    return {"rows": int(len(rows)), "positions": n, "max_abs_logit_diff": round(worst, 5),
            "top1_agreement": round(agree / n, 5)}


def greedy_mlx(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[len(prompt):]


def greedy_llama(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def check_student(folder: str, rows: int, continuations: int, gen: int) -> dict:
    from mlx_lm.utils import load as mlx_load

    from mlxdistill.export import as_evaluated

    path = os.path.join(folder, gguf.NAME)
    model, tok = mlx_load(folder)
    model = as_evaluated(model)  # float32 arithmetic over the stored float16 weights
    model.set_dtype(mx.float32)
    llm = load_llama(path, 1024)
    texts = [r["text"] for r in data_mod.read_records(TEST)]
    packed = data_mod.pack(TEST, tok, 256, True, rows)
    logits = compare_logits(llm, model, packed.input_ids)
    conts = []
    for text in texts[:continuations]:
        prompt = data_mod._encode(tok, text)[:64]
        a, b = greedy_mlx(model, prompt, gen), greedy_llama(llm, prompt, gen)
        conts.append({"prompt": tok.decode(prompt)[-80:], "mlx_lm": tok.decode(a),
                      "llama_cpp": llm.detokenize(b).decode("utf-8", "replace"),
                      "same_tokens": a == b})
    meta = json.load(open(os.path.join(folder, "export.json")))
    return {"folder": folder, "gguf": meta.get("gguf"),
            "export_round_trip": meta.get("round_trip"),
            "tokenization": tokenization(llm, tok, texts),
            "logits_vs_mlx_float32": logits,
            "greedy": {"tokens": gen, "identical": sum(c["same_tokens"] for c in conts),
                       "continuations": conts}}


def byte_level_tokenizer(folder: str, size: int, llama3: bool) -> None:
    """A byte-level BPE with Llama 3's (else GPT-2's) pre-tokenizer, trained on
    data/train.jsonl."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(BPE(ignore_merges=llama3))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf.LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]) \
        if llama3 else pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    texts = [r["text"] for r in data_mod.read_records(os.path.join("data", "train.jsonl"))]
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(folder)


def tokenization(llm, tok, texts: list[str]) -> dict:
    same, first_diff = 0, None
    for i, text in enumerate(texts):
        trained = data_mod._encode(tok, text)
        # add_bos=True: llama.cpp adds whatever special tokens the file says to add
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        same += got == trained
        if got != trained and first_diff is None:
            k = next((j for j, (a, b) in enumerate(zip(got, trained)) if a != b),
                     min(len(got), len(trained)))
            first_diff = {"record": i, "position": k, "llama_cpp": got[k:k + 5],
                          "training": trained[k:k + 5]}
    return {"records": len(texts), "identical": same,
            "fraction_identical": round(same / len(texts), 4), "first_difference": first_diff,
            "llama_cpp_adds_bos": llm.tokenize(b"x", add_bos=True)[0] == tok.bos_token_id}


def check_family(name: str, extra: dict, work: str) -> dict:
    """A random model of one family (tied to nothing: its own lm_head), written by
    gguf.write next to its tokenizer, against mlx_lm in float32."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    cfg = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, rms_norm_eps=1e-5,
               vocab_size=4096, rope_theta=10000.0, max_position_embeddings=256,
               tie_word_embeddings=False)
    cfg.update(extra)
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(1)
    model = model_cls(args_cls.from_dict(cfg))
    # peaked output distributions, like a trained model's, so top-1 is not a coin toss
    model.lm_head.weight = model.lm_head.weight * 8
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    folder = os.path.join(work, name)
    os.makedirs(folder, exist_ok=True)
    byte_level = name.endswith("-tokenizer")
    if byte_level:
        byte_level_tokenizer(folder, cfg["vocab_size"], llama3=name.startswith("llama3"))
    else:
        saving.copy_tokenizer(models.load_meta(STUDENT, "student")[1], STUDENT, folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    _, tok = models.load_meta(folder, "student")
    rep = gguf.write(model, cfg, tok, folder)
    model.set_dtype(mx.float32)
    llm = load_llama(os.path.join(folder, gguf.NAME), 256)
    packed = data_mod.pack(TEST, tok, 128, True, 2)
    out = {"config": extra, "tensors": rep["tensors"], "tokenizer_model": rep["tokenizer_model"],
           "tokenizer_pre": rep["tokenizer_pre"],
           "n_params": sum(v.size for _, v in tree_flatten(model.parameters()))}
    out.update(compare_logits(llm, model, packed.input_ids))
    if byte_level:
        out["tokenization"] = tokenization(
            llm, tok, [r["text"] for r in data_mod.read_records(TEST)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="run directory to export (default: runs/lora "
                    "if it exists, else a short LoRA run made here)")
    ap.add_argument("--folder", default=None, help="an export folder already holding the GGUF")
    ap.add_argument("--rows", type=int, default=4, help="packed 256-token rows for logits")
    ap.add_argument("--continuations", type=int, default=4)
    ap.add_argument("--gen", type=int, default=32, help="greedy tokens per continuation")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "gguf_check.json"))
    args = ap.parse_args()
    import llama_cpp

    t0 = time.time()
    for k in ("run", "folder", "out"):  # given from the caller's directory
        if getattr(args, k):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    os.chdir(ROOT)
    work = WORK
    os.makedirs(work, exist_ok=True)
    folder, run = args.folder, args.run
    if folder is None:
        from mlxdistill import api

        if run is None:
            run = os.path.join("runs", "lora")
            if not os.path.isdir(run):
                run = quick_run(work)
        folder = os.path.join(work, "export")
        api.export(run, folder, gguf=True, force=True, log=lambda m: None)
    res = {"llama_cpp_python": llama_cpp.__version__, "run": run,
           "student": check_student(folder, args.rows, args.continuations, args.gen),
           "families": {n: check_family(n, e, work) for n, e in FAMILIES.items()}}
    res["seconds"] = round(time.time() - t0, 1)
    files.atomic_json(args.out, res)
    s = res["student"]
    print(f"tokenization: {s['tokenization']['identical']}/{s['tokenization']['records']} "
          f"records identical; logits: max |Δ| {s['logits_vs_mlx_float32']['max_abs_logit_diff']}"
          f", top-1 {s['logits_vs_mlx_float32']['top1_agreement']}; greedy: "
          f"{s['greedy']['identical']}/{len(s['greedy']['continuations'])} identical")
    for n, f in res["families"].items():
        tk = f.get("tokenization")
        print(f"{n}: max |Δ| {f['max_abs_logit_diff']}, top-1 {f['top1_agreement']}"
              + (f"; tokenization {tk['identical']}/{tk['records']} identical" if tk else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
