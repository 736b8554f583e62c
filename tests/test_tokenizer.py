"""Incremental detokenizer on the bundled SmolLM2 tokenizer: UTF-8 safety and stop hold-back."""

from __future__ import annotations

import pytest

from pipeline_infer.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café naïve — 東京は日本の首都です。 🙂🚀 emoji end",
    "  leading spaces\n\nnew lines\tand tabs   ",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def tok():
    from pipeline_infer import loader

    return Tokenizer.from_pretrained(loader.bundled_model_dir())


def _pieces(tok, ids, **kw):
    d = IncrementalDetokenizer(tok, **kw)
    pieces = []
    for t in ids:
        pieces.append(d.add(t))
        if d.stopped is not None:
            break
    if d.stopped is None:
        pieces.append(d.finish())
    return d, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_full_decode(tok, text):
    ids = tok.encode([text], add_special_tokens=False)[0]
    d, pieces = _pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert d.text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # no piece splits a multi-byte character


def test_stop_string_across_tokens_is_trimmed_and_never_leaked(tok):
    text = "Answer: 42. END OF ANSWER and more text"
    ids = tok.encode([text], add_special_tokens=False)[0]
    d, pieces = _pieces(tok, ids, stop=["END OF ANSWER"])
    assert d.stopped == "END OF ANSWER"
    assert "".join(pieces) == "Answer: 42. "
    assert d.text == "Answer: 42. "
    # a prefix of the stop string is held back while it could still complete it
    assert not any("END" in p for p in pieces)


def test_no_stop_trim_keeps_the_stop_string(tok):
    ids = tok.encode(["a b c STOP d e"], add_special_tokens=False)[0]
    d, pieces = _pieces(tok, ids, stop=["STOP"], no_stop_trim=True)
    assert "".join(pieces) == "a b c STOP"


def test_false_start_of_stop_string_is_released(tok):
    ids = tok.encode(["x ## y ## z"], add_special_tokens=False)[0]
    d, pieces = _pieces(tok, ids, stop=["###"])
    assert d.stopped is None and "".join(pieces) == "x ## y ## z"


def test_stop_regex(tok):
    ids = tok.encode(["The year was 1999 and then"], add_special_tokens=False)[0]
    d, _ = _pieces(tok, ids, stop_regex=[r"\d{4}"])
    assert d.stopped == "1999" and d.text == "The year was "


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode(["alpha beta gamma delta"], add_special_tokens=False)[0]
    d, _ = _pieces(tok, ids, stop=["delta", "beta"])
    assert d.stopped == "beta" and d.text == "alpha "


def test_encode_batch_matches_single(tok):
    batch = tok.encode(TEXTS)
    assert batch == [tok.encode([t])[0] for t in TEXTS]


def test_decode_equals_the_hf_tokenizers_decode(tok):
    """The direct backend call gives exactly what the HF tokenizer's decode gives."""
    import random

    assert tok._backend_decode is not None  # the bundled tokenizer takes the fast path
    rng = random.Random(0)
    specials = sorted(tok.hf.all_special_ids)
    n = tok.vocab_size
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(n) for _ in range(rng.randint(0, 12))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == tok.hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode((5, 6, 7)) == tok.hf.decode([5, 6, 7], skip_special_tokens=True)  # any sequence type


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deferred_decoding_gives_the_incremental_text(tok, text, skip_special_tokens):
    """incremental=False (a non-streaming request): nothing comes out until finish, which
    returns exactly the text the incremental pieces add up to."""
    ids = tok.encode([text], add_special_tokens=False)[0] + sorted(tok.eos_token_ids)
    _, pieces = _pieces(tok, ids, skip_special_tokens=skip_special_tokens)
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens, incremental=False)
    assert all(d.add(t) == "" for t in ids)
    assert d.finish() == "".join(pieces)
    assert d.text == "".join(pieces)


def test_deferred_decoding_keeps_stop_strings_incremental(tok):
    """A stop string must end the request as soon as it appears: no deferral then."""
    ids = tok.encode(["Answer: 42. END OF ANSWER and more text"], add_special_tokens=False)[0]
    d, pieces = _pieces(tok, ids, stop=["END OF ANSWER"], incremental=False)
    assert d.stopped == "END OF ANSWER"
    assert "".join(pieces) == "Answer: 42. "
