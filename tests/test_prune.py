"""`mlxdistill prune`: a student cut from the teacher loads in mlx_lm, keeps grouped-query
attention and tied embeddings valid, equals the teacher when nothing is cut, drops the block
that does nothing, and trains from the teacher's cache; for every family it supports (phi3's
fused projections, Gemma's extra norms, embedding scale and sliding-window pattern)."""

from __future__ import annotations

import json
import os

import mlxdistill  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import pytest
from conftest import make_tokenizer, tiny_overrides
from mlx.utils import tree_flatten
from test_cli import assert_one_line_error, invoke

from mlxdistill import api

QUIET = dict(log=lambda m: None)


def family_config(model_type: str, dim: int, layers: int, heads: int, kv: int,
                  tied: bool) -> dict:
    """A config.json of `model_type` with the keys its real checkpoints carry."""
    cfg = dict(model_type=model_type, hidden_size=dim, num_hidden_layers=layers,
               intermediate_size=2 * dim, num_attention_heads=heads, num_key_value_heads=kv,
               rms_norm_eps=1e-5, vocab_size=64, tie_word_embeddings=tied,
               max_position_embeddings=512, rope_theta=10000.0)
    gemma = dict(head_dim=dim // heads, query_pre_attn_scalar=dim // heads)
    cfg.update({
        "qwen3": dict(head_dim=dim // heads),  # its config names head_dim explicitly
        "gemma2": dict(gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        # blocks alternate sliding (window 4) and global attention, each with its RoPE base
        "gemma3_text": dict(gemma, sliding_window=4, sliding_window_pattern=2,
                            rope_local_base_freq=10000.0, rope_theta=1000000.0),
        "phi3": dict(rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3],
                                   "long_factor": [1.0, 2.0, 3.0, 4.0]},
                     original_max_position_embeddings=256),
    }.get(model_type, {}))
    return cfg


def make_teacher(path: str, model_type: str = "llama", dim: int = 32, layers: int = 3,
                 heads: int = 4, kv: int = 2, tied: bool = True, seed: int = 0,
                 identity_block: int | None = None, extra: dict | None = None) -> str:
    """A random model folder of `model_type` ("gemma3": Gemma-3's multimodal config, its
    text model under language_model); `identity_block`'s o_proj and down_proj zeroed, so
    that block passes its input through unchanged; `extra` updates the (text) config."""
    from mlx_lm.utils import _get_classes, save_config, save_model

    os.makedirs(path, exist_ok=True)
    if model_type == "gemma3":
        text = {**family_config("gemma3_text", dim, layers, heads, kv, tied), **(extra or {})}
        del text["vocab_size"]  # the wrapper's vocab_size is the one mlx_lm reads
        cfg = dict(model_type="gemma3", vocab_size=64, text_config=text)
    else:
        cfg = {**family_config(model_type, dim, layers, heads, kv, tied), **(extra or {})}
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(json.loads(json.dumps(cfg))))  # it edits text_config
    lm = getattr(model, "language_model", model)
    if model_type.startswith("gemma3") and tied:  # mlx_lm ties it when lm_head is absent
        lm.pop("lm_head")
        lm.tie_word_embeddings = True
    if identity_block is not None:
        block = model.layers[identity_block]
        block.self_attn.o_proj.weight = mx.zeros_like(block.self_attn.o_proj.weight)
        block.mlp.down_proj.weight = mx.zeros_like(block.mlp.down_proj.weight)
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(cfg, os.path.join(path, "config.json"))
    if model_type in ("qwen2", "qwen3"):
        from test_families import make_bpe_tokenizer

        make_bpe_tokenizer(path)
    else:
        make_tokenizer(path)
    return path


def prune(tiny, tmp_path, teacher, out="student", **sizes):
    ov = tiny_overrides(tiny, tmp_path, **{"teacher.model": teacher, "prune.rows": 8,
                                          **{f"prune.{k}": v for k, v in sizes.items()}})
    out = str(tmp_path / out)
    return api.prune(api.load_config(None, ov), out, **QUIET), out


def logits(path: str, ids=((1, 5, 9, 12, 7, 3, 20, 2),)):
    from mlx_lm import load

    model, _ = load(path)
    return model(mx.array(ids))


def weights_of(path: str) -> dict:
    """A folder's weights, the multimodal wrapper's language_model. prefix dropped."""
    w = mx.load(os.path.join(path, "model.safetensors"))
    return {k.removeprefix("language_model."): v for k, v in w.items()}


def text_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("text_config", cfg)


