"""api_cache.py's parts without a server: reading an endpoint's entries as ids, lining an
answer's entries up with a record's trained tokens, and the refusals. (The whole path
against a real mlx_lm.server is in test_remote.py.)"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from mlxdistill import api, api_cache
from mlxdistill.config import ConfigError, load_config
from mlxdistill.shards import CacheError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_TOK = os.path.join(ROOT, "weights", "teacher")  # SentencePiece with byte fallback
QUIET = dict(quiet=True, log=lambda m: None)


@pytest.fixture(scope="module")
def reader():
    return api_cache.Reader(load_tokenizer(Path(SP_TOK)))


def test_entries_are_read_by_id_name_string_or_bytes(reader):
    tok_id = reader.vocab["▁villain"]
    assert reader.id_of(["▁villain", -1.0, tok_id]) == tok_id  # the endpoint's id, checked
    assert reader.id_of(["▁villain", -1.0, tok_id + 1]) == tok_id  # a wrong id: the name
    assert reader.id_of(["▁villain", -1.0]) == tok_id  # a vocabulary string
    assert reader.id_of([" villain", -1.0]) == tok_id  # decoded text (OpenAI, vLLM)
    byte = reader.vocab["<0xBA>"]
    assert reader.id_of(["bytes:\\xba", -1.0, None, [0xBA]]) == byte  # the endpoint's bytes
    assert reader.unknown == 0
    assert reader.id_of(["no such token here", -1.0]) is None
    assert reader.unknown == 1


def test_a_position_merges_equal_ids_and_puts_unknown_mass_in_the_tail(reader):
    v = reader.vocab["▁villain"]
    entries = [["▁villain", math.log(0.5)], [" villain", math.log(0.2)],
               ["no such token here", math.log(0.2)], ["▁the", math.log(0.05)]]
    ids, lps, tail = reader.position(entries, 5)
    assert ids[0] == v and math.isclose(math.exp(lps[0]), 0.7, rel_tol=1e-6)
    assert ids[1] == reader.vocab["▁the"] and len(ids) == 2
    assert math.isclose(math.exp(tail), 0.25, rel_tol=1e-6)  # 1 - 0.7 - 0.05
    ids, lps, tail = reader.position(entries, 1)  # k cuts the list; the rest is tail
    assert ids == [v] and math.isclose(math.exp(tail), 0.3, rel_tol=1e-6)


def test_entries_are_lined_up_after_an_opener_and_before_the_template_tail():
    gen = [11, 12, 13, 14, 15, 16]
    targets = np.array([7, 8] + gen + [2, 3])  # opener, generated, end-of-turn, EOS
    tops = [[t, 99] for t in gen]
    assert api_cache.line_up(targets, tops) == (2, 1.0)
    # an entry for the EOS too (mlx_lm.server reports it): still from the same place
    assert api_cache.line_up(targets, tops + [[2, 5]]) == (2, 1.0)
    # entries of another text: no offset finds them
    offset, share = api_cache.line_up(targets, [[40 + i] for i in range(6)])
    assert share < api_cache.MIN_HITS


def cfg_for(tmp_path, *extra):
    return load_config(None, ["teacher.model=http://127.0.0.1:9/v1", "cache.mode=topk",
                              f"teacher.tokenizer={SP_TOK}", f"cache.dir={tmp_path / 'c'}",
                              *extra])


def test_refusals_name_the_key(tmp_path):
    for extra, key in ((["cache.mode=sample"], "cache.mode=topk"),
                       (["cache.temperature=2.0"], "cache.temperature"),
                       (["cache.hidden_layers=[1]"], "cache.hidden_layers"),
                       (["teacher.tokenizer=null"], "teacher.tokenizer")):
        with pytest.raises(ConfigError, match=key):
            api.build_cache(cfg_for(tmp_path, *extra), **QUIET)
    with pytest.raises(ConfigError, match="online"):
        api.fit(cfg_for(tmp_path, "teacher.mode=online"), **QUIET)
    with pytest.raises(ConfigError, match="api_top_logprobs"):
        load_config(None, ["teacher.api_top_logprobs=21"])


def test_records_without_logprobs_are_refused_in_one_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": " villain"}) + "\n")
    with pytest.raises(CacheError, match=r"record 1 has no teacher_logprobs.*api_top_logprobs"):
        api.build_cache(cfg_for(tmp_path, f"data.train={data}", "student.model="
                                + os.path.join(ROOT, "weights", "student")), **QUIET)
    assert not os.path.exists(tmp_path / "c")  # refused before any folder is made
    with pytest.raises(CacheError, match=r"record 1 has no teacher_logprobs"):
        api.train(cfg_for(tmp_path, f"data.train={data}", f"run.dir={tmp_path / 'run'}",
                          "student.model=" + os.path.join(ROOT, "weights", "student")), **QUIET)
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "run")


def test_a_short_overlap_at_the_end_is_no_match():
    # one entry matching the last target would be a 100 % share of a 1-token overlap
    targets = np.arange(10)
    offset, share = api_cache.line_up(targets, [[9]] + [[50 + i] for i in range(9)])
    assert share < api_cache.MIN_HITS


def test_a_k_wider_than_the_kept_lists_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": " villain",
                                "teacher_logprobs": [[["▁villain", -0.1], ["▁the", -3.0]]]})
                    + "\n")
    with pytest.raises(ConfigError, match=r"cache.k=5 but .* at most 2 .* set cache.k=2"):
        api.build_cache(cfg_for(tmp_path, f"data.train={data}", "cache.k=5", "student.model="
                                + os.path.join(ROOT, "weights", "student")), **QUIET)


def test_a_tokenizer_no_student_can_follow_names_teacher_tokenizer(tmp_path):
    # the task specialist's tokenizer (no bytes) beside the default student: not alignable
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b", "teacher_logprobs": [
        [["b", -0.1]]]}) + "\n")
    spec = os.path.join(ROOT, "weights", "specialist", "teacher")
    with pytest.raises(Exception, match=r"or teacher.tokenizer=.* is not the endpoint model's"):
        api.build_cache(cfg_for(tmp_path, f"data.train={data}", "cache.k=1",
                                f"teacher.tokenizer={spec}", "student.model="
                                + os.path.join(ROOT, "weights", "student")), **QUIET)
