"""Export: fused, quantized, MLX-Swift-shaped folders that reload with the same behaviour."""

import json
import os

import pytest
from click.testing import CliRunner
from conftest import ROOT, WORDS, make_model, tiny_overrides

from mlxdistill import api
from mlxdistill.cli import main
from mlxdistill.config import load_config


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    # width 64 so that 4/8-bit quantization (group size 32) applies to every linear layer
    student = make_model(str(d / "student64"), dim=64, layers=1, seed=3)
    cfg = load_config(None, tiny_overrides(tiny, d, **{
        "student.model": student, "train.mode": "lora", "train.iters": 6, "train.lr": 1e-2,
        "train.lora_rank": 4}))
    api.train(cfg, quiet=True, log=lambda m: None)
    return cfg.run.dir, d


@pytest.mark.parametrize("bits", ["16", "8", "4"])
def test_export_round_trip_and_file_set(lora_run, bits):
    run_dir, d = lora_run
    out = str(d / f"out{bits}")
    res = CliRunner().invoke(main, ["export", run_dir, "-o", out, "--bits", bits,
                                    "--group-size", "32"])
    assert res.exit_code == 0, res.output
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "export.json"} <= files
    assert not any(f.endswith(".tmp") for f in files)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llama"
    report = json.load(open(os.path.join(out, "export.json")))
    rt = report["round_trip"]
    assert report["fused_layers"] > 0
    if bits == "16":
        assert "quantization" not in cfg
        # float16 storage rounds each weight to ~3 significant digits: the distributions
        # must match (KL), single logits of a sharp model may move by a few hundredths
        assert rt["top1_agreement"] == 1.0 and rt["kl_reference_to_export"] < 1e-4
        assert rt["max_abs_logit_diff"] < 0.25
    else:
        assert cfg["quantization"]["bits"] == int(bits)
        assert cfg["quantization"]["group_size"] == 32
        assert rt["top1_agreement"] > 0.5  # reported; quantization may flip near-ties
    import mlx.core as mx

    weights = mx.load(os.path.join(out, "model.safetensors"))
    assert not any("lora" in k for k in weights)  # adapters fused away
    # MLX Swift fails on extra or missing keys: exactly the parameters of the model that
    # config.json describes (quantized where it says so), and float16 where not packed
    from pathlib import Path

    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(out))
    assert set(weights) == {k for k, _ in tree_flatten(model.parameters())}
    assert {str(v.dtype) for v in weights.values()} <= {"mlx.core.float16", "mlx.core.uint32"}
    assert cfg["torch_dtype"] == "float16"
    assert any(k.endswith(".scales") for k in weights) == (bits != "16")


def test_export_refuses_nonempty_out_and_bad_run(lora_run, tmp_path):
    run_dir, d = lora_run
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("keep me")
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.stderr
    assert (out / "x").read_text() == "keep me"
    res = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a run directory" in res.stderr
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(tmp_path / "o"), "--bits", "3"])
    assert res.exit_code != 0


def test_distillation_aware_quantization_lowers_kl(lora_run):
    run_dir, d = lora_run
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(d / "tuned"), "--bits", "4",
                                    "--group-size", "32", "--tune-iters", "30",
                                    "--tune-lr", "1e-3"])
    assert res.exit_code == 0, res.output
    tuning = json.load(open(d / "tuned" / "export.json"))["tuning"]
    assert tuning["kl_to_teacher_after"] < tuning["kl_to_teacher_before"], tuning
    assert tuning["loss_last"] < tuning["loss_first"]


