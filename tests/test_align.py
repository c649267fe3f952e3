"""Cross-tokenizer alignment (align.py) on tokenizers built here from data/train.jsonl: a
SentencePiece-style BPE (▁, byte fallback), a byte-level BPE (Ġ), and weights/teacher's own
SentencePiece tokenizer as mlx_lm loads it. No models, no network; a few seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import numpy as np
import pytest

from mlxdistill import align as A
from mlxdistill.errors import Error

from conftest import ROOT, make_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Leading, trailing and repeated spaces, newlines, multi-byte characters (split into bytes
# by the SentencePiece tokenizers, merged by the byte-level one), digits one side merges.
TEXTS = [
    "ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare",
    "Enter   the KING,  with   a café au lait. ",
    "caf\u00e9 r\u00e9sum\u00e9 \U0001F600 \u4e2d\u6587\u5b57 and 12345 + 678 = 13023\n",
    "tab\there\r\nwindows  \n\n\n  indented line\n",
    "\U0001F600\U0001F600 emoji first, then \u00e9\u00e9\u00e9",
]


def _lines(n: int) -> list[str]:
    with open(os.path.join(ROOT, "data", "train.jsonl"), encoding="utf-8") as f:
        out = [json.loads(line)["text"][:1500] for _, line in zip(range(n), f)]
    # so the byte-level side merges what the SentencePiece side splits
    return out + ["12345 café résumé naïve 13023 678"] * 50


@pytest.fixture(scope="module")
def corpus():
    return _lines(150)


@pytest.fixture(scope="module")
def byte_level(corpus):
    """GPT-2 style: byte-level pre-tokenizer and decoder, Ġ for a space, chat markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=900, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   name_or_path="tiny-byte-level")


def _spm_json(corpus, legacy: bool = False) -> str:
    """A SentencePiece-style BPE as tokenizer.json writes one: ▁ for spaces, a dummy prefix,
    <0xNN> byte fallback for what the vocabulary lacks (é, emoji, CJK here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=80,
        show_progress=False))
    tj = json.loads(tk.to_str())
    vocab = tj["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tj["model"].update(byte_fallback=True, fuse_unk=True)
    tj["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    if legacy:  # Llama 2's tokenizer.json: the space work in the normalizer
        tj["pre_tokenizer"] = None
        tj["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    return json.dumps(tj)


@pytest.fixture(scope="module")
def spm(corpus):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_spm_json(corpus)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   name_or_path="tiny-spm")


@pytest.fixture(scope="module")
def teacher():
    """weights/teacher's SentencePiece BPE as mlx_lm wraps it (with a "\\n" added token)."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(pathlib.Path(ROOT) / "weights" / "teacher")


@pytest.fixture(scope="module")
def toks(byte_level, spm, teacher):
    return {"byte": byte_level, "spm": spm, "teacher": teacher}


def _enc(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def _check(r: A.Retokenized, a: A.Alignment, T: A.Vocab, S: A.Vocab, t_ids) -> None:
    """The invariants every alignment keeps."""
    t_ids = np.asarray(t_ids)
    for spans, ids, v in ((r.t_spans, t_ids, T), (r.s_spans, r.ids, S)):
        # each side's spans tile the text in order; a span is the token's bytes, less at
        # most a dummy-prefix space
        has = spans[:, 1] > spans[:, 0]
        assert b"".join(r.text[s:e] for s, e in spans[has]) == r.text
        for (s, e), i in zip(spans, ids):
            p = v.pieces[i]
            assert r.text[s:e] in (p, p[1:]) or (not p and s == e), (p, r.text[s:e])
    # aligned positions predict tokens starting at the same byte after the same prefix
    for tp, sp, one in zip(a.t_pos, a.s_pos, a.one_to_one):
        assert tp >= 0 and sp >= 0
        ts, ss = r.t_spans[tp + 1], r.s_spans[sp + 1]
        assert ts[0] == ss[0] and ts[1] > ts[0] and ss[1] > ss[0]
        assert one == (ts[1] == ss[1])
    # chunks: each side's predicted tokens in chunk c cover the same bytes, the chunks are
    # disjoint and ordered, and they tile the text from the first shared boundary on
    ranges = []
    for c in range(a.n_chunks):
        got = []
        for spans, chunk in ((r.t_spans, a.t_chunk), (r.s_spans, a.s_chunk)):
            sel = spans[np.nonzero(chunk == c)[0] + 1]
            assert len(sel) and np.all(sel[1:, 0] == sel[:-1, 1])
            got.append((sel[0, 0], sel[-1, 1]))
        assert got[0] == got[1]
        ranges.append(got[0])
    assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    if ranges:
        assert ranges[-1][1] == len(r.text)
    assert a.t_chunk[-1] == -1 and a.s_chunk[-1] == -1


def test_token_bytes_sentencepiece(teacher):
    v = A.vocab(teacher)
    assert A.token_bytes(teacher) == list(v.pieces)
    assert v.name.endswith("teacher") and v.prefix_space
    assert v.pieces[:3] == (b"", b"", b"") and v.special[:3].all()  # <unk> <s> </s>
    assert v.pieces[3] == b"\n" and v.lookup[b"\n"] == 3  # the added token, not <0x0A>
    fallback = teacher._tokenizer.convert_tokens_to_ids("<0x0A>")
    assert v.pieces[fallback] == b"\n"
    a = teacher._tokenizer.convert_tokens_to_ids("a")
    assert v.pieces[a] == b"a" and v.lookup[b"a"] == a  # a piece before <0x61>
    the = teacher._tokenizer.convert_tokens_to_ids("\u2581the")
    assert v.pieces[the] == b" the"
    assert v.roles == {"bos": 1, "eos": 2, "unk": 0}


def test_token_bytes_byte_level(byte_level):
    v = A.vocab(byte_level)
    assert v.name == "tiny-byte-level" and not v.prefix_space
    assert all(bytes([b]) in v.lookup for b in range(256))
    assert v.pieces[v.lookup[b" "]] == b" "
    assert byte_level.convert_ids_to_tokens(v.lookup[b" "]) == "\u0120"  # Ġ
    ids = [byte_level.convert_tokens_to_ids(s) for s in SPECIALS]
    assert all(v.pieces[i] == b"" and v.special[i] for i in ids)
    assert v.content[ids[1]] == "<|im_start|>" and v.roles["eos"] == ids[0]


@pytest.mark.parametrize("name", ["byte", "spm", "teacher"])
def test_tokens_spell_the_text(toks, name):
    """The bytes of a text's tokens are the text, with a space before it where the
    tokenizer adds SentencePiece's dummy prefix."""
    v = A.vocab(toks[name])
    for text in TEXTS:
        spelled = b"".join(v.pieces[i] for i in _enc(toks[name], text))
        want = text.encode()
        assert spelled == (b" " + want if v.prefix_space and not text.startswith(" ")
                           else want)


@pytest.mark.parametrize("src,dst", [("teacher", "byte"), ("byte", "teacher"),
                                     ("spm", "teacher"), ("teacher", "spm"),
                                     ("byte", "spm")])
def test_round_trip_whole_texts(toks, src, dst):
    """A whole text's teacher ids become exactly the student's ids for that text."""
    T, S = A.vocab(toks[src]), A.vocab(toks[dst])
    for text in TEXTS:
        t_ids = _enc(toks[src], text)
        r = A.retokenize(t_ids, T, S)
        assert r.ids.tolist() == _enc(toks[dst], text)
        assert r.text == text.encode()
        _check(r, A.align(r.t_spans, r.s_spans), T, S, t_ids)


def test_leading_spaces_follow_teacher_decode(toks):
    """A text's leading space and the dummy prefix are one token in a SentencePiece
    encoding: the row's text is what the teacher's decode() gives."""
    T, S = A.vocab(toks["teacher"]), A.vocab(toks["byte"])
    t_ids = _enc(toks["teacher"], "  two spaces")
    r = A.retokenize(t_ids, T, S)
    assert r.text == toks["teacher"].decode(t_ids).encode() == b" two spaces"
    assert r.ids.tolist() == _enc(toks["byte"], " two spaces")


def test_one_to_one_hand_worked():
    # teacher a|b|cd|e, student a|bc|d|e over b"abcde"
    a = A.align([(0, 1), (1, 2), (2, 4), (4, 5)], [(0, 1), (1, 3), (3, 4), (4, 5)])
    assert a.t_pos.tolist() == [0, 2] and a.s_pos.tolist() == [0, 2]
    assert a.one_to_one.tolist() == [False, True]  # b vs bc; e vs e
    # chunks: [0,1) holds the unpredicted first tokens; [1,4) = 0; [4,5) = 1
    assert a.n_chunks == 2
    assert a.t_chunk.tolist() == [0, 0, 1, -1] and a.s_chunk.tolist() == [0, 0, 1, -1]
    # a special (empty span) predicts nothing and is predicted by no chunk
    a = A.align([(0, 2), (2, 2), (2, 3), (3, 5)], [(0, 1), (1, 2), (2, 2), (2, 5)])
    assert a.t_pos.tolist() == [1] and a.s_pos.tolist() == [2]  # both starting at byte 2
    assert a.one_to_one.tolist() == [False]
    assert a.t_chunk.tolist() == [-1, 0, 0, -1] and a.s_chunk.tolist() == [-1, -1, 0, -1]
    with pytest.raises(A.AlignError, match="overlap"):
        A.align([(0, 3), (2, 4)], [(0, 4)])


def test_packed_documents_and_specials(toks):
    """A row as data.py packs it (record, EOS, record) and a chat-like row with special
    markers: each text stretch is the student's encoding of it, EOS becomes the student's
    EOS, other specials vanish, and no chunk holds a special."""
    T, S = A.vocab(toks["teacher"]), A.vocab(toks["byte"])
    docs = ["ALL'S WELL caf\u00e9", "by William 12345", "\u4e2d\u6587 end"]
    t_ids = [i for d in docs for i in _enc(toks["teacher"], d) + [T.roles["eos"]]]
    r = A.retokenize(t_ids, T, S, A.special_map(T, S))
    eos = S.roles["eos"]
    assert r.ids.tolist() == [i for d in docs for i in _enc(toks["byte"], d) + [eos]]
    a = A.align(r.t_spans, r.s_spans)
    _check(r, a, T, S, t_ids)
    for ids, v, spans, chunk in ((t_ids, T, r.t_spans, a.t_chunk),
                                 (r.ids, S, r.s_spans, a.s_chunk)):
        special = np.nonzero(v.special[np.asarray(ids)])[0]
        assert len(special) == 3 and (spans[special, 0] == spans[special, 1]).all()
        # an empty span (a special, or the "▁" of a dummy prefix alone) is in no chunk
        empty = np.nonzero(spans[:, 1] == spans[:, 0])[0]
        assert (chunk[empty[empty > 0] - 1] == -1).all()

    # byte-level teacher with chat markers -> SentencePiece student
    T, S = A.vocab(toks["byte"]), A.vocab(toks["spm"])
    chat = ("<|im_start|>user\nHi  there, caf\u00e9?<|im_end|>\n<|im_start|>assistant\n"
            "12345 \U0001F600<|im_end|><|endoftext|>")
    t_ids = _enc(toks["byte"], chat)
    assert sum(T.special[i] for i in t_ids) == 5
    r = A.retokenize(t_ids, T, S, A.special_map(T, S))
    stretches = ["user\nHi  there, caf\u00e9?", "\n", "assistant\n12345 \U0001F600"]
    want = [i for s in stretches for i in _enc(toks["spm"], s)] + [S.roles["eos"]]
    assert r.ids.tolist() == want
    assert r.text == "".join(stretches).encode()
    _check(r, A.align(r.t_spans, r.s_spans), T, S, t_ids)


def test_row_cut_inside_a_character(toks):
    """Rows are cut at any token, so a row may begin or end inside a UTF-8 character: its
    stray bytes stay in the text, each as the student's one-byte token; the valid text
    between is encoded as usual."""
    T, S = A.vocab(toks["teacher"]), A.vocab(toks["byte"])
    full = _enc(toks["teacher"], "\U0001F600 \u4e2d\u6587 ok \u00e9")
    pieces = [T.pieces[i] for i in full]
    start = pieces.index(b"\x9f")  # the emoji's 2nd byte
    end = len(pieces) - 1  # before é's last byte
    row = full[start:end]
    r = A.retokenize(row, T, S)
    assert r.text == b"\x9f\x98\x80 \xe4\xb8\xad\xe6\x96\x87 ok \xc3"
    strays = [S.lookup[bytes([b])] for b in b"\x9f\x98\x80"]
    assert r.ids.tolist() == strays + _enc(toks["byte"], " \u4e2d\u6587 ok ") \
        + [S.lookup[b"\xc3"]]
    a = A.align(r.t_spans, r.s_spans)
    _check(r, a, T, S, row)

    # the same row for the SentencePiece student: <0xNN> tokens, and its dummy prefix
    # before the valid text (as in every stretch it encodes) spans no text byte
    S2 = A.vocab(toks["spm"])
    r2 = A.retokenize(row, T, S2)
    assert [S2.pieces[i] for i in r2.ids[:3]] == [b"\x9f", b"\x98", b"\x80"]
    _check(r2, A.align(r2.t_spans, r2.s_spans), T, S2, row)

    # a student with no token for a stray byte leaves it uncovered: its chunk is unscored
    S3 = dataclasses.replace(S, lookup={k: i for k, i in S.lookup.items() if k != b"\xc3"})
    r3 = A.retokenize(row, T, S3)
    assert r3.ids.tolist() == r.ids.tolist()[:-1]
    a3 = A.align(r3.t_spans, r3.s_spans)
    assert a3.t_chunk[-2] == -1 and a3.n_chunks == a.n_chunks - 1


def test_student_mask(toks):
    """The cached loss mask moves to the student positions predicting the same bytes."""
    T, S = A.vocab(toks["teacher"]), A.vocab(toks["byte"])
    prompt, completion = _enc(toks["teacher"], "Question:"), _enc(toks["teacher"], " 12345 ok")
    t_ids = prompt + completion
    t_mask = [0] * (len(prompt) - 1) + [1] * len(completion) + [1]
    r = A.retokenize(t_ids, T, S)
    m = A.student_mask(t_mask, r)
    first = int(np.nonzero(r.s_spans[:, 0] >= len(b"Question:"))[0][0])
    assert m.tolist() == [0] * (first - 1) + [1] * (len(r.ids) - first) + [0]


def test_string_map_known_overlaps(toks):
    t = [b"", b"a", b"ab", b" the", b"x", b"\xff", b"a"]
    s = [b"ab", b"", b" the", b"a", b"a", b"\xff"]
    assert A.string_map(t, s).tolist() == [-1, 3, 0, 2, -1, 5, 3]
    assert A.string_map(t, s, size=9).tolist()[7:] == [-1, -1]
    T, S = A.vocab(toks["teacher"]), A.vocab(toks["spm"])
    m = A.string_map(T, S)
    assert len(m) == len(T.pieces) and (m[T.special] == -1).all()
    for b in (b" the", b"a", b"\n", b"\xc3"):
        assert m[T.lookup[b]] == S.lookup[b]
    ok = m >= 0
    assert all(T.pieces[i] == S.pieces[m[i]] for i in np.nonzero(ok)[0])
    assert not any(T.pieces[i] in S.lookup for i in np.nonzero(~ok)[0] if T.pieces[i])


def test_string_map_150k_is_fast():
    rng = np.random.default_rng(0)
    t = [b""] + [b"t%d" % i for i in range(150_000)]
    order = rng.permutation(150_000)
    s = [b"t%d" % i if i % 3 else b"s%d" % i for i in order]
    t0 = time.perf_counter()
    m = A.string_map(t, s)
    assert time.perf_counter() - t0 < 1.0
    pos = np.argsort(order)
    assert m[0] == -1 and m[1 + 1] == pos[1] and m[1 + 3] == -1


def test_unmappable_tokenizers(tmp_path, corpus):
    from tokenizers import Tokenizer, decoders, normalizers

    from transformers import PreTrainedTokenizerFast

    def load(tj, name):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)),
                                       name_or_path=name)

    base = json.loads(_spm_json(corpus))
    lower = dict(base, normalizer=json.loads(normalizers.Lowercase().__getstate__()))
    with pytest.raises(A.AlignError, match="lowercased.*Lowercase normalizer"):
        A.vocab(load(lower, "lowercased"))
    with pytest.raises(A.AlignError, match="wordpiecey.*decoder"):
        A.vocab(load(dict(base, decoder=json.loads(decoders.WordPiece().__getstate__())),
                     "wordpiecey"))
    make_tokenizer(str(tmp_path / "word"))  # the suite's word-level tokenizer
    with pytest.raises(A.AlignError, match="WordLevel"):
        A.vocab(PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "word")))
    with pytest.raises(Error, match="no tokenizer.json"):
        A.vocab(object())
    legacy = A.vocab(load(json.loads(_spm_json(corpus, legacy=True)), "legacy"))
    assert legacy.prefix_space  # Llama 2's Prepend normalizer is a dummy prefix too


