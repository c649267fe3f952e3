"""A student cut from the teacher (`mlxdistill prune`): fewer blocks, a narrower residual
stream, fewer attention heads and MLP channels, each chosen by what the teacher does on
data.train, then written as an ordinary mlx_lm folder to distil into.

Width follows Minitron (Muralidharan et al., 2024): MLP channels ranked by the mean |value|
of the MLP's hidden activation (gate * up, the input of down_proj), attention heads by the
L2 norm of each head's output before o_proj, embedding channels by the mean |output| of
every RMSNorm that reads the residual stream (the stream as each block reads it). Depth
follows ShortGPT (Men et al., 2024): a block's influence is 1 - cosine(its input, its output), averaged over tokens,
and the least influential blocks go. `random` keeps as many of each, drawn at random: the
control that shows what the measurement is worth.

Grouped-query attention stays valid by keeping heads per kv group: the kv groups whose query
heads matter most are kept, each with the same number of its best query heads. Heads are
kept whole, so head_dim stays the teacher's (written into config.json when hidden_size /
num_attention_heads no longer gives it). What differs by family (fused projections, extra
norms, Gemma's embedding scale and sliding-window pattern) is prune_families.py's."""

from __future__ import annotations

import json
import os
import random

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import data as data_mod
from . import files, models, saving
from . import prune_families as fams
from .errors import Error
from .progress import Progress

SUPPORTED = fams.SUPPORTED
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads")


class PruneError(Error):
    """A user error about what to prune or from what; the message is one line."""


# ------------------------------------------------------------------ shapes and checks


