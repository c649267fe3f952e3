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


def test_chat_trains_assistant_turns_only(tok, tmp_path):
    msgs = [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "sleep"}]
    p = write(tmp_path / "chat.jsonl", [{"messages": msgs}])
    packed = data_mod.pack(p, tok, seq_len=16)
    segs = data_mod.record_segments(tok, {"messages": msgs}, True)
    n_user = len(segs[0][0])
    m = packed.loss_mask[0]
    assert m[: n_user - 1].sum() == 0 and m[n_user - 1] == 1


def test_txt_files_split_at_blank_lines(tok, tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("the king\n\n\nthe queen\n")
    recs = data_mod.read_records(str(p))
    assert [r["text"] for r in recs] == ["the king", "the queen"]


def test_max_rows_caps(tok, tmp_path):
    p = write(tmp_path / "t.jsonl", [{"text": "the king " * 20}])
    assert data_mod.pack(p, tok, seq_len=4, max_rows=3).rows == 3


@pytest.mark.parametrize("content,needle", [("", "empty"), ("[1,2]\n", "expected a 'text'"),
                                            ("{bad\n", "not valid JSON")])
def test_bad_files(tmp_path, content, needle):
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(data_mod.DataError, match=needle):
        data_mod.read_records(str(p))


def test_file_sha256_changes_with_content(tmp_path):
    p = tmp_path / "x"
    p.write_text("a")
    a = files.sha256_file(str(p))
    p.write_text("b")
    assert a != files.sha256_file(str(p))
    assert np.all(len(a) == 64)
