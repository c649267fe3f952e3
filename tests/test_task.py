"""The embedded specialist task: worked solutions, held-out splits, task accuracy in eval."""

import json
import os
import sys


from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_task  # noqa: E402

from mlxdistill import generate as gen_mod  # noqa: E402


def test_worked_solutions_are_right():
    parts = gen_mod.reasoning_parts(make_task.TEMPLATE)
    for (a, op, b) in [(999, "+", 1), (1000, "-", 1), (4821, "+", 397), (52, "-", 48)]:
        rec = make_task.record(a, op, b)
        reasoning, final = gen_mod.split_answer(parts, rec["completion"])
        assert final == rec["answer"] == str(eval(f"{a}{op}{b}"))
        assert reasoning.count("\n") + 1 == max(len(str(a)), len(str(b)))
    assert make_task.record(999, "+", 1)["completion"].startswith("9+1+0=10 c1\n9+0+1=10 c1")
    assert "0+10-1-0=9 b1" in make_task.record(1000, "-", 1)["completion"]


def test_padded_problems_work_every_column():
    rec = make_task.record(52, "-", 8, pad=4)
    assert rec["prompt"] == "0052-0008=\n" and rec["answer"] == "44"
    assert rec["completion"].count("\n") == 5  # four columns and the answer line
    assert make_task.record(52, "-", 8)["prompt"] == "52-8=\n"
    for a, op, b in [(52, "-", 8), (4821, "+", 397), (1000, "-", 1), (5, "+", 5)]:
        rec = make_task.record(a, op, b, pad=4, fixed=True)
        lines = rec["completion"].split("\nAnswer:")[0].split("\n")
        assert len(lines) == 4 and len({len(x) for x in lines}) == 1, lines
        assert rec["answer"] == str(eval(f"{a}{op}{b}"))
    import task_errors

    rec = make_task.record(941, "-", 362, pad=4, fixed=True)
    assert task_errors.first_error(rec["completion"], rec["completion"]) is None
    bad = rec["completion"].replace("4+10-6-1", "1+10-6-1")
    assert task_errors.first_error(bad, rec["completion"]) == "operand digit"


def test_index_hint_format():
    rec = make_task.record(941, "-", 362, hints=4)
    assert rec["prompt"] == "k0h9t4u1-K0H3T6U2=\n" and rec["answer"] == "579"
    assert rec["completion"] == ("u1-U2-0=9 b1\nt4-T6-1=7 b1\nh9-H3-1=5 b0\nk0-K0-0=0 b0\n"
                                 "Answer: 579\n")
    assert make_task.record(9999, "+", 1, hints=4)["completion"].endswith(
        "k9+K0+1=0 c1\nAnswer: 10000\n")
    for a, op, b in [(52, "-", 8), (4821, "+", 397), (1000, "-", 1), (5, "+", 5), (10, "-", 10)]:
        rec = make_task.record(a, op, b, hints=4)
        lines = rec["completion"].split("\nAnswer:")[0].split("\n")
        assert len(lines) == 4 and len({len(x) for x in lines}) == 1, lines
        assert rec["answer"] == str(eval(f"{a}{op}{b}"))
    import task_errors

    rec = make_task.record(941, "-", 362, hints=4)
    assert task_errors.first_error(rec["completion"], rec["completion"]) is None
    for wrong, kind in [("t1-T6-1=7", "operand digit"), ("t4-T6-0=7", "carry in"),
                        ("t4-T6-1=8", "arithmetic")]:
        got = rec["completion"].replace("t4-T6-1=7", wrong)
        assert task_errors.first_error(got, rec["completion"]) == kind


def test_task_errors_names_the_first_wrong_line():
    import task_errors

    gold = make_task.record(267, "-", 68)["completion"]
    right = gold.split("\n")
    assert task_errors.first_error(gold, gold) is None
    cases = {"operand digit": [right[0], right[1], "6-0-1=5 b0"],
             "carry in": [right[0], right[1], "2-0-0=2 b0"],
             "arithmetic": ["7+10-8-0=8 b1"],
             "columns": right[:3] + ["3-0-0=3 b0"],
             "format": ["7 minus 8"]}
    for kind, lines in cases.items():
        assert task_errors.first_error("\n".join(lines) + "\nAnswer: 1\n", gold) == kind, kind
    assert task_errors.first_error(right[0] + "\nAnswer: 9\n", gold) == "columns"
    assert task_errors.first_error(gold.replace("Answer: 199", "Answer: 19"), gold) == \
        "answer line"


