"""Sampler against hand-computed distributions and adjustments (CPU, float32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline_infer.request import Request
from pipeline_infer.sampler import Sampler, SamplingBatchInfo
from pipeline_infer.sampling_params import SamplingParams

V = 6


def _info(params, prompt=None, outputs=None, seeds=None, eos=frozenset()):
    B = len(params)
    return SamplingBatchInfo.build(
        params=params,
        prompt_ids=prompt or [[0]] * B,
        output_ids=outputs or [[] for _ in range(B)],
        seeds=seeds or [None] * B,
        vocab_size=V,
        device=torch.device("cpu"),
        eos_token_ids=eos,
    )


def _sp(**kw) -> SamplingParams:
    p = SamplingParams.from_dict(kw)
    p.validate(V)
    return p


def _frequencies(logits_row, n=40000, **kw) -> torch.Tensor:
    torch.manual_seed(0)
    logits = torch.tensor(logits_row, dtype=torch.float32).repeat(n, 1)
    toks = Sampler()(logits, _info([_sp(**kw)] * n))
    return torch.bincount(toks, minlength=V).float() / n


LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(7, V)
    assert torch.equal(Sampler()(logits, _info([_sp(temperature=0)] * 7)), logits.argmax(-1))
    assert torch.equal(Sampler()(logits, _info([_sp(temperature=1.3, top_k=1)] * 7)), logits.argmax(-1))


def test_greedy_on_bf16_logits_equals_fp32_argmax_with_ties_and_adjustments():
    """Plain greedy takes argmax in bf16 (no fp32 copy); ties and adjusted rows must still agree."""
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0, 0.5, 3.0], [0.25, 0.25, 0.0, 0.0, 0.0, 0.25]]).to(torch.bfloat16)
    logits = torch.cat([logits, torch.randn(30, V).to(torch.bfloat16)])
    greedy = _info([_sp(temperature=0)] * len(logits))
    out = Sampler()(logits, greedy)
    assert torch.equal(out, logits.float().argmax(-1))
    assert out[:2].tolist() == [1, 0]  # first of the tied maxima
    # A bias makes the sampler adjust in fp32: the bias must still apply.
    biased = _info([_sp(temperature=0, logit_bias={"4": 100.0})] * len(logits))
    assert Sampler()(logits, biased).tolist() == [4] * len(logits)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    freq = _frequencies(LOGITS, temperature=temperature)
    expected = torch.softmax(torch.tensor(LOGITS) / temperature, -1)
    assert torch.allclose(freq, expected, atol=0.01)


def test_top_k_renormalises_the_k_best():
    freq = _frequencies(LOGITS, top_k=2)
    p = torch.softmax(torch.tensor(LOGITS[:2]), -1)
    assert torch.allclose(freq[:2], p, atol=0.01) and freq[2:].sum() == 0


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.03, 0.01])
    # before-mass: 0, .5, .8 -> with top_p=.6 tokens 0 and 1 stay (0.5 < 0.6), token 2 goes (0.8 >= 0.6)
    freq = _frequencies(probs.log().tolist(), top_p=0.6)
    assert torch.allclose(freq[:2], torch.tensor([0.625, 0.375]), atol=0.01) and freq[2:].sum() == 0


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.04, 0.01])
    freq = _frequencies(probs.log().tolist(), min_p=0.3)  # keep p >= 0.12
    kept = probs[:3] / probs[:3].sum()
    assert torch.allclose(freq[:3], kept, atol=0.01) and freq[3:].sum() == 0


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = torch.randn(50, V)
    params = [_sp(temperature=0) if i % 2 else _sp(temperature=1.0) for i in range(50)]
    out = Sampler()(logits, _info(params))
    assert torch.equal(out[1::2], logits[1::2].argmax(-1))


def test_seeded_rows_do_not_depend_on_batch_neighbours():
    torch.manual_seed(1)
    row = torch.randn(V)
    alone = [Sampler()(row.view(1, V), _info([_sp()], outputs=[[1] * s], seeds=[42])).item() for s in range(30)]
    mates = torch.randn(3, V)
    together = []
    for s in range(30):
        logits = torch.cat([mates, row.view(1, V)])
        info = _info([_sp()] * 4, outputs=[[], [], [], [1] * s], seeds=[None, 7, None, 42])
        together.append(Sampler()(logits, info)[3].item())
    assert alone == together
    other = [Sampler()(row.view(1, V), _info([_sp()], outputs=[[1] * s], seeds=[43])).item() for s in range(30)]
    assert other != alone  # 30 draws from a 6-token distribution: equal only by a ~1e-10 chance


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0, 3.0]])
    p = _sp(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    info = _info([p], prompt=[[0]], outputs=[[1, 3, 3]])
    got = Sampler.adjust_logits(logits.clone(), info)
    # token 0: in prompt -> 2/2 = 1. token 1: output once -> -1*2 - .5 - .25. token 3: twice -> 1/2 - 1 - .25
    expected = torch.tensor([[1.0, -2.75, 0.5, -0.75, 0.0, 3.0]])
    assert torch.allclose(got, expected)


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 8.0, 0.0]])  # eos=2 is the argmax, stop id 4 next
    p = _sp(temperature=0, min_new_tokens=2, max_new_tokens=5, stop_token_ids=[4])
    assert Sampler()(logits, _info([p], outputs=[[1]], eos={2})).item() not in (2, 4)
    assert Sampler()(logits, _info([p], outputs=[[1, 1]], eos={2})).item() == 2
    p_ignore = _sp(temperature=0, min_new_tokens=2, max_new_tokens=5, ignore_eos=True)
    assert Sampler()(logits, _info([p_ignore], outputs=[[1]], eos={2})).item() == 2


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.zeros(1, V)
    assert Sampler()(logits, _info([_sp(logit_bias={"4": 100.0})])).item() == 4
    logits = torch.tensor([[5.0, 0, 0, 0, 0, 0]])
    assert Sampler()(logits, _info([_sp(temperature=0, logit_bias={0: -100})])).item() != 0


@pytest.mark.parametrize(
    "bad,word",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 3}, "min_new_tokens"),
        ({"stop_token_ids": [V]}, "stop_token_ids"),
        ({"logit_bias": {"99": 1.0}}, "logit_bias"),
        ({"stop_regex": "("}, "stop_regex"),
        ({"n": 0}, "n"),
    ],
)
def test_invalid_values_are_value_errors(bad, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams.from_dict(bad).validate(V)


@pytest.mark.parametrize(
    "bad,word",
    [({"temprature": 0.5}, "temperature"), ({"max_new_tokens": 1.5}, "max_new_tokens"), ({"stop": 3}, "stop"), ({"ignore_eos": 1}, "ignore_eos")],
)
def test_wrong_keys_and_types_are_type_errors(bad, word):
    with pytest.raises(TypeError, match=word):
        SamplingParams.from_dict(bad)


def test_type_checks_skip_only_defaults_that_already_have_their_type():
    """from_dict type-checks only the fields the caller named (SamplingParams._check_types):
    valid only while every default already has its checked type, a float field's a float."""
    from pipeline_infer.sampling_params import _BOOL_FIELDS, _FLOAT_FIELDS, _INT_FIELDS

    defaults = SamplingParams()
    assert all(type(getattr(defaults, f)) is int for f in _INT_FIELDS)
    assert all(type(getattr(defaults, f)) is float for f in _FLOAT_FIELDS)
    assert all(type(getattr(defaults, f)) is bool for f in _BOOL_FIELDS)
    # Several bad fields: the first in check order is reported, whatever the dict's order.
    with pytest.raises(TypeError, match="'max_new_tokens' must be an int"):
        SamplingParams.from_dict({"ignore_eos": 1, "top_p": "x", "max_new_tokens": 1.5})
    with pytest.raises(TypeError, match="'top_p' must be a number"):
        SamplingParams.from_dict({"ignore_eos": 1, "top_p": "x"})
    # A copy of an instance names every field: all checked and normalized.
    p = SamplingParams.from_dict(SamplingParams(temperature=0, top_p=1))
    assert type(p.temperature) is float and type(p.top_p) is float
    with pytest.raises(TypeError, match="'n' must be an int"):
        SamplingParams.from_dict(SamplingParams(n=True))


