"""`mlxdistill plan`: the memory estimate made from config.json alone agrees with the peak MLX
memory measured around a real training step and teacher batch, on the embedded pair and on
every family of the matrix; cache size and the fits / does-not-fit advice; a student still to
be pruned (prune.*) planned exactly as the folder `mlxdistill prune` then writes."""

import json
import os
import re

import pytest
from click.testing import CliRunner
from conftest import ROOT, prompt_completion, tiny_overrides
from test_families import CASES, family_pair

from mlxdistill import cache, plan, probe
from mlxdistill.cli import main
from mlxdistill.config import load_config

TOLERANCE = 0.25


def assert_close(est: int, measured: int, what: str) -> None:
    assert abs(est / measured - 1) <= TOLERANCE, \
        f"{what}: estimated {est:,} B, measured {measured:,} B ({est / measured:.2f}x)"


def test_embedded_pair_full_estimate_matches_measured_peak():
    cfg = load_config(None, ["data.seq_len=128"])
    p = plan.plan(cfg, probe=True)
    for name in ("training", "teacher_pass"):
        est = p[name]
        assert_close(est["mlx_bytes"], est["measured_peak_bytes"], f"embedded {name}")
        assert est["fits"] and est["seconds"] > 0
    # The float32 logits (with their gradient) and the activations are the two largest parts
    # for a 4096-token vocabulary and a 128-wide, 4-layer student.
    parts = p["training"]["parts"]
    assert sorted(parts, key=parts.get)[-2:] in (["logits", "activations"],
                                                 ["activations", "logits"])


def test_embedded_pair_estimate_matches_real_trainer_step(tmp_path, monkeypatch):
    """The peak around each step of `trainer.fit` itself (reset when the batch is ready,
    read when the step is done), against the estimate and against the probe that stands in
    for the trainer on the family models."""
    import mlx.core as mx

    from mlxdistill import trainer
    from mlxdistill.progress import Progress

    # The first records of the embedded corpus: enough for 8 rows, quick to tokenize.
    small = {}
    for split in ("train", "valid"):
        with open(os.path.join(ROOT, "data", f"{split}.jsonl")) as f:
            lines = f.readlines()[:60]
        small[split] = tmp_path / f"{split}.jsonl"
        small[split].write_text("".join(lines))
    cfg = load_config(None, [f"data.train={small['train']}", f"data.valid={small['valid']}",
                             "data.seq_len=128", "data.max_rows=8", "cache.shard_rows=8",
                             f"cache.dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}",
                             "train.iters=3", "train.eval_every=100", "train.save_every=100",
                             "train.mode=full"])
    cache.build(cfg, quiet=True, log=lambda m: None)
    peaks, to_arrays, update = [], trainer.to_arrays, Progress.update

    def ready(batch):
        out = to_arrays(batch)
        mx.eval(out)
        mx.reset_peak_memory()
        return out

    def done(self, *a, **k):
        peaks.append(mx.get_peak_memory())
        return update(self, *a, **k)

    monkeypatch.setattr(trainer, "to_arrays", ready)
    monkeypatch.setattr(Progress, "update", done)
    base = probe.baseline()  # arrays other tests left behind are not this run's
    trainer.fit(cfg, quiet=True, log=lambda m: None)
    assert len(peaks) == 3
    measured = max(peaks) - base
    s = plan.model_shape(plan.read_config(cfg.student.model, "student"), "student")
    est = plan.training_total(cfg, s, plan.cache_bytes_per_token(cfg, s.vocab, 0))
    assert_close(est["mlx_bytes"], measured, "embedded trainer step")
    monkeypatch.undo()
    assert abs(probe.probe_training(cfg)["peak_bytes"] / measured - 1) < 0.05


@pytest.mark.parametrize("knob", ["train.grad_checkpoint=true", "train.loss_chunk=32"])
def test_memory_knobs_estimate_matches_measured_peak(knob):
    cfg = load_config(None, ["data.seq_len=128", knob])
    s = plan.model_shape(plan.read_config(cfg.student.model, "student"), "student")
    est = plan.training_total(cfg, s, plan.cache_bytes_per_token(cfg, s.vocab, 0))
    plain = plan.training_total(load_config(None, ["data.seq_len=128"]), s, 53)
    assert est["mlx_bytes"] < 0.9 * plain["mlx_bytes"]  # the knob is worth suggesting
    assert_close(est["mlx_bytes"], probe.probe_training(cfg)["peak_bytes"], knob)