def test_splits_held_out_and_reproducible():
    splits = make_task.make(5, {"train": 400, "valid": 50, "test": 50}, 3)
    problems = [r["prompt"] for recs in splits.values() for r in recs]
    assert len(set(problems)) == len(problems) == 500
    assert make_task.make(5, {"train": 400, "valid": 50, "test": 50}, 3) == splits
    plain = make_task.make(5, {"train": 400, "valid": 50, "test": 50}, 3, "plain")
    assert [r["answer"] for r in plain["test"]] == [r["answer"] for r in splits["test"]]
    # the shipped files are the seeded generator's output, and disjoint
    shipped = {}
    for split in ("train", "valid", "test"):
        with open(os.path.join(ROOT, "data", "task", f"{split}.jsonl")) as f:
            shipped[split] = [json.loads(x) for x in f]
    sizes = {k: len(v) for k, v in shipped.items()}
    assert make_task.make(0, sizes, 4) == shipped
    train = {r["prompt"] for r in shipped["train"]}
    assert not train & {r["prompt"] for r in shipped["test"] + shipped["valid"]}
    with open(os.path.join(ROOT, "data", "task", "prompts.jsonl")) as f:
        prompts = [json.loads(x) for x in f]
    assert {p["prompt"] for p in prompts} == train and "completion" not in prompts[0]
    total = sum(os.path.getsize(os.path.join(ROOT, "data", "task", n))
                for n in os.listdir(os.path.join(ROOT, "data", "task")))
    assert total < 3e6


# ---------------------------------------------------------------- task accuracy in eval

def test_score_and_retention_math(monkeypatch):
    from mlxdistill import task
    from mlxdistill.config import load_config

    g = load_config(None, ["generate.reasoning=think"]).generate
    prompts = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    right = [f"<think>\n{i}+1\n</think>\n{i + 1}" for i in range(4)]
    texts = right[:3] + ["<think>\nno end of thought 4"]  # an unclosed reasoning has no answer
    assert task.score(prompts, texts, g) == {"accuracy": 0.75, "correct": 3,
                                             "verifier_errors": 0}
    answers = {"teacher": right, "student_before": ["x"] * 4, "student_after": right[:3] + ["5"]}
    monkeypatch.setattr(task, "greedy_generations", lambda m, tok, p, g: {
        "texts": answers[m][:len(p)], "prompt_ids": [], "ids": []})
    monkeypatch.setattr(task, "task_prompts",
                        lambda path, limit, max_records=None: prompts[:limit])
    res = task.task_accuracy({k: k for k in answers}, None, "unused", g)
    assert res["teacher"]["accuracy"] == 1.0 and res["student_after"]["correct"] == 3
    assert res["retention"] == {"student_before": 0.0, "student_after": 75.0}
    answers["teacher"] = ["wrong"] * 4  # a teacher that scores 0 leaves nothing to retain
    assert task.task_accuracy({k: k for k in answers}, None, "u", g)["retention"] == {
        "student_before": None, "student_after": None}