def test_bits_per_byte_counts_the_scored_text(tmp_path):
    """Evaluation's bits per byte divides the scored tokens' nats by the bytes of the text
    they spell: for one short record that is the whole text (SentencePiece's dummy space
    included) but the first token, which no position predicts."""
    import math

    from mlxdistill import data as data_mod
    from mlxdistill import evaluate, models, xeval

    root = os.path.join(os.path.dirname(__file__), "..")
    text = "Good night, sweet prince: and flights of angels sing thee to thy rest!"
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    teacher, tok, cfg = models.load(os.path.join(root, "weights", "teacher"), "teacher")
    vocab = models.logits_size(cfg)
    lens = xeval.piece_lengths(evaluate.token_pieces(tok), vocab)
    packed = data_mod.pack(str(path), tok, 64, True)
    res = evaluate.compare(teacher, {}, packed, vocab, byte_lens=lens)
    ids = tok.encode(text, add_special_tokens=False)
    assert res["bytes"] == len((" " + text).encode()) - lens[ids[0]]
    t = res["teacher"]
    assert abs(t["bpb"] - t["ce"] * res["tokens"] / math.log(2) / res["bytes"]) < 1e-3
    # a tokenizer that cannot be mapped to bytes: no bits per byte, not an error
    assert evaluate.token_pieces(object()) is None
