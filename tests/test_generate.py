"""`mlxdistill generate`: deterministic, resumable, verified teacher-written data."""

import json
import os
import sys

import pytest
from click.testing import CliRunner

from mlxdistill import generate as gen_mod
from mlxdistill.cli import main
from mlxdistill.config import ConfigError, load_config
from mlxdistill.data import DataError, pack


def prompts_file(tmp_path, n=5):
    p = tmp_path / "prompts.jsonl"
    recs = [{"prompt": "the king", "answer": "x"} for _ in range(n - 1)]
    recs.append({"messages": [{"role": "user", "content": "the queen"}]})
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(p)


# The tiny models have no chat template, and the chat prompt needs one: data.chat_template.
TEMPLATE = ("{% if tools %}sword {% endif %}{% for m in messages %}{% if m['role'] == 'user' %}"
            "lord {% else %}lady {% endif %}{{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}lady {% endif %}")


def cfg_for(tiny, tmp_path, out="gen.jsonl", **extra):
    ov = {"teacher.model": tiny["teacher"], "generate.prompts": prompts_file(tmp_path),
          "generate.out": str(tmp_path / out), "generate.max_tokens": 6,
          "generate.batch_size": 2, "generate.n": 2, "generate.temperature": 1.0,
          "data.chat_template": json.dumps(TEMPLATE), **extra}
    return load_config(None, [f"{k}={v}" for k, v in ov.items() if v is not None])


QUIET = dict(quiet=True, log=lambda m: None)


def test_deterministic_and_mlx_lm_formats(tiny, tmp_path):
    a = gen_mod.generate(cfg_for(tiny, tmp_path, "a.jsonl"), **QUIET)
    gen_mod.generate(cfg_for(tiny, tmp_path, "b.jsonl"), **QUIET)
    ta, tb = (tmp_path / "a.jsonl").read_text(), (tmp_path / "b.jsonl").read_text()
    assert ta == tb and a["lines"] == 10 and a["pass_rate"] == 1.0
    recs = [json.loads(x) for x in ta.splitlines()]
    assert "completion" in recs[0] and recs[-1]["messages"][-1]["role"] == "assistant"
    assert not (tmp_path / "a.jsonl.partial").exists()
    # feeds the data pipeline: the prompt is masked, the completion trained
    from mlxdistill import models

    _, tok = models.load_meta_role(cfg_for(tiny, tmp_path, "a.jsonl"), "teacher")
    packed = pack(str(tmp_path / "a.jsonl"), tok, 64)
    assert packed.loss_mask.sum() > 0 and packed.loss_mask[0, 0] == 0


def test_prompts_are_rendered_as_training_renders_them(tiny, tmp_path):
    """What the teacher continues is the untrained prompt part of the record it writes, for
    chat and prompt records alike (the template from data.chat_template)."""
    from mlxdistill import data as data_mod
    from mlxdistill import models

    _, tok = models.load_meta_role(cfg_for(tiny, tmp_path), "teacher")
    user = [{"role": "user", "content": "the queen"}]
    tools = [{"type": "function", "function": {"name": "fly"}}]
    for rec in ({"messages": user}, {"prompt": "the queen"}, {"prompt": "the queen",
                                                             "tools": tools}):
        written = gen_mod.output_record(rec, "the king", None)
        head, _ = data_mod.record_segments(tok, written, True)
        assert gen_mod.prompt_tokens(tok, rec, None) == head[0]
    assert tok.decode(gen_mod.prompt_tokens(tok, {"prompt": "the queen"}, None)) == \
        "lord the queen . lady"
    assert tok.decode(head[0]).startswith("sword ")  # the tools went into the record too


def test_chat_prompt_without_a_template_is_refused_before_generating(tiny, tmp_path):
    cfg = cfg_for(tiny, tmp_path, **{"data.chat_template": None})
    with pytest.raises(DataError, match="prompts.jsonl: record 5: a chat record .*needs a "
                       "chat template.*data.chat_template"):
        gen_mod.generate(cfg, **QUIET)


def test_resume_after_kill_never_duplicates(tiny, tmp_path, monkeypatch):
    gen_mod.generate(cfg_for(tiny, tmp_path, "full.jsonl"), **QUIET)
    real = gen_mod._atomic_json
    calls = {"n": 0}

    def dying(path, obj):
        calls["n"] += 1
        if calls["n"] == 2:  # after the second batch's lines are written, before its record
            with open(str(tmp_path / "cut.jsonl.partial"), "ab") as f:
                f.write(b'{"prompt": "half a li')  # and a torn line, as after a kill
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(gen_mod, "_atomic_json", dying)
    cfg = cfg_for(tiny, tmp_path, "cut.jsonl")
    with pytest.raises(KeyboardInterrupt):
        gen_mod.generate(cfg, **QUIET)
    monkeypatch.setattr(gen_mod, "_atomic_json", real)
    assert not (tmp_path / "cut.jsonl").exists()
    logs = []
    gen_mod.generate(cfg, quiet=True, log=logs.append)
    assert any("resuming" in m and "2/5" in m for m in logs)
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_verifier_keeps_and_rejects(tiny, tmp_path, monkeypatch):
    mod = tmp_path / "myverif.py"
    mod.write_text("def keep_chat(rec, text):\n    return 'messages' in rec\n"
                   "def boom(rec, text):\n    raise RuntimeError('bad')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("myverif", None)
    m = gen_mod.generate(cfg_for(tiny, tmp_path, "v.jsonl",
                                 **{"generate.verifier": "myverif:keep_chat"}), **QUIET)
    assert m["kept"] == 2 and m["rejected"] == 8 and m["pass_rate"] == 0.2
    lines = (tmp_path / "v.jsonl").read_text().splitlines()
    assert all("messages" in json.loads(x) for x in lines)
    m = gen_mod.generate(cfg_for(tiny, tmp_path, "boom.jsonl",
                                 **{"generate.verifier": "myverif:boom"}), **QUIET)
    assert m["kept"] == 0 and m["verifier_errors"] == 10
    exact = gen_mod.load_verifier("exact")
    assert exact({"answer": " 42 "}, "42") and not exact({"answer": "4"}, "42")
    rx = gen_mod.load_verifier(r"regex:answer is (\d+)")
    assert rx({"answer": "7"}, "so the answer is 3, no, the answer is 7")
    assert not rx({"answer": "7"}, "no number here")


def test_bad_generate_input(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        gen_mod.read_prompts(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        gen_mod.read_prompts(str(empty))
    with pytest.raises(ConfigError, match="generate.max_tokens=0"):
        load_config(None, ["generate.max_tokens=0"])
    with pytest.raises(ConfigError, match="module:function"):
        gen_mod.load_verifier("nonsense")
    res = CliRunner().invoke(main, ["generate", f"generate.prompts={bad}",
                                    f"teacher.model={tiny['teacher']}"])
    assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0
    assert os.path.exists(bad)


def test_reasoning_template_splits_final_answer():
    think = gen_mod.reasoning_parts("think")
    assert think == ("<think>\n", "\n</think>\n", "")
    assert gen_mod.split_answer(think, "<think>\n3 and 4\n</think>\n7") == ("3 and 4", "7")
    assert gen_mod.split_answer(think, "still thinking") == ("still thinking", "")
    task = gen_mod.reasoning_parts("{reasoning}\nAnswer: {answer}\n")
    assert gen_mod.split_answer(task, "2+3=5 c0\nAnswer: 5\n9+9=18") == ("2+3=5 c0", "5")
    assert gen_mod.split_answer(None, " 42 ") == (None, "42")
    for bad in ("{answer}{reasoning}", "{reasoning}{answer}", "no fields"):
        with pytest.raises(ConfigError, match="generate.reasoning"):
            load_config(None, [f"generate.reasoning='{bad}'"])


def test_reasoning_generation_keeps_both_and_verifies_answer(tiny, tmp_path, monkeypatch):
    mod = tmp_path / "seeverif.py"
    mod.write_text("SEEN = []\ndef see(rec, text):\n    SEEN.append(text)\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("seeverif", None)
    template = "the {reasoning} crown {answer} ."
    cfg = cfg_for(tiny, tmp_path, "r.jsonl", **{"generate.reasoning": template,
                                               "generate.verifier": "seeverif:see",
                                               "generate.max_tokens": 12})
    m = gen_mod.generate(cfg, **QUIET)
    assert m["settings"]["reasoning"] == template and m["kept"] == 10
    recs = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    parts = gen_mod.reasoning_parts(template)
    import seeverif

    for rec, seen in zip(recs, seeverif.SEEN):
        text = rec["completion"] if "completion" in rec else rec["messages"][-1]["content"]
        assert text.startswith("the ")  # the teacher was cued to reason first
        assert (rec["reasoning"], rec["final_answer"]) == gen_mod.split_answer(parts, text)
        assert seen == rec["final_answer"]  # the verifier judged the answer, not the reasoning
    assert recs[0]["answer"] == "x" and "answer" not in recs[-1]
    # the teacher's prompt ends with the template's opener
    from mlx_lm.utils import load_tokenizer
    from pathlib import Path

    tok = load_tokenizer(Path(tiny["teacher"]))
    plain = gen_mod.prompt_tokens(tok, {"prompt": "the king"}, None)
    cued = gen_mod.prompt_tokens(tok, {"prompt": "the king"}, None, "the ")
    assert cued[:len(plain)] == plain and len(cued) > len(plain)


def test_edited_prompts_are_not_taken_as_done(tiny, tmp_path):
    cfg = cfg_for(tiny, tmp_path, "e.jsonl")
    assert gen_mod.generate(cfg, **QUIET)["prompts_total"] == 5
    with open(cfg.generate.prompts, "a") as f:
        f.write(json.dumps({"prompt": "the sea"}) + "\n")
    m = gen_mod.generate(cfg, **QUIET)
    assert m["prompts_total"] == 6 and m["lines"] == 12
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 12


def test_another_chat_template_is_not_taken_as_done(tiny, tmp_path):
    """The template decides what the teacher reads: a finished file written with another
    is generated again."""
    first = gen_mod.generate(cfg_for(tiny, tmp_path, "t.jsonl"), **QUIET)
    other = cfg_for(tiny, tmp_path, "t.jsonl", **{"data.chat_template": json.dumps(
        TEMPLATE.replace("lord", "king"))})
    logs = []
    again = gen_mod.generate(other, quiet=True, log=logs.append)
    assert not any("nothing to do" in m for m in logs)
    sha = [m["settings"]["chat_template_sha256"] for m in (first, again)]
    assert sha[0] != sha[1] and None not in sha


def test_bad_input_reported_in_one_line(tiny, tmp_path, monkeypatch):
    noprompt = tmp_path / "noprompt.jsonl"
    noprompt.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"noprompt.jsonl:3: expected a 'prompt'"):
        gen_mod.read_prompts(str(noprompt))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for ov, needle in [([f"generate.prompts={empty}"], "is empty"),
                       (["generate.max_tokens=-3"], "generate.max_tokens=-3"),
                       (["generate.reasoning='{answer} then {reasoning}'"], "with {reasoning}")]:
        res = CliRunner().invoke(main, ["generate", f"teacher.model={tiny['teacher']}", *ov])
        assert res.exit_code == 2 and needle in res.stderr, (ov, res.stderr)
        assert res.stderr.strip().count("\n") == 0
    (tmp_path / "raiser.py").write_text("def check(rec, text):\n    raise KeyError(text)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("raiser", None)
    logs = []
    m = gen_mod.generate(cfg_for(tiny, tmp_path, "raise.jsonl",
                                 **{"generate.verifier": "raiser:check"}),
                         quiet=True, log=logs.append)
    assert m["rejected"] == m["verifier_errors"] == 10 and m["pass_rate"] == 0.0
    assert "the verifier raised on 10 (counted as rejected)" in logs[-1]
    assert (tmp_path / "raise.jsonl").read_text() == ""


def test_retrained_teacher_is_not_taken_as_done(tiny, tmp_path):
    """A teacher retrained in place keeps its config and file sizes; its answers are new."""
    import shutil

    import mlx.core as mx

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    cfg = cfg_for(tiny, tmp_path, "t.jsonl", **{"teacher.model": str(teacher)})
    first = gen_mod.generate(cfg, **QUIET)
    w = mx.load(str(teacher / "model.safetensors"))
    mx.save_safetensors(str(teacher / "model.safetensors"), {k: v * 1.5 for k, v in w.items()})
    logs = []
    second = gen_mod.generate(cfg, quiet=True, log=logs.append)
    assert not any("nothing to do" in m for m in logs)
    assert (first["settings"]["teacher_weights_sha256"]
            != second["settings"]["teacher_weights_sha256"])