EMBEDDED_STUDENT = os.path.join(ROOT, "weights", "student")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@pytest.fixture(scope="module")
def spm_run(tiny, tmp_path_factory):
    """A LoRA run of the embedded student (SentencePiece BPE tokenizer, with
    tokenizer.model), its own teacher: seconds, and the tokenizer a real export ships."""
    d = tmp_path_factory.mktemp("spm")
    cfg = load_config(None, tiny_overrides(tiny, d, **{
        "teacher.model": EMBEDDED_STUDENT, "student.model": EMBEDDED_STUDENT,
        "train.mode": "lora", "train.iters": 2, "train.lora_rank": 4}))
    api.train(cfg, quiet=True, log=lambda m: None)
    return cfg.run.dir, d


def _same_bytes(a, b, names):
    for name in names:
        with open(os.path.join(a, name), "rb") as f, open(os.path.join(b, name), "rb") as g:
            assert f.read() == g.read(), f"{name} differs from the source's"


def test_export_copies_the_source_tokenizer_files(spm_run, tiny):
    """transformers 5 re-saves tokenizer_config.json with tokenizer_class TokenizersBackend
    and without add_bos_token, which transformers 4 and swift-transformers refuse."""
    run_dir, d = spm_run
    out = d / "tok"
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(out)])
    assert res.exit_code == 0, res.output
    _same_bytes(EMBEDDED_STUDENT, out, TOKENIZER_FILES)
    tc = json.load(open(out / "tokenizer_config.json"))
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["add_bos_token"] is False
    # a full fine-tune's model/ folder, which export reads for a full run, keeps them too
    cfg = load_config(None, tiny_overrides(tiny, d, **{
        "teacher.model": EMBEDDED_STUDENT, "student.model": EMBEDDED_STUDENT,
        "train.mode": "full", "train.iters": 1, "run.dir": str(d / "full")}))
    api.train(cfg, quiet=True, log=lambda m: None)
    _same_bytes(EMBEDDED_STUDENT, d / "full" / "model", TOKENIZER_FILES)


def test_copy_tokenizer_writes_only_what_the_source_lacks(tmp_path):
    from mlxdistill import models, saving

    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (src / name).write_bytes(open(os.path.join(EMBEDDED_STUDENT, name), "rb").read())
    _, tok = models.load_meta(EMBEDDED_STUDENT, "student")
    dst = tmp_path / "dst"
    dst.mkdir()
    saving.copy_tokenizer(tok, str(src), str(dst))
    _same_bytes(src, dst, ("tokenizer.model", "tokenizer_config.json"))
    assert (dst / "tokenizer.json").is_file()  # written by transformers: the source had none
    assert sorted(os.listdir(dst)) == sorted(set(os.listdir(dst)))  # no scratch folder left
    assert not [f for f in os.listdir(dst) if os.path.isdir(dst / f)]


# llama.cpp's token types
NORMAL, USER_DEFINED, UNUSED = 1, 4, 5


def llama_cpp_spm(text, tokens, scores, types, add_space_prefix):
    """llama.cpp's SentencePiece tokenizer (llama-vocab.cpp, llm_tokenizer_spm_session), for
    text without control tokens: user-defined tokens split out first (a space prefixed to
    the text after each), then characters merged pair by pair, highest-scoring result first
    (leftmost on ties), and characters outside the vocabulary as <0xXX> bytes."""
    import heapq
    import re

    ids = {t: i for i, t in enumerate(tokens)}
    user = sorted((t for t, ty in zip(tokens, types) if ty == USER_DEFINED), key=len,
                  reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, user)) + ")", text) if user else [text]
    out, prefix = [], add_space_prefix
    for k, part in enumerate(parts):
        if k % 2:
            out.append(ids[part])
            prefix = add_space_prefix
            continue
        if not part:
            continue
        syms = list(((" " if prefix else "") + part).replace(" ", "\u2581"))
        prefix = False
        nxt, prv = list(range(1, len(syms))) + [-1], list(range(-1, len(syms) - 1))
        heap = []

        def add(left, right):
            if left >= 0 and right >= 0 and syms[left] + syms[right] in ids:
                t = syms[left] + syms[right]
                heapq.heappush(heap, (-scores[ids[t]], left, right, len(t)))

        for i in range(len(syms) - 1):
            add(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
                continue
            syms[left], syms[right] = syms[left] + syms[right], ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            add(prv[left], left)
            add(left, nxt[left])
        i = 0
        while i >= 0:
            if syms[i] in ids:
                out.append(ids[syms[i]])
            else:
                out += [ids[f"<0x{b:02X}>"] for b in syms[i].encode()]
            i = nxt[i]
    return out


def _gguf_fields(path):
    from gguf import GGUFReader

    return GGUFReader(str(path)).fields


def _held_out_texts(n=3, chars=1500):
    with open(os.path.join(ROOT, "data", "test.jsonl")) as f:
        return [json.loads(line)["text"][:chars] for _, line in zip(range(n), f)]


def test_gguf_tokenizer_metadata_matches_training(spm_run):
    """llama.cpp refuses an unsigned token_type; with placeholder scores its SentencePiece
    merges run leftmost-first; without add_bos_token it prepends <s>, never seen in
    training."""
    from gguf import GGUFValueType
    from sentencepiece import SentencePieceProcessor

    from mlxdistill import data as data_mod
    from mlxdistill import models

    run_dir, d = spm_run
    out = d / "gguf-spm"
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(out), "--gguf"])
    assert res.exit_code == 0, res.output
    rep = json.load(open(out / "export.json"))["gguf"]
    f = _gguf_fields(out / rep["file"])
    assert f["tokenizer.ggml.token_type"].types == [GGUFValueType.ARRAY, GGUFValueType.INT32]
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.block_count"].contents() == 4
    sp = SentencePieceProcessor(model_file=os.path.join(EMBEDDED_STUDENT, "tokenizer.model"))
    scores = f["tokenizer.ggml.scores"].contents()
    assert scores == [sp.GetScore(i) for i in range(sp.GetPieceSize())]
    assert len(set(scores)) > 1000
    _, tok = models.load_meta(EMBEDDED_STUDENT, "student")
    trained = data_mod.record_segments(tok, {"text": "To be"}, False)[0][0]
    assert f["tokenizer.ggml.add_bos_token"].contents() == (trained[0] == tok.bos_token_id)
    assert f["tokenizer.ggml.add_bos_token"].contents() is False
    assert f["tokenizer.ggml.add_eos_token"].contents() is False
    # what llama.cpp does with these tokens, scores and types is what training did
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    prefix = f["tokenizer.ggml.add_space_prefix"].contents()
    for text in _held_out_texts():
        assert llama_cpp_spm(text, tokens, scores, types, prefix) == data_mod._encode(tok, text)
    assert rep["tokenizer_from"] == "tokenizer.model" and rep["embedding_identical"]
    import mlx.core as mx

    tensors = mx.load(str(out / rep["file"]))
    assert len(tensors) == len(mx.load(str(out / "model.safetensors"))) == rep["tensors"]


def test_gguf_scores_from_tokenizer_json_merges(tmp_path):
    """Without tokenizer.model the scores come from the merge ranks of tokenizer.json, and
    llama.cpp's merges then follow the BPE's order."""
    import shutil

    from mlxdistill import data as data_mod
    from mlxdistill import gguf, models

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(EMBEDDED_STUDENT, name), tmp_path)
    _, tok = models.load_meta(str(tmp_path), "student")
    meta = gguf.vocab_metadata(str(tmp_path), tok, 4096)
    assert gguf.tokenizer_kind(str(tmp_path)) == "tokenizer.json"
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta["tokenizer.ggml.scores"].tolist()
    types = meta["tokenizer.ggml.token_type"].tolist()
    merges = json.load(open(tmp_path / "tokenizer.json"))["model"]["merges"]
    first = "".join(merges[0]) if isinstance(merges[0], list) else merges[0].replace(" ", "")
    assert scores[tokens.index(first)] == 0.0 and min(scores) < -1000
    prefix = bool(meta["tokenizer.ggml.add_space_prefix"].item())
    for text in _held_out_texts():
        assert llama_cpp_spm(text, tokens, scores, types, prefix) == data_mod._encode(tok, text)


