"""Batched sampling: one call turns a step's logits [B, V] into B token ids.

Order of operations (the same as SGLang and vLLM):
  logit_bias -> penalties (repetition, frequency, presence) -> min_new_tokens stop-token mask
  -> structured-output (grammar) mask -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw.

Draws invert the cumulative distribution: one uniform u per row, and the token is the first
whose running sum of (unnormalised, masked) probabilities exceeds u times their total. That is
an exact sample from p, needs no renormalising after the top-k/p/min-p masks, and costs one
cumsum and one search for the whole batch. Seeding is one number per row: a request with
`sampling_seed` takes its u from a hash of (seed, step) computed on the host, so its output does
not depend on what else shares the batch, and a step costs no per-request device work however
many rows are seeded (the operators seed every row of a dataset job).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline_infer.layers.fast_path import use_triton
from pipeline_infer.sampling_params import SamplingParams

_MASK = float("-inf")


@dataclass
class SamplingBatchInfo:
    # The draw's columns; None when every row is greedy (then only argmax runs).
    temperatures: torch.Tensor | None  # [B, 1] float32, 1.0 on greedy rows (they skip the division)
    top_ps: torch.Tensor | None  # [B] float32
    top_ks: torch.Tensor | None  # [B] int64, vocab_size where disabled
    min_ps: torch.Tensor | None  # [B] float32
    greedy: torch.Tensor | None  # [B] bool
    all_greedy: bool
    need_top_p: bool
    need_top_k: bool
    need_min_p: bool
    seeds: list[int | None]
    steps: list[int]  # tokens generated so far per row: the seeded draw's counter
    # Penalties (None when no row uses them).
    output_counts: torch.Tensor | None  # [B, V] counts of generated tokens
    seen_mask: torch.Tensor | None  # [B, V] bool: token in prompt or output (repetition penalty)
    frequency_penalties: torch.Tensor | None  # [B, 1]
    presence_penalties: torch.Tensor | None  # [B, 1]
    repetition_penalties: torch.Tensor | None  # [B, 1]
    # Additive bias: logit_bias and the min_new_tokens ban on stop tokens (None when unused).
    bias: torch.Tensor | None  # [B, V] float32
    # Structured output: True where the row's grammar allows the token (None when no row has one).
    vocab_mask: torch.Tensor | None = None  # [B, V] bool

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        seeds: list[int | None],
        vocab_size: int,
        device: torch.device,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        vocab_bitmask: torch.Tensor | None = None,
        steps: list[int] | None = None,
        argmax_only: bool = False,
    ) -> "SamplingBatchInfo":
        """vocab_bitmask: the host int32 bitmask of structured.fill_bitmask, or None. steps: each
        row's index of the token being sampled (default: its output count; with the overlap
        schedule a token still in flight counts too). argmax_only: the caller knows every row is
        greedy with no penalties, no logit_bias and min_new_tokens reached (Request.argmax_from),
        so the info is the all-greedy one without looking at each row's params."""
        if argmax_only:
            # What the general path below gives for such rows, minus its passes over the batch
            # (several per-row checks, each a Python loop over up to hundreds of rows a step).
            return cls(
                temperatures=None, top_ps=None, top_ks=None, min_ps=None, greedy=None,
                all_greedy=True, need_top_p=False, need_top_k=False, need_min_p=False,
                seeds=list(seeds),
                steps=steps if steps is not None else [len(o) for o in output_ids],
                output_counts=None, seen_mask=None, frequency_penalties=None,
                presence_penalties=None, repetition_penalties=None, bias=None,
                vocab_mask=_vocab_mask(vocab_bitmask, vocab_size, device),
            )
        B, V = len(params), vocab_size
        greedy = [p.is_greedy for p in params]

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        all_greedy = all(greedy)
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_ks = [V if (p.top_k < 0 or p.top_k >= V) else p.top_k for p in params]
        info_penalties = _penalties(params, prompt_ids, output_ids, V, device)
        # An all-greedy step (the common batch-job case) reads none of the draw's columns:
        # skip their host-to-device copies, which are per-step host work.
        return cls(
            temperatures=None if all_greedy else col(temps, torch.float32).view(B, 1),
            top_ps=None if all_greedy else col([p.top_p for p in params], torch.float32),
            top_ks=None if all_greedy else col(top_ks, torch.int64),
            min_ps=None if all_greedy else col([p.min_p for p in params], torch.float32),
            greedy=None if all_greedy else col(greedy, torch.bool),
            all_greedy=all_greedy,
            need_top_p=any(p.top_p < 1.0 for p, g in zip(params, greedy) if not g),
            need_top_k=any(k < V for k, g in zip(top_ks, greedy) if not g),
            need_min_p=any(p.min_p > 0.0 for p, g in zip(params, greedy) if not g),
            seeds=list(seeds),
            steps=steps if steps is not None else [len(o) for o in output_ids],
            **info_penalties,
            bias=_bias(params, output_ids, V, device, eos_token_ids),
            vocab_mask=_vocab_mask(vocab_bitmask, V, device),
        )