def test_embedded_pair_lora_estimate_matches_measured_peak():
    cfg = load_config(None, ["data.seq_len=128", "train.mode=lora"])
    s = plan.model_shape(plan.read_config(cfg.student.model, "student"), "student")
    est = plan.training_total(cfg, s, plan.cache_bytes_per_token(cfg, s.vocab, 0))
    assert_close(est["mlx_bytes"], probe.probe_training(cfg)["peak_bytes"], "embedded lora")


@pytest.mark.parametrize("case,family,tkw,skw,mode", CASES, ids=[c[0] for c in CASES])
def test_family_estimates_match_measured_peak(case, family, tkw, skw, mode, tmp_path):
    teacher, student = family_pair(tmp_path, family, tkw, skw)
    cfg = load_config(None, [f"teacher.model={teacher}", f"student.model={student}",
                             f"train.mode={mode}", "train.batch_size=4", "data.seq_len=32",
                             "train.lora_rank=4", "cache.batch_size=4", "train.eval_rows=4"])
    ss = plan.model_shape(plan.read_config(student, "student"), "student")
    ts = plan.model_shape(plan.read_config(teacher, "teacher"), "teacher")
    assert (ts.bits, ss.bits) == (tkw.get("bits"), skw.get("bits"))
    bpt = plan.cache_bytes_per_token(cfg, min(ts.vocab, ss.vocab), ts.hidden)
    # The teacher probe first: a compiled training step's buffers are released some time
    # after it returns, and would otherwise sit in the teacher probe's baseline. A tiny
    # teacher's peak lands in one of two modes, call by call, ~25 % apart (how MLX's
    # scheduler orders and frees the batch's buffers); the plan must cover the higher one,
    # so the largest of several probes is the peak to compare with.
    measured = max(probe.probe_teacher(cfg, batches=4)["peak_bytes"] for _ in range(5))
    assert_close(plan.teacher_total(cfg, ts, bpt, None, min(ts.vocab, ss.vocab))["mlx_bytes"],
                 measured, f"{case} teacher pass")
    # The peak of a tiny step varies with how MLX's scheduler frees buffers (about +-6 %
    # run to run); the largest of several steps is the peak a run reaches.
    assert_close(plan.training_total(cfg, ss, bpt)["mlx_bytes"],
                 probe.probe_training(cfg, steps=6)["peak_bytes"], f"{case} training")


def test_parameter_count_and_quantized_size_from_config_alone(tmp_path):
    """Exact parameters of a real-size config without allocating its weights, and the 4-bit
    size mlx_lm's packing gives (4 bits + a float16 scale and bias per 64 weights)."""
    import mlx.core as mx

    qwen7b = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                  intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  rms_norm_eps=1e-6, vocab_size=152064, tie_word_embeddings=False,
                  rope_theta=1e6, torch_dtype="bfloat16")
    before = mx.get_active_memory()
    s = plan.model_shape(qwen7b, "teacher")
    assert mx.get_active_memory() - before < 1 << 20  # nothing materialized
    assert s.params == 7_615_616_512  # Qwen2.5-7B's published count
    q = plan.model_shape(qwen7b, "teacher", quantize=(4, 64))
    fb = plan.dtype_bytes(qwen7b)
    linear = s.params - 28 * 2 * 3584 - 3584 - 28 * (3584 + 2 * 512)  # norms and biases
    assert q.weight_bytes == linear // 2 + 2 * (linear // 64) * fb + (s.params - linear) * fb


@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_cache_size_matches_written_shards(tiny, tmp_path, mode):
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{"cache.mode": mode}))
    m = cache.build(cfg, quiet=True, log=lambda m: None)
    p = plan.plan(cfg)
    assert p["cache"]["rows"] == m["rows"] and p["cache"]["rows_from"] == "tokenized"
    shard = cache.ShardReader(cfg.cache.dir).load_shard(0)
    per_token = sum(v.nbytes for k, v in shard.items() if k != "next_ids") / \
        shard["input_ids"].size
    assert p["cache"]["bytes_per_token"] == per_token
    on_disk = sum(os.path.getsize(os.path.join(cfg.cache.dir, s["file"])) for s in m["shards"])
    assert p["cache"]["disk_bytes"] <= on_disk < 1.2 * p["cache"]["disk_bytes"] + 4096


