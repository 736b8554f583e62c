"""Per-request logprobs and hidden states: what a request asked for, what the runner collected,
and how it appears in `meta_info` (SGLang's keys and shapes).

Semantics (SGLang's, except where noted):
- `return_logprob=True` adds `input_token_logprobs` and `output_token_logprobs`: lists of
  `(logprob, token_id, text)` tuples; `text` is None unless `return_text_in_logprobs=True`.
- `logprob_start_len` (default -1, i.e. only the output) is the first prompt position reported:
  `input_token_logprobs` covers `prompt[logprob_start_len:]` and, as in SGLang, its first entry's
  logprob is always None (with the default, that is the one entry: the last prompt token).
  Entry j > 0 is log p(prompt[s + j] | prompt[:s + j]).
- `top_logprobs_num=k` adds `input_top_logprobs` / `output_top_logprobs`: per position a list of
  the k most likely `(logprob, token_id, text)`, most likely first (None at the first input position).
- Logprobs are of the model's own next-token distribution: log_softmax of the raw logits, before
  logit_bias, penalties, the structured-output mask, temperature, top-k, top-p and min-p.
- `return_hidden_states=True` (needs `Engine(enable_return_hidden_states=True)`) adds
  `hidden_states`: `[prompt_matrix, h_1, ..., h_{n-1}]` for n generated tokens, where
  `prompt_matrix` is `[prompt_tokens][hidden_size]` and `h_i` the `[hidden_size]` vector of the
  i-th generated token when it was fed back. The last generated token is never fed, so it has
  none (SGLang's layout). They are the final layer's output after the final norm, i.e. what
  Hugging Face reports as `output_hidden_states=True`'s `hidden_states[-1]`, and what the LM head
  reads.

Prompt positions whose logprobs or hidden states are wanted are recomputed even when the prefix
cache holds them (`Request.max_prefix_len`); a request that asks for none pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

_NOTHING_PENDING = 1 << 62


@dataclass
class ExtraOutputs:
    """One request's logprob / hidden-state options and what the runner collected so far.

    Written only on the engine thread (by the model runner, in position order); read by the
    front end, which copies what it needs (lists only ever grow).
    """

    prompt_len: int
    return_logprob: bool = False
    logprob_start_len: int = 0  # resolved: in [0, prompt_len - 1]
    top_logprobs_num: int = 0
    return_hidden_states: bool = False
    tokenizer: Any = None  # set when logprob entries carry text

    # collected: prompt logprobs for positions logprob_start_len + 1 ... prompt_len - 1
    input_logprobs: list[float] = field(default_factory=list)
    input_top: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    # collected: one per generated token
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    # collected: hidden-state rows for positions 0 ... num_hidden - 1, in chunks
    hidden_chunks: list[np.ndarray] = field(default_factory=list)
    num_hidden: int = 0

    # --- what the runner still has to compute --------------------------------------------
    @property
    def next_prompt_logprob_pos(self) -> int:
        """The next position whose logits give a prompt logprob (of the token after it)."""
        return self.logprob_start_len + len(self.input_logprobs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and self.next_prompt_logprob_pos < self.prompt_len - 1

    @property
    def first_pending_position(self) -> int:
        """The first position the runner must still compute for this request's outputs."""
        pos = _NOTHING_PENDING
        if self.wants_prompt_logprobs:
            pos = self.next_prompt_logprob_pos
        if self.return_hidden_states:
            pos = min(pos, self.num_hidden)
        return pos

    @property
    def needs_prefill(self) -> bool:
        """Whether the prompt must run even with max_new_tokens=0 (scoring a prompt)."""
        return self.wants_prompt_logprobs or self.return_hidden_states

    # --- recording (engine thread) ----------------------------------------------------------
    def add_prompt_logprobs(self, values: np.ndarray, top_values: np.ndarray | None, top_ids: np.ndarray | None) -> None:
        self.input_logprobs.extend(values.tolist())
        if self.top_logprobs_num:
            k = self.top_logprobs_num
            for v, i in zip(top_values, top_ids):
                self.input_top.append((v[:k], i[:k]))

    def add_output_logprob(self, value: float, top_values: np.ndarray | None, top_ids: np.ndarray | None) -> None:
        self.output_logprobs.append(value)
        if self.top_logprobs_num:
            self.output_top.append((top_values[: self.top_logprobs_num], top_ids[: self.top_logprobs_num]))

    def add_hidden(self, rows: np.ndarray) -> None:
        self.hidden_chunks.append(rows)
        self.num_hidden += rows.shape[0]

    # --- meta_info (front end) ---------------------------------------------------------------
    def meta_info(self, prompt_ids: Sequence[int], output_ids: Sequence[int], start: int, end: int) -> dict[str, Any]:
        """meta_info entries for output tokens [start, end) (streams send slices; results all)."""
        out: dict[str, Any] = {}
        if self.return_logprob:
            s = self.logprob_start_len
            in_ids = list(prompt_ids[s:])
            in_vals: list[float | None] = [None] + self.input_logprobs[: len(in_ids) - 1]
            out_ids = list(output_ids[start:end])
            out_vals = self.output_logprobs[start:end]
            if start > 0:  # a later stream chunk: the prompt's logprobs went out with the first
                in_ids, in_vals = [], []
            out["input_token_logprobs"] = self._entries(in_vals, in_ids)
            out["output_token_logprobs"] = self._entries(out_vals, out_ids[: len(out_vals)])
            if self.top_logprobs_num:
                in_top = [None] + self.input_top[: len(in_ids) - 1] if in_ids else []
                out["input_top_logprobs"] = [self._top(t) for t in in_top]
                out["output_top_logprobs"] = [self._top(t) for t in self.output_top[start:end]]
        if self.return_hidden_states:
            out["hidden_states"] = self._hidden(start, end)
        return out

    def _entries(self, values: Sequence[float | None], ids: Sequence[int]) -> list[tuple]:
        texts = self._texts(ids)
        return [(v, int(t), x) for v, t, x in zip(values, ids, texts)]

    def _top(self, top: tuple[np.ndarray, np.ndarray] | None) -> list[tuple] | None:
        if top is None:
            return None
        values, ids = top
        return self._entries(values.tolist(), ids.tolist())

    def _texts(self, ids: Sequence[int]) -> list[str | None]:
        if self.tokenizer is None:
            return [None] * len(ids)
        hf = getattr(self.tokenizer, "hf", self.tokenizer)
        return [hf.decode([int(t)]) for t in ids]

    def _hidden(self, start: int, end: int) -> list:
        """[prompt matrix] + one vector per generated token fed back, for outputs [start, end)."""
        chunks = list(self.hidden_chunks)  # the engine thread may append meanwhile
        if not chunks:
            return []
        rows = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        p = self.prompt_len
        out: list = []
        if start == 0 and rows.shape[0] >= p:
            out.append(rows[:p].tolist())
        # Generated token i (0-based) is fed at position p + i, and the last one never is: a
        # slice [start, end) of the outputs carries the rows of tokens max(start - 1, 0) ... end - 2,
        # so consecutive stream slices concatenate to the whole.
        lo, hi = p + max(start - 1, 0), min(p + end - 1, rows.shape[0])
        out.extend(r.tolist() for r in rows[lo:hi])
        return out