def test_normalisation():
    p = SamplingParams.from_dict({"stop": "###", "stop_regex": r"\d+", "temperature": 1})
    assert p.stop == ["###"] and p.stop_regex == [r"\d+"] and isinstance(p.temperature, float)
    assert SamplingParams.from_dict(p) is not p and SamplingParams.from_dict(p) == p


def test_seeded_rows_sample_the_distribution():
    """Across many seeds, seeded draws follow the same softmax as unseeded ones."""
    n = 40000
    logits = torch.tensor(LOGITS, dtype=torch.float32).repeat(n, 1)
    toks = Sampler()(logits, _info([_sp(temperature=1.0)] * n, seeds=list(range(n))))
    freq = torch.bincount(toks, minlength=V).float() / n
    assert torch.allclose(freq, torch.softmax(torch.tensor(LOGITS), -1), atol=0.01)


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-24])
def test_extreme_uniforms_never_pick_a_masked_token(monkeypatch, u):
    # top_k=2 leaves tokens 0 and 1; a draw at either end of [0, 1) must land on one of them,
    # whichever end the masked (zero-probability) tokens sit at.
    monkeypatch.setattr(Sampler, "_uniforms", staticmethod(lambda info, device: torch.full((len(info.seeds),), u)))
    for row in (LOGITS, LOGITS[::-1]):
        logits = torch.tensor([row], dtype=torch.float32)
        tok = Sampler()(logits, _info([_sp(temperature=1.0, top_k=2)])).item()
        assert tok in set(torch.tensor(row).topk(2).indices.tolist())


@pytest.mark.parametrize("candidates", [1, 3, 5])
def test_candidate_truncation_equals_full_sort(monkeypatch, candidates):
    """top-k / top-p over the top candidates only (full sort for rows that reach past them) keeps
    exactly what sorting the whole row keeps, row by row, in a batch mixing every case."""
    from pipeline_infer import sampler as sampler_mod

    torch.manual_seed(3)
    B = 60
    logits = torch.randn(B, V) * 2
    params = []
    for i in range(B):
        kind = i % 7  # top-p only, top-k only, both, neither (passes through), a greedy row
        params.append(_sp(temperature=0.0 if kind == 6 else 1.0, top_k=[-1, 2, 4, -1, 3, -1, -1][kind],
                          top_p=[0.3, 1.0, 0.9, 0.95, 0.5, 1.0, 1.0][kind], min_p=0.05 if i % 4 == 0 else 0.0))
    info = _info(params)
    probs = torch.softmax(logits, -1)
    monkeypatch.setattr(sampler_mod, "_TOP_CANDIDATES", V)  # V is not below it: the full-sort path
    full = Sampler._truncate(probs, info)
    monkeypatch.setattr(sampler_mod, "_TOP_CANDIDATES", candidates)
    torch.testing.assert_close(Sampler._truncate(probs, info), full, rtol=0, atol=0)


def _assert_same_info(a: SamplingBatchInfo, b: SamplingBatchInfo) -> None:
    for f in dataclasses.fields(SamplingBatchInfo):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert x is not None and y is not None and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def _argmax_only(reqs) -> bool:
    """The model runner's test for SamplingBatchInfo.build's fast path."""
    return all(len(r.output_ids) >= r.argmax_from for r in reqs)


def test_argmax_only_fast_path_equals_the_general_path():
    """Request.argmax_from marks the rows that need nothing but argmax; a batch of only such rows
    takes SamplingBatchInfo.build's fast path, which must give what the general path gives, and
    any other row (mixed into the batch) must send the batch down the general path."""
    eos = frozenset({5})
    kinds = {  # params -> whether a row is a bare argmax once min_new_tokens (if any) is reached
        "greedy": (dict(temperature=0), True),
        "top_k_1": (dict(temperature=1.3, top_k=1), True),
        "greedy_stop_ids": (dict(temperature=0, stop_token_ids=[3]), True),
        "greedy_empty_bias": (dict(temperature=0, logit_bias={}), True),
        "greedy_min_new": (dict(temperature=0, min_new_tokens=2, stop_token_ids=[3]), True),
        "greedy_min_new_ignore_eos": (dict(temperature=0, min_new_tokens=2, ignore_eos=True), True),
        "sampled": (dict(temperature=0.7, top_p=0.9), False),
        "greedy_bias": (dict(temperature=0, logit_bias={"4": 3.0}), False),
        "greedy_penalty": (dict(temperature=0, repetition_penalty=1.2), False),
        "greedy_min_new_never_reached": (dict(temperature=0, min_new_tokens=9, max_new_tokens=20), True),
    }
    rows = []
    for name, (kw, plain) in kinds.items():
        for n_out in range(4):
            r = Request(f"{name}-{n_out}", [0, 1], _sp(**kw), eos_token_ids=eos)
            r.output_ids = [1] * n_out
            assert (len(r.output_ids) >= r.argmax_from) == (plain and n_out >= r.params.min_new_tokens), r.rid
            rows.append(r)
    logits = torch.randn(len(rows), V)
    logits[:, 5] += 4.0  # the eos the min_new_tokens rows must not take yet

    def build(reqs, argmax_only):
        return SamplingBatchInfo.build(
            params=[r.params for r in reqs], prompt_ids=[r.prompt_ids for r in reqs],
            output_ids=[r.output_ids for r in reqs], seeds=[None] * len(reqs), vocab_size=V,
            device=torch.device("cpu"), eos_token_ids=eos, steps=[len(r.output_ids) for r in reqs],
            argmax_only=argmax_only)

    plain = [r for r in rows if _argmax_only([r])]
    assert _argmax_only(plain) and len(plain) == 20
    _assert_same_info(build(plain, True), build(plain, False))
    # Crossing min_new_tokens: banned (a bias) one step, a bare argmax the next.
    before, after = (r for r in rows if r.rid in ("greedy_min_new-1", "greedy_min_new-2"))
    assert not _argmax_only([before]) and build([before], False).bias[0, 5] == float("-inf")
    assert _argmax_only([after]) and build([after], False).bias is None
    # Any non-plain row in the batch: the general path, whose result the batch's rows then get.
    torch.manual_seed(0)
    mixed = Sampler()(logits, build(rows, _argmax_only(rows)))
    assert not _argmax_only(rows)
    torch.manual_seed(0)
    assert torch.equal(mixed, Sampler()(logits, build(rows, False)))
    plain_rows = [i for i, r in enumerate(rows) if _argmax_only([r])]
    assert torch.equal(mixed[plain_rows], logits[plain_rows].argmax(-1))
    assert (mixed[[i for i, r in enumerate(rows) if r.rid == "greedy_min_new-0"]] != 5).all()