def test_gguf_byte_level_bpe_goes_to_llama_cpp_bpe(tmp_path):
    """A byte-level BPE with Llama 3's pre-tokenizer: llama.cpp's BPE tokenizer with the
    merges in order and pre-tokenizer "llama-bpe"; another pre-tokenizer is refused."""
    import mlx.core as mx
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from mlxdistill import gguf, models
    from mlxdistill.config import ConfigError

    tk = Tokenizer(BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf.LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _, tok = models.load_meta(str(tmp_path), "student")
    meta = gguf.vocab_metadata(str(tmp_path), tok, 512)
    tj = json.load(open(tmp_path / "tokenizer.json"))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m
                                             for m in tj["model"]["merges"]]
    assert meta["tokenizer.ggml.token_type"].dtype == mx.int32
    assert meta["tokenizer.ggml.token_type"][tok.bos_token_id].item() == 3  # control
    assert len(meta["tokenizer.ggml.tokens"]) == 512  # padded to the embedding's rows
    assert not meta["tokenizer.ggml.add_bos_token"].item()
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConfigError, match="byte-level BPE with Llama 3's or GPT-2's"):
        gguf.check({"model_type": "llama"}, 16, str(tmp_path))


def _rope_scores(q, k, n_head, n_kv, traditional):
    """Attention logits of one position pair after RoPE, per query head (GQA: query head h
    reads key head h // (n_head // n_kv))."""
    import mlx.core as mx

    hd = q.shape[-1] // n_head
    qs = q.reshape(1, 1, n_head, hd).transpose(0, 2, 1, 3)
    ks = k.reshape(1, 1, n_kv, hd).transpose(0, 2, 1, 3)
    qr = mx.fast.rope(qs, hd, traditional=traditional, base=10000.0, scale=1.0, offset=7)
    kr = mx.fast.rope(ks, hd, traditional=traditional, base=10000.0, scale=1.0, offset=3)
    kr = mx.repeat(kr, n_head // n_kv, axis=1)
    return (qr * kr).sum(-1)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_gguf_tensors_in_llama_cpp_layout(arch):
    """Grouped-query attention (4 query heads, 2 key-value heads): the permuted Q and K
    rows under llama.cpp's interleaved RoPE give the attention logits the model computes
    with rotate-half RoPE; every tensor carries a name llama.cpp's llama loader knows."""
    import re

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from mlxdistill import gguf

    cfg = dict(model_type=arch, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               vocab_size=100, rope_theta=10000.0, max_position_embeddings=256,
               tie_word_embeddings=False)
    if arch == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2)
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(cfg))
    model.set_dtype(mx.float16)  # as export stores it
    weights = dict(tree_flatten(model.parameters()))
    t = gguf.tensors(weights, cfg)
    known = (r"token_embd|output_norm|output|blk\.\d+\.(attn_(q|k|v|output|norm)|ffn_norm|"
             r"ffn_(gate|up|down)(_exps)?|ffn_gate_inp)")
    assert all(re.fullmatch(f"({known})\\.weight", n) for n in t), sorted(t)
    if arch == "mixtral":
        assert t["blk.0.ffn_gate_exps.weight"].shape == (4, 96, 64)
    assert all(v.dtype == mx.float32 for n, v in t.items() if "norm" in n)
    x = mx.random.normal((64,))
    f32 = lambda name, d: d[name].astype(mx.float32) @ x  # noqa: E731
    ref = _rope_scores(f32("model.layers.0.self_attn.q_proj.weight", weights),
                       f32("model.layers.0.self_attn.k_proj.weight", weights), 4, 2,
                       traditional=False)
    got = _rope_scores(f32("blk.0.attn_q.weight", t), f32("blk.0.attn_k.weight", t), 4, 2,
                       traditional=True)
    assert mx.allclose(ref, got, rtol=1e-5, atol=1e-5).item()


def test_gguf_refuses_what_llama_cpp_would_not_run_as_trained(lora_run, spm_run, tmp_path):
    from mlxdistill.config import ConfigError
    from mlxdistill.gguf import check

    run_dir, _ = spm_run
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(tmp_path / "q"), "--bits", "4",
                                    "--gguf"])
    assert res.exit_code == 2 and "float16 only" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "q").exists()
    # the tiny word-level tokenizer has no llama.cpp equivalent
    res = CliRunner().invoke(main, ["export", lora_run[0], "-o", str(tmp_path / "w"), "--gguf"])
    assert res.exit_code == 2 and "WordLevel" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
    with pytest.raises(ConfigError, match="not 'qwen2'"):
        check({"model_type": "qwen2"}, 16, EMBEDDED_STUDENT)
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        check({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}, 16,
              EMBEDDED_STUDENT)
    check({"model_type": "mistral"}, 16, EMBEDDED_STUDENT)  # accepted
    check({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 16,
          EMBEDDED_STUDENT)


def _one_line_error(args, needle):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_export_bad_input_one_line_errors(lora_run, tmp_path):
    import shutil

    import yaml

    run_dir, d = lora_run
    _one_line_error(["export", run_dir, "-o", str(tmp_path / "a"), "--bits", "3"], "--bits 3")
    _one_line_error(["export", run_dir, "-o", str(tmp_path / "a"), "--target-quality", "1.5"],
                    "--target-quality")
    _one_line_error(["export", run_dir, "-o", str(tmp_path / "a"), "--bits", "4",
                     "--group-size", "16"], "--group-size 16")
    # a run directory whose training never wrote weights
    empty = tmp_path / "unfinished"
    empty.mkdir()
    shutil.copy(os.path.join(run_dir, "config.yaml"), empty)
    _one_line_error(["export", str(empty), "-o", str(tmp_path / "b")], "neither model/ nor")
    # OUT that cannot be written: under a file, and in a folder the OS refuses
    (tmp_path / "file").write_text("x")
    _one_line_error(["export", run_dir, "-o", str(tmp_path / "file" / "out")],
                    "not an existing folder")
    res = CliRunner().invoke(main, ["export", run_dir, "-o", "/proc/mlxdistill-export"])
    assert res.exit_code == 2 and ("not writable" in res.stderr or "cannot write" in res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1
    # a run whose student model folder has no config.json
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    student = tmp_path / "student-no-config"
    shutil.copytree(yaml.safe_load(open(broken / "config.yaml"))["student"]["model"], student)
    os.remove(student / "config.json")
    cfg = yaml.safe_load(open(broken / "config.yaml"))
    cfg["student"]["model"] = str(student)
    yaml.safe_dump(cfg, open(broken / "config.yaml", "w"))
    _one_line_error(["export", str(broken), "-o", str(tmp_path / "c")], "no config.json")


def test_export_writes_fallback_threshold(lora_run):
    run_dir, d = lora_run
    reports = {}
    for target in ("0.5", "1.0"):
        out = d / f"fb{target}"
        res = CliRunner().invoke(main, ["export", run_dir, "-o", str(out),
                                        "--target-quality", target])
        assert res.exit_code == 0, res.output
        reports[target] = json.load(open(out / "export.json"))["fallback"]
        card = (out / "README.md").read_text()
        assert "## Cloud fallback" in card and reports[target]["rule_text"] in card
    lo, hi = reports["0.5"], reports["1.0"]
    for target, fb in (("0.5", lo), ("1.0", hi)):
        assert fb["signal"] in ("confidence", "margin") and fb["defer_when"] == "below"
        assert fb["target"] == float(target) and fb["quality"].startswith("next-token")
        assert fb["fit"]["examples"] == fb["test"]["examples"] == 10  # data.valid, data.test
        assert fb["fit"]["reached"] == (fb["fit"]["quality"] >= float(target)
                                        * fb["fit"]["teacher_quality"] - 1e-6)
        t = fb["test"]
        assert t["gain_at_rate"] == pytest.approx(t["quality"] - t["random_quality"], abs=1e-5)
    assert hi["fit"]["deferred_fraction"] >= lo["fit"]["deferred_fraction"]


def test_model_card_front_matter_as_the_hub_reads_it(lora_run, tiny):
    """YAML front matter the Hub parses: the student's base as base_model (a hub id as is,
    a local folder by its name, which the card says), library, task, tags, the teacher."""
    import yaml

    from mlxdistill.export import model_card

    rt = {"positions": 4, "max_abs_logit_diff": 0.0, "top1_agreement": 1.0}
    card = model_card("runs/x", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", 4,
                      rt, None)
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "mlx" and meta["pipeline_tag"] == "text-generation"
    assert {"mlx", "distillation", "knowledge-distillation", "mlxdistill", "4-bit"} \
        <= set(meta["tags"])
    assert meta["teacher_model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert "teacher `Qwen/Qwen2.5-7B-Instruct`" in card and "local folder" not in card

    # the exported folder's own card: the tiny pair are local folders, named, never a path
    run_dir, d = lora_run
    out = d / "card"
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "student64"
    assert meta["teacher_model"] == os.path.basename(tiny["teacher"])
    assert "(base_model) is the name of a local folder" in text
    assert str(d) not in text.split("---\n")[1]


def test_round_trip_tells_a_near_tie_flip_from_wrong_weights(tmp_path):
    """16-bit passes when the only top-1 changes are at positions whose two best reference
    logits are closer than the logits moved; a flip anywhere else fails it."""
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from mlxdistill import export

    import shutil

    src = make_model(str(tmp_path / "m"), dim=32, layers=1, seed=5, sharpen=4.0)
    folder = str(tmp_path / "m16")  # the same model stored as float16, as export stores it
    shutil.copytree(src, folder)
    w = mx.load(os.path.join(src, "model.safetensors"))
    mx.save_safetensors(os.path.join(folder, "model.safetensors"),
                        {k: v.astype(mx.float16) for k, v in w.items()})
    rows = mx.array([[(7 * i + 1) % 64 for i in range(128)]], dtype=mx.int32)
    ref = export._logits(export.as_evaluated(mlx_load(src)[0]), rows, 64)
    rt = export.round_trip(ref, folder, rows, 64)
    assert 0 < rt["max_abs_logit_diff"] < 0.25 and rt["top1_flips"] == 0
    assert export.round_trip_check(rt, 16) == "pass"

    top2 = mx.topk(ref[0, 3], 2)  # ascending: [second, first]
    second = int(mx.argmax(mx.where(ref[0, 3] == top2[1], -1e9, ref[0, 3])).item())

    def with_pos3(v):  # the reference with token `second` at position 3 set to v
        return mx.where((mx.arange(64) == second)[None, None] & (mx.arange(128) == 3)[None, :, None],
                        v, ref)

    # the reference's runner-up made a hair better: a near-tie the export may flip
    near = export.round_trip(with_pos3(top2[1].item() + 1e-6), folder, rows, 64)
    assert near["top1_flips"] == near["flips_at_near_ties"] == 1
    assert export.round_trip_check(near, 16) == "pass"
    # made far better: the export disagrees where it should not, which is a failure
    far = export.round_trip(with_pos3(top2[1].item() + 50.0), folder, rows, 64)
    assert far["top1_flips"] == 1 and far["flips_at_near_ties"] == 0
    assert export.round_trip_check(far, 16) == "FAIL"
    assert export.round_trip_check(far, 4) == "reported"
