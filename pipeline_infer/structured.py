"""Structured output with xgrammar: `json_schema`, `regex` and `ebnf` sampling parameters.

- `GrammarCache` compiles each distinct (kind, spec) once, on the caller's thread when the
  request is made, and keeps the compiled grammars in an LRU; a spec that does not compile is a
  ValueError for that generate call (nothing reaches the engine thread, which keeps serving).
- Each request gets its own `GrammarState` (an xgrammar GrammarMatcher): per step the runner asks
  it for the allowed-token bitmask (`fill_bitmask`, on the host, while the forward pass runs on
  the device); the sampler unpacks the batch's bitmask on the device and masks the logits
  (`unpack_bitmask`); `Request.fill_token` feeds it the sampled token.
- JSON is compact by default (`", "` and `": "` between tokens, no other whitespace):
  `Engine(constrained_json_disable_any_whitespace=False)` allows any whitespace, SGLang's default,
  with which small models at temperature 1 often emit whitespace until max_new_tokens runs out
  (SmolLM2-135M: 9 of 50 samples of a small schema unfinished at 128 tokens, even with runs of
  whitespace capped at 8 characters; 0 of 50 compact).
- The grammar ends on one of the engine's EOS tokens; the request then finishes with
  `finish_reason = {"type": "stop", ...}`. Reaching `max_new_tokens` first leaves the output
  incomplete (finish_reason "length"), as in SGLang.

Needs the `xgrammar` package: `pip install "pipeline-infer[structured]"`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Sequence

import torch

KINDS = ("json_schema", "regex", "ebnf")
_CACHE_SIZE = 256


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError(
            "structured output (json_schema / regex / ebnf) needs the xgrammar package: "
            "pip install 'pipeline-infer[structured]'"
        ) from None
    return xgrammar


class GrammarCache:
    """Compiled grammars for one tokenizer, one per distinct spec, least recently used evicted."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], any_whitespace: bool = True):
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None
        )
        # xgrammar's own cache is off: ours bounds the count and tells tests what it compiled.
        self._compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=False)
        self.vocab_size = vocab_size
        self.any_whitespace = any_whitespace
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0  # compilations done (cache misses), a statistic

    def compile(self, kind: str, spec: str) -> Any:
        """The compiled grammar for spec; ValueError naming the problem when it does not compile."""
        key = (kind, spec)
        with self._lock:  # one compile at a time; concurrent callers of the same spec wait for it
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
            try:
                if kind == "json_schema":
                    compiled = self._compiler.compile_json_schema(spec, any_whitespace=self.any_whitespace)
                elif kind == "regex":
                    compiled = self._compiler.compile_regex(spec)
                elif kind == "ebnf":
                    compiled = self._compiler.compile_grammar(spec)
                else:
                    raise ValueError(f"unknown grammar kind {kind!r}; expected one of {KINDS}")
            except RuntimeError as exc:  # xgrammar reports every parse / conversion error so
                raise ValueError(f"invalid {kind} for structured output: {_first_line(exc)}") from None
            self.num_compiled += 1
            self._compiled[key] = compiled
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
            return compiled

    def state_for(self, params: Any) -> "GrammarState | None":
        """A fresh matcher for a request's sampling params, or None when it has no constraint."""
        for kind in KINDS:
            spec = getattr(params, kind, None)
            if spec is not None:
                return GrammarState(_xgrammar().GrammarMatcher(self.compile(kind, spec)))
        return None


class GrammarState:
    """One request's position in its grammar."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False when the grammar does not allow it."""
        return bool(self.matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def fill_bitmask(grammars: Sequence["GrammarState | None"], vocab_size: int) -> torch.Tensor | None:
    """Host int32 bitmask [B, ceil(V / 32)] of the allowed tokens per row (all allowed where no
    grammar, or where the grammar has already ended); None when no row has a grammar."""
    if grammars.count(None) == len(grammars):  # at C speed: every sampling step asks
        return None
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(grammars), words), -1, dtype=torch.int32)
    for i, g in enumerate(grammars):
        if g is not None and not g.is_terminated():
            g.fill(bitmask, i)
    return bitmask


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [B, V], True where allowed, from the int32 bitmask (bit j of word w is token 32w + j)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _first_line(exc: Exception) -> str:
    """xgrammar errors start with a C++ source location: keep the message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "] " in text and text.startswith("["):
        text = text.split("] ", 1)[1]
    if ": " in text and ".cc:" in text.split(": ", 1)[0]:
        text = text.split(": ", 1)[1]
    if text.startswith("Check failed:") and " is false: " in text:
        text = text.split(" is false: ", 1)[1]
    return text