def build_extra_outputs(
    prompt_len: int,
    return_logprob: bool,
    logprob_start_len: int | None,
    top_logprobs_num: int | None,
    return_hidden_states: bool,
    tokenizer: Any = None,
) -> ExtraOutputs | None:
    """Validated ExtraOutputs for one prompt, or None when it asks for nothing extra."""
    if not return_logprob and not return_hidden_states:
        return None
    start = prompt_len - 1
    k = 0
    if return_logprob:
        if logprob_start_len is not None and logprob_start_len != -1:
            if not 0 <= logprob_start_len < prompt_len:
                raise ValueError(
                    f"logprob_start_len must be -1 (output only) or in [0, {prompt_len - 1}] for a "
                    f"{prompt_len}-token prompt, got {logprob_start_len}"
                )
            start = logprob_start_len
        k = top_logprobs_num or 0
    return ExtraOutputs(
        prompt_len=prompt_len,
        return_logprob=return_logprob,
        logprob_start_len=start,
        top_logprobs_num=k,
        return_hidden_states=return_hidden_states,
        tokenizer=tokenizer,
    )


def per_prompt(value: Any, n: int, name: str, kind: type | tuple[type, ...]) -> list[Any]:
    """Broadcast a generate() argument given once or once per prompt (SGLang allows both)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts: pass one value or one per prompt")
        values = list(value)
    else:
        values = [value] * n
    for v in values:
        if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise TypeError(f"{name} must be {_kind_name(kind)} (or a list of them, one per prompt), got {v!r}")
    return values


def check_top_logprobs_num(k: int | None, vocab_size: int) -> None:
    if k is not None and not 0 <= k <= vocab_size:
        raise ValueError(f"top_logprobs_num must be in [0, {vocab_size}] (the vocabulary size), got {k}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


@dataclass
class OutputArgs:
    """generate()'s logprob / hidden-state arguments, each given once or once per prompt."""

    return_logprob: Any = False
    logprob_start_len: Any = None
    top_logprobs_num: Any = None
    return_hidden_states: Any = False
    return_text_in_logprobs: bool = False

    def resolve(self, prompts_ids: list[list[int]], engine: Any) -> list[dict[str, Any] | None]:
        """Per prompt, validated ExtraOutputs arguments (None where nothing extra is asked)."""
        n = len(prompts_ids)
        want_lp = per_prompt(self.return_logprob, n, "return_logprob", bool)
        starts = per_prompt(self.logprob_start_len, n, "logprob_start_len", int)
        tops = per_prompt(self.top_logprobs_num, n, "top_logprobs_num", int)
        want_hidden = per_prompt(self.return_hidden_states, n, "return_hidden_states", bool)
        if not isinstance(self.return_text_in_logprobs, bool):
            raise TypeError(f"return_text_in_logprobs must be a bool, got {self.return_text_in_logprobs!r}")
        if any(want_hidden) and not engine.config.enable_return_hidden_states:
            raise ValueError(
                "return_hidden_states=True needs an engine created with enable_return_hidden_states=True"
            )
        if self.return_text_in_logprobs and any(want_lp) and engine.tokenizer is None:
            raise ValueError("return_text_in_logprobs needs the model's tokenizer (this engine has none)")
        out: list[dict[str, Any] | None] = []
        for ids, lp, start, k, hidden in zip(prompts_ids, want_lp, starts, tops, want_hidden):
            check_top_logprobs_num(k, engine.vocab_size)
            ex = build_extra_outputs(len(ids), bool(lp), start, k, bool(hidden))  # validates
            if ex is None:
                out.append(None)
                continue
            out.append(
                dict(
                    prompt_len=ex.prompt_len,
                    return_logprob=ex.return_logprob,
                    logprob_start_len=ex.logprob_start_len,
                    top_logprobs_num=ex.top_logprobs_num,
                    return_hidden_states=ex.return_hidden_states,
                    tokenizer=engine.tokenizer if self.return_text_in_logprobs else None,
                )
            )
        return out