NEW = ["gemma2", "gemma3_text", "gemma3", "phi3"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", *NEW])
def test_full_shape_keeps_the_teacher_exactly(tiny, tmp_path, family):
    teacher = make_teacher(str(tmp_path / "t"), family)
    rep, out = prune(tiny, tmp_path, teacher)
    assert rep["kept_blocks"] == [0, 1, 2] and rep["params_after"] == rep["params_before"]
    assert mx.array_equal(logits(out), logits(teacher)).item()
    with open(os.path.join(teacher, "config.json")) as f, \
            open(os.path.join(out, "config.json")) as g:
        assert json.load(f) == json.load(g)


def test_gqa_pruned_shapes_load_and_run(tiny, tmp_path):
    teacher = make_teacher(str(tmp_path / "t"))  # 3 x 32, 4 heads of 8 in 2 kv groups
    rep, out = prune(tiny, tmp_path, teacher, num_hidden_layers=2, hidden_size=16,
                     intermediate_size=24, num_attention_heads=2, num_key_value_heads=1)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 16, 24, 2, 1)
    assert "head_dim" not in cfg  # 16 / 2 heads = the teacher's 8
    w = mx.load(os.path.join(out, "model.safetensors"))
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (8, 16)
    assert w["model.layers.1.mlp.down_proj.weight"].shape == (16, 24)
    assert "lm_head.weight" not in w and cfg["tie_word_embeddings"]  # tied stays tied
    for q, kv in zip(rep["kept_heads"], rep["kept_kv_heads"]):
        assert len(kv) == 1 and [h // 2 for h in q] == kv * 2  # both from the kept group
    assert rep["params_after"] == sum(v.size for v in w.values())
    # each kept weight is the teacher's at the kept indices: o_proj's rows are embedding
    # channels, its columns the kept heads' 8 dimensions each
    t = mx.load(os.path.join(teacher, "model.safetensors"))
    b, d = rep["kept_blocks"][1], mx.array(rep["kept_hidden"])
    cols = mx.array([h * 8 + k for h in rep["kept_heads"][1] for k in range(8)])
    want = t[f"model.layers.{b}.self_attn.o_proj.weight"][d][:, cols]
    assert mx.array_equal(w["model.layers.1.self_attn.o_proj.weight"], want).item()
    want = t[f"model.layers.{b}.mlp.gate_proj.weight"][mx.array(rep["kept_mlp"][1])][:, d]
    assert mx.array_equal(w["model.layers.1.mlp.gate_proj.weight"], want).item()
    assert logits(out).shape == (1, 8, 64)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "prune.json")) as f:
        assert json.load(f)["kept_blocks"] == rep["kept_blocks"]


def test_head_dim_kept_explicit_and_untied_head_cut(tiny, tmp_path):
    teacher = make_teacher(str(tmp_path / "t"), tied=False)
    _, out = prune(tiny, tmp_path, teacher, hidden_size=24, num_attention_heads=2)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["head_dim"] == 8 and cfg["num_key_value_heads"] == 1  # 2 heads per kv kept
    assert not cfg["tie_word_embeddings"]
    w = mx.load(os.path.join(out, "model.safetensors"))
    assert w["lm_head.weight"].shape == (64, 24)
    assert w["model.layers.0.self_attn.o_proj.weight"].shape == (24, 16)
    assert logits(out).shape == (1, 8, 64)


def test_qwen2_biases(tiny, tmp_path):
    teacher = make_teacher(str(tmp_path / "t"), "qwen2")
    rep, out = prune(tiny, tmp_path, teacher)
    assert mx.array_equal(logits(out), logits(teacher)).item()
    _, out = prune(tiny, tmp_path, teacher, "small", hidden_size=16, num_attention_heads=2,
                   num_key_value_heads=1)
    w = mx.load(os.path.join(out, "model.safetensors"))
    assert w["model.layers.0.self_attn.q_proj.bias"].shape == (16,)
    assert w["model.layers.0.self_attn.k_proj.bias"].shape == (8,)
    assert logits(out).shape == (1, 8, 64)


def test_qwen3_per_head_norms_stay_whole(tiny, tmp_path):
    teacher = make_teacher(str(tmp_path / "t"), "qwen3")
    _, out = prune(tiny, tmp_path, teacher, hidden_size=16, num_attention_heads=2,
                   num_key_value_heads=1, intermediate_size=24)
    w = mx.load(os.path.join(out, "model.safetensors"))
    assert w["model.layers.0.self_attn.q_norm.weight"].shape == (8,)
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    assert logits(out).shape == (1, 8, 64)