def _penalties(params, prompt_ids, output_ids, V, device) -> dict:
    none = dict(output_counts=None, seen_mask=None, frequency_penalties=None,
                presence_penalties=None, repetition_penalties=None)
    if not any(p.has_penalties for p in params):
        return none
    B = len(params)
    counts = torch.zeros(B, V, dtype=torch.float32)
    seen = torch.zeros(B, V, dtype=torch.bool)
    for i, p in enumerate(params):
        if not p.has_penalties:
            continue
        if output_ids[i]:
            out = torch.tensor(output_ids[i], dtype=torch.long)
            counts[i].index_add_(0, out, torch.ones(len(out)))
            seen[i, out] = True
        if p.repetition_penalty != 1.0 and prompt_ids[i]:
            seen[i, torch.tensor(prompt_ids[i], dtype=torch.long)] = True

    def col(name):
        return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32).view(B, 1).to(device)

    return dict(
        output_counts=counts.to(device),
        seen_mask=seen.to(device),
        frequency_penalties=col("frequency_penalty"),
        presence_penalties=col("presence_penalty"),
        repetition_penalties=col("repetition_penalty"),
    )


def _bias(params, output_ids, V, device, eos_token_ids) -> torch.Tensor | None:
    rows: list[tuple[int, list[tuple[int, float]]]] = []
    for i, p in enumerate(params):
        entries = p.logit_bias_items() if p.logit_bias else []  # most rows: no bias, no list to build
        if len(output_ids[i]) < p.min_new_tokens:
            banned = set(p.stop_token_ids or [])
            if not p.ignore_eos:
                banned |= set(eos_token_ids)
            entries += [(t, _MASK) for t in banned if t < V]
        if entries:
            rows.append((i, entries))
    if not rows:
        return None
    bias = torch.zeros(len(params), V, dtype=torch.float32)
    for i, entries in rows:
        for tok, value in entries:
            bias[i, tok] += value
    return bias.to(device, non_blocking=True)  # pageable: staged at once, so no wait for the device


def _vocab_mask(bitmask: torch.Tensor | None, V: int, device: torch.device) -> torch.Tensor | None:
    if bitmask is None:
        return None
    from pipeline_infer.structured import unpack_bitmask

    return unpack_bitmask(bitmask.to(device, non_blocking=True), V)


def _adjusts(info: SamplingBatchInfo) -> bool:
    """Whether adjust_logits would change anything for this batch."""
    return info.output_counts is not None or info.bias is not None or info.vocab_mask is not None


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) of [B, V] logits: on a GPU our Triton kernel, which reads the
    logits at close to copy bandwidth where torch's reduction ran at ~40% of it
    (kernels/triton/argmax.py); the same first-index-of-the-max answer."""
    if use_triton(logits):
        from pipeline_infer.kernels.triton.argmax import row_argmax, takes_layout

        if takes_layout(logits):
            return row_argmax(logits)
    return logits.argmax(dim=-1)


def warm_up_greedy(vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """At start-up, every variant greedy_tokens will launch over rows of vocab_size logits, where
    it takes the Triton kernel (kernels/triton/argmax.py `warm_up`), not in a run's first steps."""
    if use_triton(torch.empty(0, device=device)):
        from pipeline_infer.kernels.triton.argmax import warm_up

        warm_up(vocab_size, dtype, device)


