"""Turn generate()'s arguments into token-id lists and validated SamplingParams.

Every user mistake becomes a ValueError/TypeError naming the bad value and what is
allowed, raised before anything reaches the engine thread, so the engine keeps serving. (A
large call goes in slices, `split_call`: a mistake in a later slice aborts the requests of the
slices already handed over, then is raised; the call returns nothing either way.)
"""

from __future__ import annotations

import dataclasses
import operator
from array import array
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipeline_infer.extra_outputs import OutputArgs
from pipeline_infer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pipeline_infer.engine import Engine


def normalize_inputs(
    engine: "Engine", prompt: Any, sampling_params: Any, input_ids: Any, first_index: int = 0,
    params_made: dict | None = None,
) -> tuple[list[list[int]], list[SamplingParams], bool]:
    """(token ids per prompt, params per prompt, whether the call was for a single prompt).

    first_index: the call's index of the first prompt given (a CallSlice's), for error messages.
    params_made: the SamplingParams already made for earlier slices of the same call, by what
    was asked (`_params`); this slice's are added.
    """
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt (text) and input_ids (token ids)")
    if prompt is not None:
        texts, single = _texts(prompt, first_index)
        if engine.tokenizer is None:
            raise ValueError("this engine has no tokenizer (skip_tokenizer_init or a model without one): pass input_ids")
        ids = engine.tokenizer.encode(texts)
    else:
        ids, single = _id_lists(input_ids, first_index)
    params = _params(sampling_params, len(ids), params_made)
    validated: set[int] = set()  # prompts share SamplingParams objects (_params): check each once
    for i, (seq, p) in enumerate(zip(ids, params), first_index):
        where = "" if single else f" (prompt {i})"
        if len(seq) == 0:
            raise ValueError(f"empty prompt{where}: a prompt needs at least one token")
        if not _ids_in_range(seq, engine.vocab_size):
            bad = next(t for t in seq if not 0 <= t < engine.vocab_size)
            raise ValueError(f"token id {bad}{where} is outside the vocabulary [0, {engine.vocab_size})")
        if len(seq) >= engine.context_length:
            raise ValueError(
                f"prompt{where} has {len(seq)} tokens; the context length is {engine.context_length}, "
                "so a prompt may have at most context_length - 1 tokens"
            )
        if id(p) not in validated:
            p.validate(vocab_size=engine.vocab_size)
            validated.add(id(p))
    return ids, params, single


# From this many ids on, one unsigned copy and numpy's max beat Python's two passes
# (2-core CPU: 1,100 ids 7.0 against 20.3 us; the int64 copy with min and max took 14.6).
_NUMPY_RANGE_MIN_IDS = 256


def _ids_in_range(seq: list[int], vocab_size: int) -> bool:
    """Whether every id of seq (plain ints, checked already) is in [0, vocab_size)."""
    if len(seq) < _NUMPY_RANGE_MIN_IDS:
        return 0 <= min(seq) <= max(seq) < vocab_size  # min/max run in C: ~20x a Python loop
    # array('Q') refuses a negative id or one past 2**64 (OverflowError), so one max checks
    # both bounds; its conversion is also ~3x faster than numpy's or array('q')'s signed one.
    try:
        ids = array("Q", seq)
    except OverflowError:
        return False
    return int(np.frombuffer(ids, dtype=np.uint64).max()) < vocab_size


def _params_key(d: Any) -> tuple | None:
    """What makes two parameter dicts equal for _params: their keys, values and the values'
    types (True == 1 and 5 == 5.0, but an int field refuses a bool or a float). None: not a dict."""
    if type(d) is not dict:
        return None
    values = tuple(d.values())
    return tuple(d), values, tuple(map(type, values))


def _texts(prompt: Any, first_index: int = 0) -> tuple[list[str], bool]:
    if isinstance(prompt, str):
        return [prompt], True
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt is an empty list: pass at least one prompt")
        for i, p in enumerate(prompt, first_index):
            if not isinstance(p, str):
                raise TypeError(f"prompt[{i}] must be a str, got {type(p).__name__}")
        return list(prompt), False
    raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")


