"""Tokenizer wrapper and the incremental detokenizer with stop-string hold-back.

`IncrementalDetokenizer` turns a stream of token ids into text pieces such that
  * no piece ends inside a multi-byte UTF-8 character (a token that completes only part of one
    is held until the character is whole), and
  * no piece contains text that could still turn out to be the start of a stop string: that tail
    is held back until it either completes the stop string (and is trimmed) or can no longer.
Concatenating the pieces gives the same text as decoding all ids at once, minus the stop string.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

# stop_regex can match text of any length; search this many trailing characters for it.
_REGEX_WINDOW = 1024


class Tokenizer:
    """A Hugging Face tokenizer with the few calls the engine and operators need."""

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        eos = set()
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: set[int] = eos
        # Incremental detokenizing (streams, stop strings) decodes twice per generated token
        # per request on the engine thread. A fast tokenizer's own decode is exactly the Rust
        # backend's decode unless it post-processes (clean_up_tokenization_spaces), and calling
        # the backend directly skips ~2 us of Python wrapping per call (0.74 vs 2.69 us here),
        # about a millisecond per step at 256 running requests.
        backend = getattr(hf_tokenizer, "_tokenizer", None)
        self._backend_decode = (
            backend.decode
            if backend is not None and hasattr(backend, "decode")
            and not getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)
            else None
        )

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> "Tokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids for each text, batched through the fast tokenizer."""
        if not texts:
            return []
        out = self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in out]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids if isinstance(ids, list) else list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if getattr(self.hf, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template: pass plain prompts instead of messages")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        stop_regex: Sequence[str] | None = None,
        no_stop_trim: bool = False,
        incremental: bool = True,
    ):
        """incremental=False: nobody reads the text before the end (a non-streaming request), so
        without stop strings add() only keeps the id and finish() decodes them all at once."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Fast tokenizers always join special tokens the same way; the flag is accepted for
        # API compatibility and only matters to slow tokenizers.
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = [s for s in stop if s]
        self.stop_regex = [re.compile(p) for p in (stop_regex or [])]
        self.no_stop_trim = no_stop_trim
        # Incremental decoding costs two tokenizer calls per token on the engine thread (2.7 us
        # a token, 0.7 ms a step at 256 rows on a 2-core CPU); one decode at the end costs
        # ~0.1 us a token. Stop strings need the text as it grows, so they keep it incremental.
        self._deferred = not incremental and not self.stop and not self.stop_regex
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] is the context already turned into text
        self._read = 0
        self._decoded = ""  # all text decoded so far (before stop trimming)
        self._released = 0  # characters of _decoded handed out by add()
        self.stopped: str | None = None  # the stop string (or regex match) that ended the text
        self._end: int | None = None  # where the final text ends once stopped

    @property
    def deferred_ids(self) -> list[int] | None:
        """The ids list `add` only appends to (text decoded once, at `finish`), or None when it
        decodes as it goes (streaming, stop strings). A caller may append a token to it in
        place of `add` (the engine's decode commit does)."""
        return self.ids if self._deferred else None

    # --- decoding ------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self) -> str:
        # Decode the new tokens together with the previous ones as left context: a piece's
        # text can depend on its neighbour (SentencePiece's leading-space marker, byte fallback).
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if after.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 character: wait for the token that completes it
        if not after.startswith(before):
            # Rare tokenizer normalisation across the boundary: fall back to a full decode.
            full = self._decode(self.ids)
            new = full[len(self._decoded) :]
        else:
            new = after[len(before) :]
        # The tokens just turned into text become the next call's left context.
        self._prefix, self._read = self._read, len(self.ids)
        return new

    # --- public ----------------------------------------------------------------------------
    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now safe to release (possibly "")."""
        if self._deferred:
            self.ids.append(token_id)
            return ""
        if self.stopped is not None:
            return ""
        self.ids.append(token_id)
        new = self._new_text()
        if not new:
            return ""
        search_from = max(0, len(self._decoded) - max((len(s) for s in self.stop), default=1) + 1)
        self._decoded += new
        self._check_stop(search_from)
        return self._release()

    def finish(self) -> str:
        """The held-back text, at the end of the sequence (nothing more can complete a stop)."""
        if self._deferred:
            self._decoded = self._decode(self.ids)
            self._prefix = self._read = len(self.ids)
        elif self.stopped is None:
            rest = self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
            self._decoded += rest  # a trailing incomplete character, if any
            self._read = len(self.ids)
        end = self._final_end()
        out = self._decoded[self._released : end]
        self._released = max(self._released, end)
        return out

    @property
    def text(self) -> str:
        """The complete text so far, with the stop string trimmed once one matched."""
        return self._decoded[: self._final_end()]

    # --- stop strings -----------------------------------------------------------------------
    def _check_stop(self, search_from: int) -> None:
        best: tuple[int, int, str] | None = None  # (start, end, matched)
        for s in self.stop:
            i = self._decoded.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, i + len(s), s)
        if self.stop_regex:
            window = max(0, len(self._decoded) - _REGEX_WINDOW)
            for rx in self.stop_regex:
                m = rx.search(self._decoded, window)
                if m and m.end() > m.start() and (best is None or m.start() < best[0]):
                    best = (m.start(), m.end(), m.group(0))
        if best is not None:
            start, end, matched = best
            self.stopped = matched
            self._end = end if self.no_stop_trim else start

    def _final_end(self) -> int:
        return len(self._decoded) if self._end is None else self._end

    def _release(self) -> str:
        if self.stopped is not None:
            end = self._end
        else:
            end = len(self._decoded) - self._held_back()
        out = self._decoded[self._released : end] if end > self._released else ""
        self._released = max(self._released, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self._decoded
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