class Sampler:
    def __call__(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        if info.all_greedy and not _adjusts(info):
            # Argmax in the logits' own dtype: the same token as in fp32 (widening keeps the
            # order, ties go to the first index either way), without writing an fp32 copy of
            # [batch, vocab] (155 MB a step at 256 x 151,936) and reading it back.
            return greedy_tokens(logits)
        logits = self.adjust_logits(logits.float(), info)
        if info.all_greedy:
            return greedy_tokens(logits)
        probs = torch.softmax(logits / info.temperatures, dim=-1)
        probs = self._truncate(probs, info)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        # u * total < total strictly (float rounding could reach it), so the token found is
        # one where the running sum rises: a token of non-zero probability.
        target = torch.minimum(self._uniforms(info, probs.device).view(-1, 1) * total,
                               torch.nextafter(total, torch.zeros_like(total)))
        sampled = torch.searchsorted(cdf, target, right=True).view(-1).clamp_(max=probs.shape[-1] - 1)
        return torch.where(info.greedy, greedy_tokens(logits), sampled)

    @staticmethod
    def adjust_logits(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """logit_bias, penalties, the min_new_tokens mask and the grammar mask, in that order."""
        if info.output_counts is not None:
            rep = info.repetition_penalties
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(info.seen_mask, penalised, logits)
            logits = logits - info.frequency_penalties * info.output_counts
            logits = logits - info.presence_penalties * (info.output_counts > 0).float()
        if info.bias is not None:
            logits = logits + info.bias
        if info.vocab_mask is not None:
            logits = torch.where(info.vocab_mask, logits, _MASK)
        return logits

    @staticmethod
    def _truncate(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Zero the tokens outside top-k, top-p and min-p (the kept ones need no renormalising)."""
        if info.need_min_p:
            cut = probs.max(dim=-1, keepdim=True).values * info.min_ps.view(-1, 1)
            probs = probs.masked_fill(probs < cut, 0.0)
        if not (info.need_top_k or info.need_top_p):
            return probs
        V = probs.shape[-1]
        total = probs.sum(dim=-1, keepdim=True)
        top_ks, top_ps = info.top_ks.view(-1, 1), info.top_ps.view(-1, 1)
        # Sorting a whole vocabulary per row is most of a sampling step; the kept tokens are
        # almost always among the few hundred most likely. So rank only the top candidates,
        # and sort in full just the rows whose kept set reaches past them.
        if _TOP_CANDIDATES < V:
            cand_p, cand_idx = probs.topk(_TOP_CANDIDATES, dim=-1)  # sorted, descending
            drop = _dropped(cand_p, top_ks, top_ps, total, info.need_top_p)
            # The drop rule is monotone in rank: a dropped last candidate means every token
            # after it goes too, so the candidates decide the row. Rows with neither top-k nor
            # top-p (greedy ones too: only their argmax is used) keep every token.
            untouched = ((top_ks >= V) & (top_ps >= 1.0)).view(-1)
            decided = drop[:, -1] | untouched
            out = torch.zeros_like(probs).scatter_(-1, cand_idx, cand_p.masked_fill(drop, 0.0))
            out = torch.where(untouched.view(-1, 1), probs, out)
            rest = (~decided).nonzero().view(-1)  # a device sync, just before the step's own one
            if rest.numel():
                kept = _sorted_truncate(probs.index_select(0, rest), top_ks[rest], top_ps[rest], total[rest],
                                        info.need_top_p)
                out.index_copy_(0, rest, kept)
            return out
        return _sorted_truncate(probs, top_ks, top_ps, total, info.need_top_p)

    @staticmethod
    def _uniforms(info: SamplingBatchInfo, device: torch.device) -> torch.Tensor:
        """[B] float32 in [0, 1): the torch generator's for unseeded rows, a hash of (seed, step) for seeded ones."""
        seeded = [(i, _unit(_mix(seed, step))) for i, (seed, step) in enumerate(zip(info.seeds, info.steps))
                  if seed is not None]
        B = len(info.seeds)
        if len(seeded) == B:  # every row seeded (a dataset job): no device RNG call at all
            return torch.tensor([u for _, u in seeded], dtype=torch.float32).to(device, non_blocking=True)
        u = torch.rand(B, device=device, dtype=torch.float32)
        if seeded:
            rows = torch.tensor([i for i, _ in seeded], dtype=torch.long).to(device, non_blocking=True)
            vals = torch.tensor([v for _, v in seeded], dtype=torch.float32).to(device, non_blocking=True)
            u.index_copy_(0, rows, vals)
        return u


# Tokens ranked per row before top-k / top-p (rows whose kept set is longer get a full sort).
_TOP_CANDIDATES = 1024


def _dropped(sorted_p: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, total: torch.Tensor,
             need_top_p: bool) -> torch.Tensor:
    """[B, n] True where the token at that rank goes: rank >= top_k, or (top-p) the mass strictly
    before it already reaches top_p of the row's total (so the first token always stays)."""
    ranks = torch.arange(sorted_p.shape[-1], device=sorted_p.device).view(1, -1)
    drop = ranks >= top_ks
    if need_top_p:
        before = sorted_p.cumsum(dim=-1) - sorted_p
        drop |= before >= top_ps * total
    return drop


def _sorted_truncate(probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, total: torch.Tensor,
                     need_top_p: bool) -> torch.Tensor:
    """probs with the tokens top-k / top-p drop zeroed, ranking each row's whole vocabulary."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = _dropped(sorted_p, top_ks, top_ps, total, need_top_p)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))


def _unit(x: int) -> float:
    """A 63-bit hash as a float32-exact value in [0, 1): its top 24 bits."""
    return (x >> 39) * 2.0**-24


def _mix(seed: int, step: int) -> int:
    """A 63-bit seed for (request seed, step): splitmix64 so nearby seeds give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF
