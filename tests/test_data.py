import json

import numpy as np
import pytest
from conftest import make_tokenizer

from mlxdistill import data as data_mod
from mlxdistill import files


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(str(d))
    return AutoTokenizer.from_pretrained(str(d))


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_text_packs_all_tokens_with_eos(tok, tmp_path):
    p = write(tmp_path / "t.jsonl", [{"text": "the king"}, {"text": "the queen ."}])
    packed = data_mod.pack(p, tok, seq_len=4)
    ids = packed.input_ids.reshape(-1)
    the, king, queen, dot, eos = (tok.convert_tokens_to_ids(t) for t in
                                  ["the", "king", "queen", ".", "</s>"])
    assert ids[:7].tolist() == [the, king, eos, the, queen, dot, eos]
    assert packed.rows == 2
    # mask[t] = the next token exists and is trained: all but the last real position
    assert packed.loss_mask.reshape(-1).tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    labels = data_mod.hard_targets(packed.input_ids, packed.next_ids)
    assert labels[0].tolist() == [king, eos, the, queen]
    assert labels[1, -1] == -1


def test_prompt_completion_masks_prompt(tok, tmp_path):
    p = write(tmp_path / "pc.jsonl", [{"prompt": "the king", "completion": "sleep ."}])
    packed = data_mod.pack(p, tok, seq_len=8)
    # tokens: the king sleep . </s> ; trained next tokens: sleep . </s>
    assert packed.loss_mask[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    unmasked = data_mod.pack(p, tok, seq_len=8, mask_prompt=False)
    assert unmasked.loss_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_completions_never_straddle_rows(tok, tmp_path):
    """Rows do not see each other: a completion packed after its prompt's row ended would be
    trained with no prompt. auto keeps such records whole, padding (untrained) the row."""
    recs = [{"prompt": "the king", "completion": "sleep ."}] * 3  # 5 tokens each with </s>
    p = write(tmp_path / "pc.jsonl", recs)
    the, eos = tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("</s>")
    packed = data_mod.pack(p, tok, seq_len=8)
    assert packed.rows == 3 and all(r[0] == the for r in packed.input_ids.tolist())
    assert packed.input_ids[0, 5:].tolist() == [eos] * 3  # the padding
    assert packed.loss_mask[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert (packed.loss_mask.sum(1) == 3).all()
    stream = data_mod.pack(p, tok, seq_len=8, packing="stream")
    assert stream.rows == 2 and stream.input_ids[1, 0] != the  # the second record split
    # text runs on under auto; "whole" keeps text records in one row too
    t = write(tmp_path / "t.jsonl", [{"text": "the king sleep ."}] * 3)
    assert data_mod.pack(t, tok, seq_len=8).rows == 2
    whole = data_mod.pack(t, tok, seq_len=8, packing="whole")
    assert whole.rows == 3 and whole.loss_mask.sum() == 3 * 4
    # a record longer than a row is still split (long_lines), padding nothing
    assert data_mod.pack(p, tok, seq_len=4).loss_mask.sum() == 9


# Role markers and the generation prompt are words of the test vocabulary, so the rendering
# is visible in the ids; tools and the BOS token take part as in real templates.
TEMPLATE = ("{{ bos_token }} {% if tools %}sword {% endif %}{% for m in messages %}"
            "{% if m['role'] == 'system' %}king {% elif m['role'] == 'user' %}lord "
            "{% else %}lady {% endif %}{{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}lady {% endif %}")
CHAT = {"messages": [{"role": "user", "content": "the king"},
                     {"role": "assistant", "content": "sleep"}]}
RECORDS = [
    CHAT,
    {"messages": [{"role": "system", "content": "the night"},
                  {"role": "user", "content": "the king"},
                  {"role": "assistant", "content": "sleep and dream"},
                  {"role": "user", "content": "speak"},
                  {"role": "assistant", "content": "my lord weep"}]},
    {"messages": CHAT["messages"] + [{"role": "user", "content": "speak"}]},  # user last
    {"messages": CHAT["messages"], "tools": [{"type": "function",
                                              "function": {"name": "fly"}}]},
    {"prompt": "the king", "completion": "sleep ."},
]


def templated(path, template=TEMPLATE):
    """mlx_lm's tokenizer wrapper over the test tokenizer, `template` in its config."""
    from pathlib import Path

    from mlx_lm.utils import load_tokenizer

    make_tokenizer(str(path))
    cfg_path = path / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["chat_template"] = template
    cfg_path.write_text(json.dumps(tc))
    return load_tokenizer(Path(path))


@pytest.fixture(scope="module")
def ttok(tmp_path_factory):
    return templated(tmp_path_factory.mktemp("ttok"))


def mlx_lm_tokens_and_mask(tok, rec, mask_prompt):
    """What mlx_lm.lora trains on for `rec`: its ids, and per position whether the position
    is in the loss (tuner.trainer.default_loss: step t+1 between offset and length)."""
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import create_dataset

    ds = create_dataset([rec], tok, SimpleNamespace(mask_prompt=mask_prompt))
    tokens, offset = ds.process(rec)
    steps = np.arange(1, len(tokens) + 1)
    return list(tokens), ((steps >= offset) & (steps <= len(tokens))).astype(np.uint8)


@pytest.mark.parametrize("mask_prompt", [True, False])
@pytest.mark.parametrize("i", range(len(RECORDS)))
def test_template_records_are_exactly_mlx_lms(ttok, tmp_path, i, mask_prompt):
    """Chat and prompt/completion records with a template: mlx_lm's ids, and mlx_lm's
    trained positions (the position after the last token predicts the EOS packing adds,
    where mlx_lm's predicts its padding)."""
    rec = RECORDS[i]
    tokens, want = mlx_lm_tokens_and_mask(ttok, rec, mask_prompt)
    packed = data_mod.pack(write(tmp_path / "r.jsonl", [rec]), ttok, 64, mask_prompt)
    n = len(tokens)
    assert packed.input_ids[0, :n].tolist() == tokens
    assert packed.input_ids[0, n] == ttok.eos_token_id
    assert packed.loss_mask[0, :n].tolist() == want.tolist()
    if mask_prompt and i == 1:  # multi-turn: only the last assistant turn (and its end)
        assert sum(want) == len(ttok.encode("my lord weep .", add_special_tokens=False)) + 1


def test_chat_records_need_a_template(tok, tmp_path):
    p = write(tmp_path / "chat.jsonl", [{"text": "the king"}, CHAT])
    with pytest.raises(data_mod.DataError, match="chat.jsonl: record 2: .*needs a chat "
                       "template.*data.chat_template"):
        data_mod.pack(p, tok, seq_len=16)


def test_one_message_chat_has_no_prompt_to_mask(ttok, tmp_path):
    p = write(tmp_path / "chat.jsonl", [{"messages": CHAT["messages"][:1]}])
    with pytest.raises(data_mod.DataError, match="record 1: a chat record with one message "
                       "has no prompt to mask"):
        data_mod.pack(p, ttok, seq_len=16)
    assert data_mod.pack(p, ttok, seq_len=16, mask_prompt=False).loss_mask.sum() > 0


def test_prompt_completion_without_template_is_text(tok, tmp_path):
    """No template: the prompt's tokens then the completion's, no special tokens (the
    shipped specialist's records and tokenizer are packed this way byte for byte)."""
    segs = data_mod.record_segments(tok, {"prompt": "the king", "completion": "sleep"}, True)
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    assert segs == [(enc("the king"), False), (enc("sleep"), True)]


def test_config_template_overrides_the_models_own(tmp_path):
    """data.chat_template (a string or a file) is set on the loaded tokenizer, over the
    tokenizer's own template, and renders as a tokenizer shipping that template does."""
    from mlxdistill import models
    from mlxdistill.config import ConfigError, load_config

    other = templated(tmp_path / "other", TEMPLATE.replace("lady", "lord"))
    own = templated(tmp_path / "own")
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    for value in (TEMPLATE, str(tmp_path / "t.jinja")):
        cfg = load_config(None, [f"data.chat_template={json.dumps(value)}"])
        tok = models.use_chat_template(templated(tmp_path / "o2", TEMPLATE.replace(
            "lady", "lord")), cfg)
        for rec in RECORDS:
            assert data_mod.record_segments(tok, rec, True) == \
                data_mod.record_segments(own, rec, True)
    assert data_mod.record_segments(other, CHAT, True) != data_mod.record_segments(own, CHAT,
                                                                                   True)
    with pytest.raises(ConfigError, match="data.chat_template='nope.jinja' is neither"):
        models.use_chat_template(own, load_config(None, ["data.chat_template=nope.jinja"]))

    # a template module in mlx_lm's wrapper (chat_template_type) gives way to it too
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    module = TokenizerWrapper(other._tokenizer, chat_template=lambda *a, **k: "lord lord")
    assert data_mod.record_segments(models.use_chat_template(module, cfg), CHAT, True) == \
        data_mod.record_segments(own, CHAT, True)


def test_record_kind_follows_mlx_lm(ttok):
    """prompt/completion before messages before text, as mlx_lm's create_dataset tries them."""
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import CompletionsDataset, create_dataset

    both = {**CHAT, "prompt": "the king", "completion": "sleep ."}
    assert data_mod.record_kind(both) == "completion"
    assert isinstance(create_dataset([both], ttok, SimpleNamespace()), CompletionsDataset)
    assert data_mod.record_kind({**CHAT, "text": "x"}) == "chat"
    assert data_mod.record_kind({"text": "x"}) == "text"


def test_template_note_when_the_teacher_has_none(tok, ttok):
    from mlxdistill import models

    note = models.chat_template_note(tok, ttok)
    assert "the student's tokenizer has one, the teacher's none" in note
    assert "chat records need data.chat_template" in note
    assert "the student's none" in models.chat_template_note(ttok, tok)


def test_bad_template_record_is_one_line(ttok, tmp_path):
    bad = templated(tmp_path / "bad", "{{ raise_exception('roles must alternate') }}")
    p = write(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(data_mod.DataError, match="record 1: the chat template cannot render "
                       "this record .*roles must alternate"):
        data_mod.pack(p, bad, seq_len=16)


def test_marked_text_brackets_untrained_tokens(tok, tmp_path):
    p = write(tmp_path / "pc.jsonl", [{"prompt": "the king", "completion": "sleep ."}])
    packed = data_mod.pack(p, tok, seq_len=8)
    text = data_mod.marked_text(tok, packed.input_ids[0], packed.loss_mask[0])
    assert text == "[[the king]] sleep . </s>[[ <unk> <unk> <unk>]]"  # id 0 after the end
    assert data_mod.pack(p, tok, 4, max_rows=1, early_stop=True).input_ids.tolist() == \
        packed.input_ids[:, :4].tolist()


def test_txt_files_split_at_blank_lines(tok, tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("the king\n\n\nthe queen\n")
    recs = data_mod.read_records(str(p))
    assert [r["text"] for r in recs] == ["the king", "the queen"]


def test_max_rows_caps(tok, tmp_path):
    p = write(tmp_path / "t.jsonl", [{"text": "the king " * 20}])
    assert data_mod.pack(p, tok, seq_len=4, max_rows=3).rows == 3


@pytest.mark.parametrize("content,needle", [
    ("", "empty"), ('"the king"\n', "expected a 'text'"), ("{bad\n", "not valid JSON"),
    ('[{"text": "a"}, {"text": "b"}]\n', "x.jsonl:1: the file holds a JSON array; write one "
     "JSON object per line"),
    ('\n[\n  {"text": "a"}\n]\n', "x.jsonl:2: the file holds a JSON array"),
])
def test_bad_files(tmp_path, content, needle):
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(data_mod.DataError, match=needle):
        data_mod.read_records(str(p))


def test_a_folder_for_a_file_says_data_dir(tmp_path):
    with pytest.raises(data_mod.DataError, match=f"{tmp_path} is a folder.*set "
                       f"data.dir={tmp_path} instead"):
        data_mod.read_records(str(tmp_path))


def test_file_sha256_changes_with_content(tmp_path):
    p = tmp_path / "x"
    p.write_text("a")
    a = files.sha256_file(str(p))
    p.write_text("b")
    assert a != files.sha256_file(str(p))
    assert np.all(len(a) == 64)