@pytest.mark.parametrize("packing", ["auto", "stream"])
def test_dataset_rows_follow_packing(tiny, tmp_path, packing):
    """plan counts the rows pack makes, padding included, for prompt/completion records."""
    from mlx_lm.utils import load_tokenizer
    from pathlib import Path

    from mlxdistill import data as data_mod

    pc = prompt_completion(tiny["train"], str(tmp_path / "pc.jsonl"), 5, 25)
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{
        "data.train": pc, "data.packing": packing}))
    tok = load_tokenizer(Path(tiny["teacher"]))
    rows = data_mod.pack(pc, tok, 32, packing=packing).rows
    assert plan.dataset_rows(cfg) == (rows, "tokenized")


def test_plan_cli_fits_and_knobs(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"data.seq_len": 64, "train.batch_size": 8})
    res = CliRunner().invoke(main, ["plan", *ov, "--json"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.output)
    assert p["training"]["fits"] and p["teacher_pass"]["fits"]
    need = p["training"]["peak_bytes"]
    # A machine with 80 % of the training peak: told it does not fit, and what would.
    gb = 0.8 * need / (1 << 30)
    res = CliRunner().invoke(main, ["plan", *ov, "--memory-gb", f"{gb:.6f}"])
    assert res.exit_code == 0, res.output
    assert "training:" in res.output and "does NOT fit" in res.output
    lines = res.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("training:"))
    knobs = [line for line in lines[start + 1:] if "to fit:" in line]
    assert any("train.grad_accum=" in k for k in knobs), res.output
    # ... and each advertised setting really brings the estimate under the budget.
    budget = int(float(f"{gb:.6f}") * (1 << 30))
    for k in knobs:
        setting = k.split("to fit:")[1].split()[0]
        if "=" in setting:
            cfg = load_config(None, ov + [setting])
            s = plan.model_shape(plan.read_config(cfg.student.model, "s"), "s")
            bpt = plan.cache_bytes_per_token(cfg, s.vocab, 48)
            assert plan.training_total(cfg, s, bpt)["peak_bytes"] <= budget, setting



# ---------------------------------------------------------------- recipes for real pairs

RECIPES = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))


def stated_memory(path: str) -> dict:
    """`# memory (Mac GPU, mlxdistill plan): teacher pass X GB, training Y GB` in the header."""
    head = open(path).read().split("\n\n")[0]
    m = re.search(r"teacher pass ([\d.]+) GB, training ([\d.]+) GB", head)
    return {"teacher_pass": float(m[1]), "training": float(m[2])} if m else {}


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_opens_with_its_command(name):
    path = os.path.join(ROOT, "configs", name)
    cfg = load_config(path)  # validated, no model loaded
    first = open(path).readline()
    assert first.startswith("# mlxdistill ") and f"configs/{name}" in first, first
    assert cfg.cache.mode == "sample" and cfg.loss.alpha == 0.0
    assert cfg.loss.name == "forward_kl"


HUB_RECIPES = [r for r in RECIPES if r not in ("default.yaml", "lora.yaml", "specialist.yaml")]


@pytest.fixture
def hub_unreachable(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache; the calls made to the hub are recorded."""
    import socket

    import huggingface_hub

    calls = []

    def no_hub(repo_id, filename, **kw):
        calls.append(repo_id)
        raise ConnectionError("no network in tests")

    def no_dns(*a, **kw):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    return calls


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_recipe_plan_offline_prints_the_memory_its_header_states(name, hub_unreachable):
    """`mlxdistill plan -c configs/X.yaml --mac`, the command each hub recipe's header names,
    works with the hub unreachable (the config.json fields shipped in mlxdistill/hub_configs)
    and prints the figures the header states."""
    path = os.path.join(ROOT, "configs", name)
    cfg = load_config(path)
    stated = stated_memory(path)
    assert stated, f"{name} does not state its memory"
    head = open(path).read().split("\n\n")[0]
    assert f"mlxdistill plan -c configs/{name} --mac" in head, name
    res = CliRunner().invoke(main, ["plan", "-c", path, "--mac"])
    assert res.exit_code == 0, res.output
    assert set(hub_unreachable) == {cfg.teacher.model, cfg.student.model}
    assert "config:   teacher and student config.json shipped with mlxdistill (the hub " \
        "fetch failed" in res.output, res.output
    for part, label in (("teacher_pass", "teacher pass:"), ("training", "training:")):
        m = re.search(re.escape(label) + r"\s+peak ([\d.]+) GB", res.output)
        assert m, res.output
        # The header rounds to 0.1 GB, the output to 0.01 GB.
        assert abs(float(m[1]) - stated[part]) <= 0.055, (name, part, m[1], stated[part])
    p = plan.plan(cfg, metal=True, memory_bytes=1 << 40)
    for part in ("teacher_pass", "training"):
        assert stated[part] == round(p[part]["peak_bytes"] / plan.GB, 1), (name, part)
    # A student above ~1 B parameters trains LoRA adapters.
    if p["student"]["params"] > 1.2e9:
        assert cfg.train.mode == "lora", name


# Parameter counts the hub publishes for the recipes' models (safetensors metadata): the
# shipped widths and counts build exactly these models.
PUBLISHED_PARAMS = {
    "mlx-community/Qwen2.5-7B-Instruct-4bit": 7_615_616_512,
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit": 8_030_261_248,
    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
    "mlx-community/gemma-2-9b-it-4bit": 9_241_705_984,
    "google/gemma-2-2b-it": 2_614_341_888,
    "mlx-community/Qwen3-8B-4bit": 8_190_735_360,
    "Qwen/Qwen3-0.6B": 596_049_920,
    "mlx-community/Phi-3-medium-4k-instruct-4bit": 13_960_238_080,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "mlx-community/Mistral-Nemo-Instruct-2407-4bit": 12_247_782_400,
    "mlx-community/Ministral-8B-Instruct-2410-4bit": 8_019_808_256,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1_711_376_384,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
}


def test_shipped_configs_are_exactly_the_recipes_models():
    from mlxdistill import hubmeta

    named = set()
    for name in HUB_RECIPES:
        cfg = load_config(os.path.join(ROOT, "configs", name))
        named |= {cfg.teacher.model, cfg.student.model}
    assert named == set(PUBLISHED_PARAMS)
    files = sorted(os.listdir(hubmeta.SHIPPED_DIR))
    assert files == sorted(m.replace("/", "--") + ".json" for m in named)
    for hub_id, params in PUBLISHED_PARAMS.items():
        with open(hubmeta.shipped_path(hub_id)) as f:
            conf = json.load(f)
        assert plan.model_shape(conf, hub_id).params == params, hub_id
        assert ("quantization" in conf) == ("4bit" in hub_id), hub_id
    assert hubmeta.shipped_path("qwen/QWEN3-0.6b") == hubmeta.shipped_path("Qwen/Qwen3-0.6B")


def test_hub_id_without_shipped_config_offline_is_one_line_error(hub_unreachable):
    cfg = load_config(os.path.join(ROOT, "configs", "qwen3-8b-to-0.6b.yaml"),
                      ["student.model=Qwen/Qwen3-1.7B"])
    with pytest.raises(plan.ModelError, match=r"^cannot read config.json of the student "
                       r"model Qwen/Qwen3-1.7B .*hub fetch failed.*local mlx_lm model folder"):
        plan.plan(cfg, metal=True)


def test_hub_config_is_preferred_to_the_shipped_copy(monkeypatch):
    """The shipped copy stands in only when the hub does not answer."""
    from mlxdistill import hubmeta

    fetched = {"model_type": "qwen3", "hidden_size": 64}
    monkeypatch.setattr(hubmeta, "fetch", lambda hub_id: fetched)
    assert plan.config_and_note("Qwen/Qwen3-0.6B", "student") == (fetched, None)


def test_grad_checkpoint_changes_only_its_model():
    """Checkpointing one student must not checkpoint every later model of its architecture
    (a process-wide class patch would also skew every memory measurement after it)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from mlxdistill import surgery

    args = llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64,
        rope_theta=10000.0))
    a, b = llama.Model(args), llama.Model(args)
    b.update(a.parameters())
    x = mx.array([[1, 2, 3, 4]])
    ref = a(x)
    surgery.grad_checkpoint(a)
    assert all(getattr(type(layer), "_checkpointed", False) for layer in a.model.layers)
    assert not any(getattr(type(layer), "_checkpointed", False) for layer in b.model.layers)
    assert type(b.model.layers[0]).__call__ is llama.TransformerBlock.__call__
    assert mx.allclose(a(x), ref).item() and mx.allclose(b(x), ref).item()
    assert set(dict(tree_flatten(a.parameters()))) == \
        set(dict(tree_flatten(b.parameters())))