def _id_lists(input_ids: Any, first_index: int = 0) -> tuple[list[list[int]], bool]:
    if hasattr(input_ids, "tolist"):  # numpy arrays and torch tensors
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)):
        raise TypeError(f"input_ids must be a list of int or a list of lists of int, got {type(input_ids).__name__}")
    if not input_ids:
        raise ValueError("input_ids is an empty list: pass at least one token")
    if all(_is_int(t) for t in input_ids):
        return [list(input_ids)], True
    out = []
    for i, seq in enumerate(input_ids, first_index):
        if hasattr(seq, "tolist"):
            seq = seq.tolist()
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"input_ids[{i}] must be a list of int, got {type(seq).__name__}")
        # One pass in C over the element types (a Python loop over a 1,000-prompt batch's ids
        # took ~0.2 s of each generate call); the per-element check only where it fails.
        # countOf compares each type with int by identity first: no set to build and hash into
        # (1,024 prompts of 1,100 ids: 10.0 against 13.0 ms on a 2-core CPU).
        if operator.countOf(map(type, seq), int) != len(seq):
            for t in seq:
                if not _is_int(t):
                    raise TypeError(f"input_ids[{i}] holds {t!r} ({type(t).__name__}); token ids must be ints")
        # Not copied: each Request copies its prompt (one copy a prompt, not two).
        out.append(seq if type(seq) is list else list(seq))
    return out, False


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _params(sampling_params: Any, n: int, made: dict | None = None) -> list[SamplingParams]:
    """One SamplingParams per prompt; prompts given equal parameters share one object.

    A request never changes its SamplingParams (n > 1 samples of a prompt already share one),
    so one checked copy serves every prompt that asked for the same values: a batch job's
    dicts differ in a few values (max_new_tokens by row, say), and making and checking an
    object per prompt was a third of generate()'s own work per prompt (1,024 shared-prefix
    prompts: ~10 of 31 ms on a 2-core CPU)."""
    if sampling_params is None or isinstance(sampling_params, (dict, SamplingParams)):
        return [SamplingParams.from_dict(sampling_params)] * n
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} sampling_params for {n} prompts: pass one dict or one per prompt")
        if made is None:
            made = {}
        out = []
        for d in sampling_params:
            key = _params_key(d)
            p = None
            if key is not None:
                try:
                    p = made.get(key)
                except TypeError:  # a value that cannot be hashed (a list of stop strings, ...)
                    key = None
            if p is None:
                p = SamplingParams.from_dict(d)
                if key is not None:
                    made[key] = p
            out.append(p)
        return out
    raise TypeError(
        f"sampling_params must be a dict, a SamplingParams or a list of them, got {type(sampling_params).__name__}"
    )


class CallSlice(NamedTuple):
    """generate()'s arguments for consecutive prompts [first_index, first_index + n) of one call."""

    prompt: Any
    sampling_params: Any
    input_ids: Any
    rid: Any
    outputs: OutputArgs
    first_index: int


def split_call(
    prompt: Any, sampling_params: Any, input_ids: Any, rid: Any, outputs: OutputArgs, size: int,
    first_size: int | None = None,
) -> list[CallSlice] | None:
    """A call over more than `first_size` prompts (default `size`) as slices: the first of
    `first_size` prompts, the others of at most `size`, each argument given per prompt cut to
    its slice; None when the call is not such a list or its per-prompt arguments do not match
    its length (it then goes through normalize_inputs whole, which says what is wrong).

    Lets generate() hand the engine the first slice's requests while it still checks and builds
    the others: the device starts that much sooner.
    """
    first_size = size if first_size is None else first_size
    items = input_ids if prompt is None else prompt
    if (prompt is None) == (input_ids is None) or hasattr(items, "tolist") or not isinstance(items, (list, tuple)):
        return None  # one prompt, an array (converted whole), or a mistake normalize_inputs reports
    n = len(items)
    if n <= first_size or (prompt is None and _is_int(items[0])):
        return None  # few prompts, or one prompt's ids
    per_prompt = {"sampling_params": sampling_params, "rid": rid}
    per_prompt.update((f.name, getattr(outputs, f.name)) for f in dataclasses.fields(outputs))
    for value in per_prompt.values():
        if isinstance(value, (list, tuple)) and len(value) != n:
            return None
    if isinstance(rid, str):
        return None

    def cut(value: Any, a: int, b: int) -> Any:
        return value[a:b] if isinstance(value, (list, tuple)) else value

    slices = []
    starts = [0, *range(first_size, n, size)]
    for a, b in zip(starts, [*starts[1:], n]):
        out = dataclasses.replace(outputs, **{f.name: cut(getattr(outputs, f.name), a, b) for f in dataclasses.fields(outputs)})
        slices.append(CallSlice(
            items[a:b] if prompt is not None else None, cut(sampling_params, a, b),
            items[a:b] if prompt is None else None, cut(rid, a, b), out, a,
        ))
    return slices