def teacher_shape(tcfg: dict) -> dict:
    """The five prunable sizes of a config.json, and its head_dim, as mlx_lm reads them."""
    a = fams.text_args(tcfg)
    heads = int(a.num_attention_heads)
    return {"num_hidden_layers": int(a.num_hidden_layers), "hidden_size": int(a.hidden_size),
            "intermediate_size": int(a.intermediate_size), "num_attention_heads": heads,
            "num_key_value_heads": int(getattr(a, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(a, "head_dim", None) or a.hidden_size // heads)}


def check_teacher(tcfg: dict, what: str) -> None:
    """Refuse a teacher whose weights this module does not know how to cut."""
    mt = tcfg.get("model_type")
    if mt not in SUPPORTED:
        raise PruneError(f"{what} has model_type {mt!r}; prune supports "
                         f"{', '.join(SUPPORTED)} so far; use a teacher of those families")
    if any(c.get("quantization") or c.get("quantization_config")
           for c in (tcfg, fams.text_config(tcfg))):
        raise PruneError(f"{what} is quantized; prune needs the teacher's float weights "
                         "(prune the unquantized model, quantize the student after training)")


def count_params(tcfg: dict, shape: dict, tied: bool = None) -> int:
    """Exact parameters of a student of `shape` (plan.model_shape: the mlx_lm class built
    lazily from its config, nothing allocated). `tied`: prune_families.tied_by_weights, for
    a family whose mlx_lm class builds an lm_head until it sees the weights (Gemma-3)."""
    from .plan import model_shape  # plan imports the trainer's modules; only this needs it

    cfg = student_config(tcfg, shape, list(range(shape["num_hidden_layers"])))
    params = model_shape(cfg, "the pruned student").params
    if tied:
        params -= int(fams.text_args(tcfg).vocab_size) * shape["hidden_size"]
    return params


def fit_shape(tcfg: dict, budget: float, tied: bool = None) -> dict:
    """The largest shape within `budget` parameters (prune.target_params). Width is cut as
    whole heads, with the embedding and MLP channels in the same proportion, and depth as
    whole blocks; of the shapes within 15 % of the largest that fits, the one whose depth and
    width keep the most similar fractions of the teacher's (neither cut far more than the
    other: Minitron found both kinds of cut worth making). The window is wide because a
    small model's embedding is much of it: at ~10x fewer parameters the largest fit is often
    a single block."""
    t = teacher_shape(tcfg)
    derived = fams.derives_head_dim(fams.text_args(tcfg))
    group = t["num_attention_heads"] // t["num_key_value_heads"]
    fits = []
    for h in range(t["num_attention_heads"], 0, -1):
        kv = -(-h // group)  # the fewest kv heads that serve h query heads
        if h % kv:  # grouped-query attention needs as many query heads per kv head
            continue
        w = h / t["num_attention_heads"]
        d = h * t["head_dim"] if derived else round(t["hidden_size"] * w)
        shape = {"hidden_size": min(d, t["hidden_size"]), "num_attention_heads": h,
                 "num_key_value_heads": kv, "head_dim": t["head_dim"],
                 "intermediate_size": max(1, round(t["intermediate_size"] * w))}
        for n in range(t["num_hidden_layers"], 0, -1):
            shape = {**shape, "num_hidden_layers": n}
            params = count_params(tcfg, shape, tied)
            if params <= budget:  # fewer blocks only shrink it further
                # rounded: 2/6 against 4/6 and 5/6 against 3/6 are the same imbalance, and
                # the tie must go to the larger shape, not to float rounding
                fits.append((params, round(abs(n / t["num_hidden_layers"] - w), 9), shape))
                break
    if not fits:
        raise PruneError(f"prune.target_params={budget:g} is below the smallest shape this "
                         "teacher can be cut to (one block, one head); raise it")
    most = max(f[0] for f in fits)
    return min((f for f in fits if f[0] >= 0.85 * most), key=lambda f: (f[1], -f[0]))[2]


def target_shape(tcfg: dict, p, tied: bool = None) -> dict:
    """The student's sizes from `p` (a PruneConfig; null keeps the teacher's), checked
    against the teacher's. num_key_value_heads null keeps the teacher's query heads per kv
    head. Heads need not divide hidden_size: head_dim stays the teacher's, written
    explicitly, except for qwen2 and phi3, whose code derives head_dim from hidden_size."""
    t = teacher_shape(tcfg)
    if p.target_params is not None:
        given = [k for k in SHAPE_KEYS if getattr(p, k) is not None]
        if given:
            raise PruneError(f"prune.target_params and prune.{given[0]} are both set; give "
                             "a parameter budget or the sizes, not both")
        return fit_shape(tcfg, p.target_params, tied)
    s = {k: getattr(p, k) if getattr(p, k) is not None else t[k] for k in SHAPE_KEYS}
    group = t["num_attention_heads"] // t["num_key_value_heads"]
    if p.num_key_value_heads is None and p.num_attention_heads is not None:
        if s["num_attention_heads"] % group:
            raise PruneError(f"prune.num_attention_heads={s['num_attention_heads']} is not a "
                             f"multiple of the teacher's {group} query heads per kv head; set "
                             "prune.num_key_value_heads too")
        s["num_key_value_heads"] = s["num_attention_heads"] // group
    for k in SHAPE_KEYS:
        if s[k] > t[k]:
            raise PruneError(f"prune.{k}={s[k]} is larger than the teacher's {t[k]}; prune "
                             "only removes (use at most the teacher's size, or null)")
    h, kv = s["num_attention_heads"], s["num_key_value_heads"]
    if h % kv:
        raise PruneError(f"prune.num_key_value_heads={kv} does not divide "
                         f"prune.num_attention_heads={h}; grouped-query attention needs "
                         "a whole number of query heads per kv head")
    if h // kv > group:
        raise PruneError(f"prune.num_attention_heads={h} with prune.num_key_value_heads={kv} "
                         f"needs {h // kv} query heads per kv head, the teacher has {group}; "
                         f"keep at least {-(-h // group)} kv heads")
    s["head_dim"] = t["head_dim"]
    if fams.derives_head_dim(fams.text_args(tcfg)) and h * t["head_dim"] != s["hidden_size"]:
        raise PruneError(f"prune.num_attention_heads={h}: {tcfg['model_type']} takes head_dim "
                         f"from hidden_size / num_attention_heads, so {h} heads of "
                         f"{t['head_dim']} need prune.hidden_size={h * t['head_dim']}")
    return s


def student_config(tcfg: dict, shape: dict, kept_blocks: list) -> dict:
    """The teacher's config.json with only the pruned sizes changed (in text_config for a
    multimodal wrapper), and Gemma-3's sliding_window_pattern fitted to the kept blocks (see
    prune_families.window_pattern; plan() keeps blocks whose kinds it reproduces)."""
    out = dict(tcfg)
    src = fams.text_config(tcfg)
    sub = dict(src)
    for k in SHAPE_KEYS:
        sub[k] = shape[k]
    if "head_dim" in src or shape["hidden_size"] != shape["num_attention_heads"] * \
            shape["head_dim"]:
        sub["head_dim"] = shape["head_dim"]
    if isinstance(src.get("layer_types"), list):  # per-block settings follow their blocks
        sub["layer_types"] = [src["layer_types"][i] for i in kept_blocks]
    pattern = fams.window_pattern(tcfg, len(kept_blocks))
    if pattern is not None and ("sliding_window_pattern" in src or
                                pattern != fams.text_args(tcfg).sliding_window_pattern):
        sub["sliding_window_pattern"] = pattern
    if fams.family(tcfg).nested:
        out[fams.family(tcfg).nested] = sub
    else:
        out = sub
    return out


# ------------------------------------------------------------------ measuring


def _record(module, fn) -> None:
    """Call fn(input, output) on each forward of `module`. MLX has no forward hooks; the
    instance's class is swapped for a subclass (surgery.capture_layers does the same), which
    leaves parameter names as they are."""
    cls = module.__class__

    def call(self, x, *args, _cls=cls, **kwargs):
        out = _cls.__call__(self, x, *args, **kwargs)
        fn(x, out)
        return out

    module.__class__ = type(f"Measured{cls.__name__}", (cls,), {"__call__": call})


def measure(model, batches, head_dim: int, tcfg: dict) -> dict:
    """Importance of every prunable unit over `batches` ([B, L] token arrays), forward only:
    per block its query heads ("heads", [H]), MLP channels ("mlp", [I]) and Block Influence
    ("influence"); over the norms that read the residual stream the embedding channels
    ("hidden", [D]). Sums over tokens, divided by the token count at the end."""
    text = fams.text_model(model)
    layers = text.layers
    n = len(layers)
    st = {"heads": [0.0] * n, "mlp": [0.0] * n, "influence": [0.0] * n, "hidden": 0.0}

    def add(key, i, v):
        if i is None:
            st[key] = st[key] + v
        else:
            st[key][i] = st[key][i] + v

    def per_token(x):
        return x.reshape(-1, x.shape[-1]).astype(mx.float32)

    def hidden(x, out):  # a norm's output: the residual stream as the next layer reads it
        add("hidden", None, mx.abs(per_token(out)).sum(0))

    for i, layer in enumerate(layers):
        def heads(x, out, i=i):
            a = per_token(x)
            a = a.reshape(a.shape[0], -1, head_dim)
            add("heads", i, mx.sqrt((a * a).sum(-1)).sum(0))

        def block(x, out, i=i):
            out = out[0] if isinstance(out, tuple) else out
            a, b = per_token(x), per_token(out)
            cos = (a * b).sum(-1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1)
                                     + 1e-12)
            add("influence", i, (1.0 - cos).sum())

        def mlp(x, out, i=i):  # down_proj's input: gate * up, the MLP's hidden channels
            add("mlp", i, mx.abs(per_token(x)).sum(0))

        _record(layer.self_attn.o_proj, heads)
        _record(layer.mlp.down_proj, mlp)
        for norm in fams.family(tcfg).reading_norms:
            _record(getattr(layer, norm), hidden)
        _record(layer, block)
    _record(text.norm, hidden)
    tokens = 0
    for x in batches:
        model(x)
        tokens += x.size
        mx.eval(st["heads"], st["mlp"], st["influence"], st["hidden"])
    as_np = lambda v: np.array(v, dtype=np.float64) / max(tokens, 1)  # noqa: E731
    return {"heads": [as_np(v) for v in st["heads"]], "mlp": [as_np(v) for v in st["mlp"]],
            "influence": [float(as_np(v)) for v in st["influence"]],
            "hidden": as_np(st["hidden"]), "tokens": tokens}


# ------------------------------------------------------------------ choosing


def _top(scores, k: int) -> list:
    """Indices of the k highest scores, in their original order (ties: the earlier)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def choose_heads(scores, n_kv: int, kv: int, h: int) -> tuple:
    """(kept query heads, kept kv heads) of one block: the `kv` kv groups whose query heads
    sum highest, each keeping its h // kv best query heads, so head j of the student uses
    kv head j // (h // kv) as grouped-query attention expects."""
    group = len(scores) // n_kv
    groups = _top([sum(scores[g * group:(g + 1) * group]) for g in range(n_kv)], kv)
    q = []
    for g in groups:
        q += [g * group + j for j in _top(scores[g * group:(g + 1) * group], h // kv)]
    return q, groups


def plan(t: dict, s: dict, method: str, seed: int, imp=None, kinds=None) -> dict:
    """Which teacher units the student keeps: blocks (teacher indices, in order), and per
    kept block its query heads, kv heads and MLP channels; the embedding channels.
    `imp` (measure()'s result) under `activation`; drawn from `seed` under `random`.
    `kinds`: (the teacher's, the student's) kind of attention per block where it differs
    by block (Gemma-3); the blocks kept are then those that reproduce the student's."""
    n, group = t["num_hidden_layers"], t["num_attention_heads"] // t["num_key_value_heads"]

    def blocks_by(scores):
        kept = fams.keep_kinds(scores, *kinds) if kinds else _top(scores, s["num_hidden_layers"])
        if kept is None:
            raise PruneError(f"prune.num_hidden_layers={s['num_hidden_layers']}: the teacher "
                             "has no blocks in the student's order of sliding and global "
                             "attention; check its sliding_window_pattern")
        return kept

    if method == "random":
        rng = random.Random(seed)
        draw = lambda size, k: sorted(rng.sample(range(size), k))  # noqa: E731
        blocks = (blocks_by([rng.random() for _ in range(n)]) if kinds
                  else draw(n, s["num_hidden_layers"]))
        hidden = draw(t["hidden_size"], s["hidden_size"])
        per = {}
        for b in blocks:
            kvs = draw(t["num_key_value_heads"], s["num_key_value_heads"])
            q = [g * group + j for g in kvs
                 for j in draw(group, s["num_attention_heads"] // s["num_key_value_heads"])]
            per[b] = (q, kvs, draw(t["intermediate_size"], s["intermediate_size"]))
    else:
        blocks = blocks_by(imp["influence"])
        hidden = _top(imp["hidden"], s["hidden_size"])
        per = {b: (*choose_heads(imp["heads"][b], t["num_key_value_heads"],
                                 s["num_key_value_heads"], s["num_attention_heads"]),
                   _top(imp["mlp"][b], s["intermediate_size"])) for b in blocks}
    return {"blocks": blocks, "hidden": hidden,
            "heads": [per[b][0] for b in blocks], "kv_heads": [per[b][1] for b in blocks],
            "mlp": [per[b][2] for b in blocks]}


# ------------------------------------------------------------------ cutting

def _rows(heads: list, head_dim: int) -> list:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def cut(weights: dict, p: dict, t: dict, tcfg: dict) -> dict:
    """The teacher's weights (flat mlx names) cut to plan `p` (prune_families says which
    index set cuts each axis); blocks renumbered in order. A weight the family's table does
    not know is refused rather than copied at the wrong shape. Where the forward scales the
    embedding by sqrt(hidden_size) (Gemma), the cut embedding is multiplied by the teacher's
    factor over the student's (√(D/D')), so the student's scaled embedding is the teacher's on
    the kept channels. A tied head sees it √(D/D') larger too, which offsets the final
    RMSNorm now averaging over D' channels instead of D: where the dropped channels are zero,
    the logits stay the teacher's."""
    new_index = {b: j for j, b in enumerate(p["blocks"])}
    hd, q_all, kv_all = t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    out = {}
    for name, w in weights.items():
        b, axes, inner = fams.split_name(tcfg, name)
        if axes is None:
            raise PruneError(f"the teacher ({tcfg['model_type']}) has weight {name}, which "
                             f"prune does not know how to cut; prune supports "
                             f"{', '.join(SUPPORTED)} so far")
        sets = {"d": p["hidden"]}
        if b is not None:
            if b not in new_index:
                continue
            j = new_index[b]
            q, kv, m = _rows(p["heads"][j], hd), _rows(p["kv_heads"][j], hd), p["mlp"][j]
            k0, v0 = q_all * hd, (q_all + kv_all) * hd  # where phi3's fused k and v rows start
            sets.update(m=m, q=q, kv=kv, qkv=q + [k0 + r for r in kv] + [v0 + r for r in kv],
                        gu=m + [t["intermediate_size"] + c for c in m])
            name = fams.block_name(tcfg, j, inner)
        for axis, key in enumerate(axes):
            if key is not None:
                w = mx.take(w, mx.array(sets[key], dtype=mx.int32), axis=axis)
        if inner == "model.embed_tokens.weight":
            factor = fams.embed_factor(tcfg, t["hidden_size"], len(p["hidden"]))
            w = w * factor if factor != 1.0 else w
        out[name] = w
    return out


# ------------------------------------------------------------------ the command


def _read_config(path: str, what: str) -> tuple:
    """(folder on disk, config.json as written) of a model folder or a cached hub id."""
    folder = saving.local_folder(path)
    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
        raise PruneError(f"{what} model {path} is not a local model folder (config.json + "
                         "*.safetensors) or a downloaded hub id; set teacher.model to one")
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return folder, json.load(f)
    except json.JSONDecodeError as e:
        raise PruneError(f"{folder}/config.json is not valid JSON ({e.msg})") from None


def _file_dtype(folder: str):
    """The float dtype the teacher's weights are stored in (loading casts them to float32
    on the CPU); the student is written in it too."""
    for f in models.weight_files(folder):
        if f.endswith(".safetensors"):
            for v in mx.load(f).values():
                if mx.issubdtype(v.dtype, mx.floating):
                    return v.dtype
    return mx.float32


def _check_out(out: str, teacher_folder: str, force: bool) -> None:
    if os.path.realpath(out) == os.path.realpath(teacher_folder):
        raise PruneError(f"-o {out} is the teacher's folder; write the student elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise PruneError(f"-o {out} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise PruneError(f"-o {out} exists and is not empty; pass --force to replace it or "
                         "choose another folder")


def _params(weights: dict) -> int:
    return int(sum(v.size for v in weights.values()))


def prune(cfg, out: str, force: bool = False, quiet: bool = False, log=print) -> dict:
    """Cut a student from cfg.teacher.model by cfg.prune, write it to `out` (an mlx_lm
    folder: config.json, weights, the teacher's tokenizer files, prune.json); returns
    prune.json's content. Shapes are checked before anything is loaded."""
    from mlx_lm.utils import save_config, save_model

    p, seed = cfg.prune, cfg.run.seed
    folder, tcfg = _read_config(cfg.teacher.model, "teacher")
    check_teacher(tcfg, f"teacher {cfg.teacher.model}")
    t = teacher_shape(tcfg)
    tied = fams.tied_by_weights(tcfg, folder)
    s = target_shape(tcfg, p, tied)
    if p.target_params is not None:
        log(f"prune.target_params={p.target_params:g}: {_shape_text(s)}, "
            f"{count_params(tcfg, s, tied):,} params (the largest shape within it, depth and "
            "width cut alike)")
    _check_out(out, folder, force)
    files.check_dir(out, "-o")
    models.check_seq_len(cfg.data.seq_len, tcfg, "teacher")
    model, tok, _ = models.load_role(cfg, "teacher")
    imp, ids = None, []
    if p.method == "activation":
        d = cfg.data
        packed = data_mod.pack(d.train, tok, d.seq_len, d.mask_prompt, p.rows, d.long_lines,
                               d.packing, early_stop=True)
        ids = packed.input_ids[:p.rows]
        log(f"measuring the teacher's activations on {len(ids)} rows of {d.seq_len} tokens "
            f"of {d.train}")
        bs, bar = cfg.cache.batch_size, Progress(len(ids), "measuring", "tok", quiet)

        def batches():
            for i in range(0, len(ids), bs):
                yield mx.array(ids[i:i + bs])
                bar.update(len(ids[i:i + bs]), ids[i:i + bs].size)  # after its forward

        imp = measure(model, batches(), t["head_dim"], tcfg)
        bar.close()
    weights = dict(tree_flatten(model.parameters()))
    kinds = fams.attention_kinds(tcfg, t["num_hidden_layers"], s["num_hidden_layers"])
    chosen = plan(t, s, p.method, seed, imp, kinds)
    cut_weights = cut(weights, chosen, t, tcfg)
    scfg = student_config(tcfg, s, chosen["blocks"])
    model_cls, args_cls = models.model_classes(scfg, "the pruned student")
    student = model_cls(args_cls.from_dict(json.loads(json.dumps(scfg))))  # it edits scfg
    if hasattr(student, "sanitize"):  # as mlx_lm.load does: Gemma-3 drops a tied lm_head here
        cut_weights = student.sanitize(cut_weights)
    # strict: every weight of the student's architecture, each at its shape
    student.load_weights(list(cut_weights.items()), strict=True)
    student.set_dtype(_file_dtype(folder))
    mx.eval(student.parameters())
    report = {
        "method": p.method, "teacher": cfg.teacher.model, "seed": seed,
        "target_params": p.target_params,
        "rows": len(ids), "tokens": imp["tokens"] if imp else 0,
        "shape_before": t, "shape_after": s,
        "params_before": _params(weights), "params_after": _params(cut_weights),
        "kept_blocks": chosen["blocks"],
        "block_influence": [round(v, 6) for v in imp["influence"]] if imp else None,
        "kept_hidden": chosen["hidden"], "kept_heads": chosen["heads"],
        "kept_kv_heads": chosen["kv_heads"], "kept_mlp": chosen["mlp"],
    }
    with files.atomic_dir(out) as tmp:
        save_model(tmp, student)
        save_config(dict(scfg), os.path.join(tmp, "config.json"))
        saving.copy_tokenizer(tok, cfg.teacher.model, tmp)
        # one key a line, index lists kept on theirs: readable, and small for a large model
        with open(os.path.join(tmp, "prune.json"), "w", encoding="utf-8") as f:
            f.write("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                                       for k, v in report.items()) + "\n}\n")
    return report


def _shape_text(s: dict) -> str:
    return (f"{s['num_hidden_layers']} × {s['hidden_size']}, {s['num_attention_heads']} heads "
            f"({s['num_key_value_heads']} kv) of {s['head_dim']}, MLP {s['intermediate_size']}")


def format_report(r: dict, out: str) -> str:
    """What `mlxdistill prune` prints."""
    lines = [f"teacher {r['teacher']}: {_shape_text(r['shape_before'])}; "
             f"{r['params_before'] / 1e6:.2f} M params",
             f"student {out}: {_shape_text(r['shape_after'])}; "
             f"{r['params_after'] / 1e6:.2f} M params ({r['method']})",
             f"kept blocks {r['kept_blocks']} of {r['shape_before']['num_hidden_layers']}"]
    if r["block_influence"] is not None:
        lines[-1] += " (Block Influence " + ", ".join(f"{v:.3f}" for v in r["block_influence"]) \
            + ")"
    lines.append(f"written: {out} (prune.json: what was kept); distil into it with "
                 f"student.model={out}")
    return "\n".join(lines)