# ---------------------------------------------------------------- a student still to be pruned

SHAPE = ["prune.num_hidden_layers=2", "prune.hidden_size=128", "prune.intermediate_size=320",
         "prune.num_attention_heads=2"]


def small(tmp_path) -> list[str]:
    """The embedded pair on a few short rows, student.model a folder that does not exist."""
    return ["data.seq_len=64", "data.max_rows=4", "prune.rows=2", "train.batch_size=4",
            f"cache.dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}",
            f"student.model={tmp_path / 'not-pruned-yet'}"]


def test_pruned_student_is_planned_as_the_folder_prune_writes(tmp_path):
    """With prune.* set, plan estimates from the teacher's config.json exactly what it
    estimates for the folder `mlxdistill prune` then writes, --probe included."""
    from mlxdistill import api
    from mlxdistill import prune as prune_mod

    cfg = load_config(None, small(tmp_path) + SHAPE)
    before = plan.plan(cfg)
    out = str(tmp_path / "pruned")
    rep = api.prune(cfg, out, log=lambda m: None)
    done = load_config(None, small(tmp_path) + [f"student.model={out}"])
    after = plan.plan(done)
    for key in ("training", "teacher_pass", "cache", "vocab_size", "cross_tokenizer"):
        assert before[key] == after[key], key
    s, a = before["student"], after["student"]
    assert s["params"] == a["params"] == rep["params_after"]
    assert (s["weight_bytes"], s["trainable_params"]) == (a["weight_bytes"], a["trainable_params"])
    assert s["pruned"] == {"shape": rep["shape_after"], "target_params": None}
    assert s["model"] is None and a["pruned"] is None
    res = CliRunner().invoke(main, ["plan", *small(tmp_path), *SHAPE])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("student:"))
    shape = prune_mod._shape_text(rep["shape_after"])  # "2 × 128, 2 heads (2 kv) of 64, ..."
    assert f"pruned from {cfg.teacher.model} by prune.*: {shape} (llama, 0.90 M params" in line
    assert "; run `mlxdistill prune` first); full: 0.90 M trainable" in line
    # --probe builds the student from its config at random weights: the step's memory is
    # the written folder's
    p = plan.plan(cfg, probe=True)
    assert p["training"]["seconds"] > 0 and p["teacher_pass"]["seconds"] > 0
    measured = p["training"]["measured_peak_bytes"]
    assert_close(p["training"]["mlx_bytes"], measured, "pruned student")
    assert abs(probe.probe_training(done)["peak_bytes"] / measured - 1) < 0.02


def test_pruned_student_by_parameter_budget(tmp_path):
    """prune.target_params: plan names the shape and count that prune then cuts."""
    from mlxdistill import api

    budget = ["prune.target_params=1300000"]
    p = plan.plan(load_config(None, small(tmp_path) + budget))
    rep = api.prune(load_config(None, small(tmp_path) + budget), str(tmp_path / "pruned"),
                    log=lambda m: None)
    s = p["student"]
    assert s["pruned"] == {"shape": rep["shape_after"], "target_params": 1300000}
    assert s["params"] == rep["params_after"] <= 1300000
    res = CliRunner().invoke(main, ["plan", *small(tmp_path), *budget])
    assert res.exit_code == 0, res.output
    assert " by prune.target_params=1300000: " in res.output


@pytest.mark.parametrize("setting,needles", [
    ("prune.hidden_size=512", ["prune.hidden_size=512", "larger than the teacher's 384"]),
    ("prune.num_key_value_heads=4", ["prune.num_key_value_heads=4", "does not divide"]),
    ("prune.target_params=1000", ["prune.target_params=1000", "below the smallest shape"]),
    # prune.* unset: the student is student.model, which must exist, as before
    ("prune.target_params=null", ["student model folder", "not-pruned-yet", "not found"]),
])
def test_pruned_shape_refused_as_prune_refuses_it(tmp_path, setting, needles):
    from test_cli import assert_one_line_error

    assert_one_line_error(CliRunner().invoke(main, ["plan", *small(tmp_path), setting]),
                          *needles)