def test_raising_verifier_counts_wrong(tmp_path, monkeypatch):
    from mlxdistill import task
    from mlxdistill.config import load_config

    (tmp_path / "badverif.py").write_text("def check(rec, text):\n    raise ValueError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = load_config(None, ["generate.verifier=badverif:check"]).generate
    assert task.score([{"prompt": "a", "answer": "1"}], ["1"], g) == {
        "accuracy": 0.0, "correct": 0, "verifier_errors": 1}


def test_eval_reports_task_accuracy(tiny, tmp_path):
    """End to end on the tiny pair: the test records' answers are set so that the teacher's
    greedy answer is right on exactly half of them; eval must find 0.5."""
    from conftest import tiny_overrides

    from mlxdistill import models, task
    from mlxdistill.config import load_config
    from mlxdistill.evaluate import format_table
    from mlxdistill.api import train

    prompts = [{"prompt": p} for p in ("the king", "my lady", "the sea", "our ghost",
                                       "thy crown", "the storm")]
    ov = {"generate.max_tokens": 5, "generate.eval_prompts": 6}
    g = load_config(None, [f"{k}={v}" for k, v in ov.items()]).generate
    teacher, tok, _ = models.load(tiny["teacher"], "teacher")
    said = task.greedy_answers(teacher, tok, prompts, g)
    test = tmp_path / "task_test.jsonl"
    with open(test, "w") as f:
        for i, (p, text) in enumerate(zip(prompts, said)):
            ans = text.strip() if i % 2 == 0 else "not " + text.strip()
            f.write(json.dumps({**p, "completion": " king .", "answer": ans}) + "\n")
        f.write(json.dumps({"prompt": "no reference", "completion": " sea ."}) + "\n")
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **ov, **{
        "data.test": str(test), "teacher.mode": "online", "train.iters": 2}))
    res = train(cfg, quiet=True, log=lambda m: None)
    t = res["task"]
    assert t["prompts"] == 6 and t["teacher"] == {"accuracy": 0.5, "correct": 3,
                                                  "verifier_errors": 0}
    for name in ("student_before", "student_after"):
        assert t["retention"][name] == round(100 * t[name]["accuracy"] / 0.5, 1)
    assert "task accuracy (6 prompts)" in format_table(res)
    saved = json.load(open(os.path.join(cfg.run.dir, "eval.json")))
    assert saved["task"] == t


# ---------------------------------------------------------------- the specialist build

def test_specialist_sizes_and_char_tokenizer(tmp_path):
    import build_specialist as bs
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.utils import load_tokenizer
    from pathlib import Path

    data = tmp_path / "task"
    data.mkdir()
    for split, recs in make_task.make(1, {"train": 40, "valid": 5, "test": 5}, 4).items():
        make_task.write_jsonl(str(data / f"{split}.jsonl"), recs)
    tok_dir = bs.build_tokenizer(str(data), str(tmp_path / "work"))
    tok = load_tokenizer(Path(tok_dir))  # as mlx_lm (and MLX Swift) read tokenizer.json
    text = "4821+397=\n1+7+0=8 c0\nAnswer: 5218\n"
    assert len(tok.encode(text, add_special_tokens=False)) == len(text)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # mlx_lm's completions dataset joins the turns through the chat template: bare text
    turns = [{"role": "user", "content": "12+3=\n"}, {"role": "assistant", "content": "A"}]
    assert tok.decode(tok.apply_chat_template(turns)) == "12+3=\nA"
    vocab = len(json.load(open(os.path.join(tok_dir, "tokenizer.json")))["model"]["vocab"])
    params = {}
    for name, spec in bs.MODELS.items():
        model = llama.Model(llama.ModelArgs.from_dict(bs.model_args(spec, vocab)))
        params[name] = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert params["teacher"] * 2 <= bs.MAX_TEACHER_BYTES  # float16
    assert params["teacher"] >= 8 * params["student"]


def test_specialist_training_resumes_exactly(tmp_path, monkeypatch):
    import build_specialist as bs
    import mlx.core as mx
    import numpy as np

    monkeypatch.setattr(bs, "BATCH", 4)
    monkeypatch.setattr(bs, "log", lambda m: None)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (16, bs.SEQ)).astype(np.int32)
    train = (x, np.roll(x, -1, 1), (rng.random((16, bs.SEQ)) > 0.5).astype(np.uint8))
    spec = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                num_attention_heads=2, steps=6, lr=1e-2, warmup=2, seed=1)
    whole = bs.train_model("m", spec, 20, train, str(tmp_path / "a"), 3)
    bs.train_model("m", {**spec, "steps": 3}, 20, train, str(tmp_path / "b"), 3)
    resumed = bs.train_model("m", spec, 20, train, str(tmp_path / "b"), 3)
    from mlx.utils import tree_flatten

    fresh = bs.train_model("m", {**spec, "steps": 0}, 20, train, str(tmp_path / "c"), 3)
    w, r, f = (dict(tree_flatten(m.parameters())) for m in (whole, resumed, fresh))
    assert all(mx.array_equal(w[k], r[k]) for k in w)
    assert not all(mx.array_equal(w[k], f[k]) for k in w)  # it did train


def test_answers_only_baseline_reads_like_the_chains(tmp_path):
    import specialist

    gold = tmp_path / "gold.jsonl"
    make_task.write_jsonl(str(gold), make_task.make(2, {"train": 5}, 3)["train"])
    out = specialist.answers_only(str(gold), str(tmp_path / "a" / "answers.jsonl"))
    parts = gen_mod.reasoning_parts(make_task.TEMPLATE)
    for line in open(out):
        rec = json.loads(line)
        assert gen_mod.split_answer(parts, rec["completion"]) == ("", rec["answer"])


def test_specialist_benchmark_plumbing(tmp_path, monkeypatch):
    """scripts/specialist.py on a tiny random char-level pair: every variant trains and is
    scored, the table is written, and a rerun skips the finished variants."""
    import build_specialist as bs
    import specialist
    from mlx_lm.models import llama

    data = tmp_path / "task"
    data.mkdir()
    splits = make_task.make(3, {"train": 24, "valid": 4, "test": 4}, 2)
    for split, recs in splits.items():
        make_task.write_jsonl(str(data / f"{split}.jsonl"), recs)
    make_task.write_jsonl(str(data / "prompts.jsonl"),
                          [{"prompt": r["prompt"], "answer": r["answer"]} for r in splits["train"]])
    tok_dir = bs.build_tokenizer(str(data), str(tmp_path / "work"))
    vocab = len(json.load(open(os.path.join(tok_dir, "tokenizer.json")))["model"]["vocab"])
    for name, dim in (("teacher", 32), ("student", 16)):
        spec = dict(hidden_size=dim, num_hidden_layers=1, intermediate_size=2 * dim,
                    num_attention_heads=2)
        bs.export(name, spec, vocab, llama.Model(llama.ModelArgs.from_dict(
            bs.model_args(spec, vocab))), tok_dir, str(tmp_path / "w"))
    ov = [f"teacher.model={tmp_path / 'w' / 'teacher'}",
          f"student.model={tmp_path / 'w' / 'student'}",
          f"data.valid={data / 'valid.jsonl'}", f"data.test={data / 'test.jsonl'}",
          f"generate.prompts={data / 'prompts.jsonl'}", "generate.verifier=null",
          "generate.eval_prompts=4", "generate.max_tokens=12", "train.iters=2",
          "train.batch_size=2", "train.warmup=1", "train.save_every=2", "train.eval_every=2",
          "train.eval_rows=2", "data.seq_len=64"]
    argv = ["specialist.py", "--gold", str(data / "train.jsonl"), "--runs",
            str(tmp_path / "runs"), "--results", str(tmp_path / "res"), *ov]
    monkeypatch.setattr(sys, "argv", argv)
    specialist.main()
    res = json.load(open(tmp_path / "res" / "specialist.json"))
    assert list(res["variants"]) == list(specialist.VARIANTS)
    assert res["generate"]["kept"] == 24
    for v in res["variants"].values():
        assert v["task"]["prompts"] == 4 and 0 <= v["task"]["student_after"]["accuracy"] <= 1
    table = open(tmp_path / "res" / "specialist.md").read()
    assert table.count("\n| ") == 2 + len(specialist.VARIANTS)  # teacher, before, variants
    trained = []
    monkeypatch.setattr(specialist.api, "train", lambda cfg, **kw: trained.append(cfg))
    specialist.main()
    assert trained == []  # finished variants are not run again


def test_shipped_specialist_pair():
    """weights/specialist as committed: within its budget, the student over 8x smaller, and
    the teacher solving held-out problems of data/task/test.jsonl greedily."""
    import build_specialist as bs
    from mlx.utils import tree_flatten

    from mlxdistill import models, task
    from mlxdistill.config import load_config

    w = os.path.join(ROOT, "weights", "specialist")
    assert os.path.getsize(os.path.join(w, "teacher", "model.safetensors")) <= bs.MAX_TEACHER_BYTES
    loaded = {n: models.load(os.path.join(w, n), n) for n in ("teacher", "student")}
    params = {n: sum(v.size for _, v in tree_flatten(m.parameters()))
              for n, (m, _, _) in loaded.items()}
    assert params["teacher"] >= 8 * params["student"]
    g = load_config(os.path.join(ROOT, "configs", "specialist.yaml")).generate
    prompts = task.task_prompts(os.path.join(ROOT, "data", "task", "test.jsonl"), 32)
    teacher, tok, _ = loaded["teacher"]
    assert task.score(prompts, task.greedy_answers(teacher, tok, prompts, g), g)["accuracy"] >= 0.8
