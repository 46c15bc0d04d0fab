"""Tokenizer: round trips, vocab sizes, and streaming decode across byte-fallback tokens."""

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_service.tokenizer import Tokenizer
from mixtral.checkpoint import Checkpoint
from mixtral.config import preset

TEXTS = [
    "Hello, world! Ça va très bien, merci. Größe, niño, façade.",
    "東京は日本の首都です。你好，世界！ 안녕하세요",
    "🦙 llamas 🎉 and a family 👨‍👩‍👧 with flags 🇫🇷🇯🇵",
    "  two leading spaces, tabs\tand\nnew lines  ",
    "mixed: naïve café 中文 🤖 end",
]
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


@pytest.fixture(scope="module", params=["tiny", "tiny-v3"])
def tok(request, make_ckpt) -> Tokenizer:
    return Tokenizer.from_checkpoint(make_ckpt(preset(request.param)))


@pytest.fixture(scope="module")
def v1(tiny_ckpt) -> Tokenizer:
    return Tokenizer.from_checkpoint(tiny_ckpt)


def test_vocab_sizes_and_special_ids(make_ckpt, tiny_ckpt):
    v1 = Tokenizer.from_checkpoint(Checkpoint(tiny_ckpt))
    v3 = Tokenizer.from_checkpoint(make_ckpt(preset("tiny-v3")))
    assert (v1.vocab_size, v1.version, v1.path.name) == (32000, "v1", "tokenizer.model")
    assert (v3.vocab_size, v3.version, v3.path.name) == (32768, "v3", "tokenizer.model.v3")
    for t in (v1, v3):
        assert (t.bos_id, t.eos_id) == (1, 2)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.encode(text, bos=False) == ids[1:]
    assert tok.decode(ids) == text


def test_some_texts_need_byte_fallback(tok):
    """Otherwise the streaming tests below would prove nothing about split characters."""
    pieces = [tok.piece(i) for i in tok.encode(TEXTS[2], bos=False)]
    assert sum(bool(BYTE_PIECE.match(p)) for p in pieces) >= 4


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    dec = tok.incremental()
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) + dec.flush() == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert dec.ids == ids


def test_streaming_holds_back_incomplete_characters(tok):
    ids = tok.encode("🦙", bos=False)
    assert sum(bool(BYTE_PIECE.match(tok.piece(i))) for i in ids) == 4
    dec = tok.incremental()
    deltas = [dec.push(i) for i in ids]
    assert deltas[-1] == "🦙" and not any(deltas[:-1])


def test_streaming_flushes_a_truncated_character(tok):
    ids = tok.encode("ok 🦙", bos=False)[:-1]  # generation stopped inside the emoji
    dec = tok.incremental()
    streamed = dec.push_many(ids)
    assert "\ufffd" not in streamed
    assert streamed + dec.flush() == tok.decode(ids)


def test_streaming_keeps_leading_space_after_prompt(tok):
    prompt = tok.encode("The capital of France is")
    answer = tok.encode("Paris", bos=False)  # ['▁Paris'], as a model would generate it
    assert tok.decode(answer) == "Paris"  # decoded alone, SentencePiece drops the space
    assert tok.incremental(context=prompt).push_many(answer) == " Paris"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 400), st.integers(0, 31999)), max_size=24))
def test_streaming_any_ids_matches_decode(v1, ids):
    """Even for ids a random-weight model emits (stray bytes, control tokens)."""
    dec = v1.incremental()
    assert dec.push_many(ids) + dec.flush() == v1.decode(ids)


def test_out_of_vocab_id_refused(tok):
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is outside"):
        tok.decode([1, tok.vocab_size])


def test_module_does_not_import_torch():
    code = "import sys, attention_service.tokenizer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