@pytest.mark.parametrize("method", ["activation", "random"])
@pytest.mark.parametrize("family", NEW)
def test_new_families_cut_every_weight_consistently(tiny, tmp_path, family, method):
    # 4 x 32, 4 heads of 8 in 2 kv groups, MLP 64 -> 3 x 16, 2 heads (1 kv), MLP 24
    teacher = make_teacher(str(tmp_path / "t"), family, layers=4)
    rep, out = prune(tiny, tmp_path, teacher, num_hidden_layers=3, hidden_size=16,
                     intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                     method=method)
    cfg, tcfg = text_config(out), text_config(teacher)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (3, 16, 24, 2, 1)
    # everything else as the teacher's: head_dim, query_pre_attn_scalar, soft-capping,
    # sliding window and its pattern (3 blocks hold the teacher's pattern of 2), RoPE scaling
    assert {k for k in {**cfg, **tcfg} if cfg.get(k) != tcfg.get(k)} == {
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads"}
    w, t = weights_of(out), weights_of(teacher)
    assert "lm_head.weight" not in w and "model.embed_tokens.weight" in w  # tied stays tied
    assert rep["params_after"] == sum(v.size for v in w.values())
    d = mx.array(rep["kept_hidden"])
    for j, b in enumerate(rep["kept_blocks"]):
        q = [h * 8 + k for h in rep["kept_heads"][j] for k in range(8)]
        kv = [h * 8 + k for h in rep["kept_kv_heads"][j] for k in range(8)]
        m = rep["kept_mlp"][j]
        new, old = f"model.layers.{j}.", f"model.layers.{b}."
        if family == "phi3":  # fused rows: [4 q heads | 2 k heads | 2 v heads], [gate | up]
            rows = q + [32 + r for r in kv] + [48 + r for r in kv]
            pairs = [("self_attn.qkv_proj.weight", rows), ("mlp.gate_up_proj.weight",
                                                           m + [64 + c for c in m])]
        else:
            pairs = [("self_attn.q_proj.weight", q), ("self_attn.v_proj.weight", kv),
                     ("mlp.up_proj.weight", m)]
        for name, rows in pairs:
            want = t[old + name][mx.array(rows)][:, d]
            assert mx.array_equal(w[new + name], want).item(), name
        want = t[old + "self_attn.o_proj.weight"][d][:, mx.array(q)]
        assert mx.array_equal(w[new + "self_attn.o_proj.weight"], want).item()
        if family.startswith("gemma"):  # four norms on the residual width, all cut alike
            for norm in ("input_layernorm", "post_attention_layernorm",
                         "pre_feedforward_layernorm", "post_feedforward_layernorm"):
                assert mx.array_equal(w[f"{new}{norm}.weight"],
                                      t[f"{old}{norm}.weight"][d]).item(), norm
        if family.startswith("gemma3"):  # per-head norms whole; each block keeps its kind
            assert mx.array_equal(w[new + "self_attn.q_norm.weight"],
                                  t[old + "self_attn.q_norm.weight"]).item()
            assert (b + 1) % 2 == (j + 1) % 2  # global at odd indices, as in the teacher
    emb, temb = w["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:, d]
    if family.startswith("gemma"):  # the forward's sqrt(hidden_size) is compensated
        assert mx.allclose(emb * 16 ** 0.5, temb * 32 ** 0.5, rtol=2e-3).item()
    else:
        assert mx.array_equal(emb, temb).item()
    out_logits = logits(out)
    assert out_logits.shape == (1, 8, 64) and mx.isfinite(out_logits).all().item()
    if family == "gemma2":
        assert mx.abs(out_logits).max().item() <= 30.0
    # the scale of the teacher's logits, not blown up or flattened by the width cut
    ratio = out_logits.std().item() / logits(teacher).std().item()
    assert 0.3 < ratio < 3.0, ratio


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3", "phi3"])
def test_new_families_untied_head(tiny, tmp_path, family):
    teacher = make_teacher(str(tmp_path / "t"), family, tied=False)
    _, full = prune(tiny, tmp_path, teacher, "full")
    assert mx.array_equal(logits(full), logits(teacher)).item()
    rep, out = prune(tiny, tmp_path, teacher, hidden_size=16, num_attention_heads=2,
                     num_key_value_heads=1)
    w, t = weights_of(out), weights_of(teacher)
    want = t["lm_head.weight"][:, mx.array(rep["kept_hidden"])]
    assert mx.array_equal(w["lm_head.weight"], want).item()  # not rescaled: not the embedding
    assert mx.isfinite(logits(out)).all().item()

@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma3"])
def test_gemma_width_cut_of_dead_channels_keeps_the_logits(tiny, tmp_path, family):
    """Blocks that pass their input through and embedding channels that are zero: cutting
    those channels leaves the logits as they were. The student's scaled embedding is the
    teacher's on the kept channels, and the tied head, √(D/D') larger, offsets the final
    RMSNorm now averaging over D' channels; without the rescale they would be √(D'/D)."""
    teacher = make_teacher(str(tmp_path / "t"), family)
    path = os.path.join(teacher, "model.safetensors")
    w = mx.load(path)
    for k in w:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            w[k] = mx.zeros_like(w[k])
        elif k.endswith("embed_tokens.weight"):
            w[k] = w[k] * (mx.arange(32) % 2 == 0)
    mx.save_safetensors(path, w, metadata={"format": "mlx"})
    rep, out = prune(tiny, tmp_path, teacher, hidden_size=16)
    assert rep["kept_hidden"] == list(range(0, 32, 2))
    assert mx.allclose(logits(out), logits(teacher), rtol=1e-3, atol=1e-4).item()


def test_gemma3_blocks_keep_their_kind_of_attention(tiny, tmp_path):
    # sliding, sliding, global, sliding, sliding, global; the first global block does nothing
    teacher = make_teacher(str(tmp_path / "t"), "gemma3_text", layers=6, identity_block=2,
                           extra={"sliding_window_pattern": 3})
    for n, kept_kinds, pattern in [(4, "ssgs", 3), (2, "sg", 2), (1, "g", 1)]:
        rep, out = prune(tiny, tmp_path, teacher, f"s{n}", num_hidden_layers=n)
        kinds = "".join("g" if (b + 1) % 3 == 0 else "s" for b in rep["kept_blocks"])
        assert kinds == kept_kinds and text_config(out)["sliding_window_pattern"] == pattern
        if n < 4:  # one global block: the one that does something
            assert rep["kept_blocks"][-1] == 5
        assert mx.isfinite(logits(out)).all().item()  # mlx_lm runs a pattern beyond n blocks
    # random draws among the blocks of the kinds the student needs too
    rep, _ = prune(tiny, tmp_path, teacher, "r", num_hidden_layers=4, method="random")
    assert "".join("g" if (b + 1) % 3 == 0 else "s" for b in rep["kept_blocks"]) == "ssgs"


def test_gemma3_budget_counts_the_tied_head_once(tiny, tmp_path):
    from mlxdistill import prune as prune_mod

    teacher = make_teacher(str(tmp_path / "t"), "gemma3", layers=4)
    with open(os.path.join(teacher, "config.json")) as f:
        tcfg = json.load(f)
    full = prune_mod.count_params(tcfg, prune_mod.teacher_shape(tcfg), tied=True)
    assert full == sum(v.size for v in weights_of(teacher).values())
    rep, out = prune(tiny, tmp_path, teacher, target_params=full // 2)
    assert rep["params_after"] == prune_mod.count_params(tcfg, rep["shape_after"], tied=True)
    assert rep["params_after"] <= full // 2
    assert mx.isfinite(logits(out)).all().item()


def test_a_parameter_budget_picks_the_shape(tiny, tmp_path):
    from mlxdistill import prune as prune_mod

    teacher = make_teacher(str(tmp_path / "t"), layers=4)
    with open(os.path.join(teacher, "config.json")) as f:
        tcfg = json.load(f)
    full = prune_mod.count_params(tcfg, prune_mod.teacher_shape(tcfg))
    rep, out = prune(tiny, tmp_path, teacher, target_params=full // 2)
    assert rep["params_after"] <= full // 2 and rep["target_params"] == full // 2
    # a shape within the budget, as large as the search allows, and its count exact
    assert rep["params_after"] == prune_mod.count_params(tcfg, rep["shape_after"])
    # as deep as the budget allows at the width it chose
    s = rep["shape_after"]
    if s["num_hidden_layers"] < 4:
        deeper = {**s, "num_hidden_layers": s["num_hidden_layers"] + 1}
        assert prune_mod.count_params(tcfg, deeper) > full // 2
    assert logits(out).shape == (1, 8, 64)
    with pytest.raises(prune_mod.PruneError, match="both set"):
        prune(tiny, tmp_path, teacher, "b", target_params=full // 2, hidden_size=16)
    with pytest.raises(prune_mod.PruneError, match="below the smallest shape"):
        prune(tiny, tmp_path, teacher, "c", target_params=10)


def test_identity_block_has_least_influence_and_goes(tiny, tmp_path):
    teacher = make_teacher(str(tmp_path / "t"), identity_block=1)
    rep, _ = prune(tiny, tmp_path, teacher, num_hidden_layers=2)
    bi = rep["block_influence"]
    assert bi[1] < 1e-5 < min(bi[0], bi[2])
    assert rep["kept_blocks"] == [0, 2]


def test_random_differs_with_the_same_shape(tiny, tmp_path):
    teacher = make_teacher(str(tmp_path / "t"), layers=4)
    sizes = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=24,
                 num_attention_heads=2, num_key_value_heads=1)
    act, a = prune(tiny, tmp_path, teacher, "a", **sizes)
    rnd, r = prune(tiny, tmp_path, teacher, "r", **sizes, method="random")
    assert rnd["shape_after"] == act["shape_after"]
    assert rnd["params_after"] == act["params_after"]
    assert (rnd["kept_hidden"], rnd["kept_mlp"]) != (act["kept_hidden"], act["kept_mlp"])
    assert rnd["block_influence"] is None and act["block_influence"] is not None
    wa, wr = (dict(tree_flatten(mx.load(os.path.join(p, "model.safetensors"))))
              for p in (a, r))
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wr.items()}


@pytest.mark.parametrize("sizes,needles", [
    ({"hidden_size": 64}, ["prune.hidden_size=64", "larger than the teacher's 32"]),
    ({"num_attention_heads": 3, "num_key_value_heads": 2},
     ["prune.num_key_value_heads=2", "does not divide"]),
    ({"num_attention_heads": 4, "num_key_value_heads": 1},
     ["query heads per kv head", "the teacher has 2"]),
    ({"num_attention_heads": 3}, ["prune.num_attention_heads=3", "not a multiple"]),
    ({"num_hidden_layers": 0}, ["prune.num_hidden_layers=0", "positive integer"]),
    ({"method": "magnitude"}, ["prune.method='magnitude'", "activation, random"]),
])
def test_invalid_shapes_refused_in_one_line(tiny, tmp_path, sizes, needles):
    teacher = make_teacher(str(tmp_path / "t"))
    ov = tiny_overrides(tiny, tmp_path, **{"teacher.model": teacher,
                                          **{f"prune.{k}": v for k, v in sizes.items()}})
    assert_one_line_error(invoke("prune", "-o", str(tmp_path / "s"), *ov), *needles)
    assert not os.path.exists(tmp_path / "s")


def test_unsupported_family_derived_head_dim_and_busy_output_refused(tiny, tmp_path):
    teacher = make_teacher(str(tmp_path / "t"))
    with open(os.path.join(teacher, "config.json")) as f:
        cfg = json.load(f)
    other = tmp_path / "phi"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "starcoder2"}))
    ov = tiny_overrides(tiny, tmp_path, **{"teacher.model": str(other)})
    assert_one_line_error(invoke("prune", "-o", str(tmp_path / "s"), *ov), "'starcoder2'",
                          "prune supports llama, mistral, qwen2, qwen3, phi3, gemma2, "
                          "gemma3_text, gemma3")
    for family in ("qwen2", "phi3"):  # both derive head_dim from hidden_size
        derived = make_teacher(str(tmp_path / family), family)
        ov = tiny_overrides(tiny, tmp_path, **{"teacher.model": derived,
                                              "prune.num_attention_heads": 2})
        assert_one_line_error(invoke("prune", "-o", str(tmp_path / "s"), *ov),
                              "prune.num_attention_heads=2", f"{family} takes head_dim",
                              "prune.hidden_size=16")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    ov = tiny_overrides(tiny, tmp_path, **{"teacher.model": teacher})
    assert_one_line_error(invoke("prune", "-o", str(busy), *ov), "--force")
    assert (busy / "keep.txt").exists()


def test_cli_prints_and_the_pruned_student_trains(tiny, tmp_path):
    out = str(tmp_path / "pruned")
    ov = tiny_overrides(tiny, tmp_path, **{"prune.rows": 8, "prune.num_hidden_layers": 1,
                                          "prune.hidden_size": 24,
                                          "prune.intermediate_size": 48,
                                          "prune.num_attention_heads": 1})
    res = invoke("prune", "-q", "-o", out, *ov)
    assert res.exit_code == 0, res.output
    assert "M params" in res.output and f"student.model={out}" in res.output
    ov = tiny_overrides(tiny, tmp_path, **{"student.model": out, "train.iters": 3,
                                          "train.final_eval": "false"})
    res = invoke("train", "-q", *ov)
    assert res.exit_code == 0, res.output
    assert os.path.isdir(tmp_path / "run" / "model")
