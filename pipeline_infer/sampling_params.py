"""SamplingParams: how one request samples and when it stops.

The field names and defaults are SGLang's (`sampling_params={"temperature": 0.8, "top_p": 0.95}`),
so code written for `sgl.Engine` passes the same dicts here. Every bad value is a ValueError or
TypeError naming the field and what is allowed; the engine rejects the request, not itself.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

# Below this temperature sampling is argmax: dividing logits by ~0 only adds overflow risk.
_GREEDY_EPS = 1e-6


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k cut
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None
    logit_bias: dict[str, float] | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict[str, Any] | None = None

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: "dict[str, Any] | SamplingParams | None") -> "SamplingParams":
        """A fresh, normalized SamplingParams from a user dict (or a copy of an instance)."""
        if d is None:
            d = {}
        elif isinstance(d, SamplingParams):
            d = {name: getattr(d, name) for name in _FIELD_NAMES}
        elif not isinstance(d, dict):
            raise TypeError(f"sampling_params must be a dict or SamplingParams, got {type(d).__name__}")
        names = _FIELD_NAMES
        for key in d:
            if key not in names:
                near = difflib.get_close_matches(str(key), list(names), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise TypeError(f"unknown sampling parameter {key!r}{hint} (valid: {', '.join(names)})")
        params = cls(**{k: _copy(v) for k, v in d.items()})
        params._normalize(d)
        return params

    def _normalize(self, given: "dict[str, Any]") -> None:
        self._check_types(given)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        if self.stop is not None:
            self.stop = [s for s in self.stop]
        if self.stop_token_ids is not None:
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))

    def _check_types(self, given: "dict[str, Any]") -> None:
        """Type checks of the fields named in `given` (the caller's dict). A field left at its
        default is skipped: every default is already of its type (and a float field's default a
        float), so checking it could neither fail nor change it. A batch's dicts name a few fields
        each: the int, float and bool checks of the other ~10 were most of from_dict's cost.
        The order of the checks is unchanged, so the first bad field reported stays the same."""
        for name in _INT_FIELDS:
            if name not in given:
                continue
            v = getattr(self, name)
            if not _is_int(v):
                raise TypeError(f"sampling parameter {name!r} must be an int, got {v!r}")
        for name in _FLOAT_FIELDS:
            if name not in given:
                continue
            v = getattr(self, name)
            if not (_is_int(v) or isinstance(v, float)):
                raise TypeError(f"sampling parameter {name!r} must be a number, got {v!r}")
            setattr(self, name, float(v))
        for name in _BOOL_FIELDS:
            if name not in given:
                continue
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"sampling parameter {name!r} must be a bool, got {v!r}")
        if self.sampling_seed is not None and not _is_int(self.sampling_seed):
            raise TypeError(f"sampling parameter 'sampling_seed' must be an int or None, got {self.sampling_seed!r}")
        for name in ("stop", "stop_regex"):
            v = getattr(self, name)
            if v is None or isinstance(v, str):
                continue
            if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
                raise TypeError(f"sampling parameter {name!r} must be a string or a list of strings, got {v!r}")
            setattr(self, name, list(v))
        if self.stop_token_ids is not None:
            v = self.stop_token_ids
            if isinstance(v, (set, frozenset, tuple)):
                v = list(v)
            if not isinstance(v, list) or not all(_is_int(t) for t in v):
                raise TypeError(f"sampling parameter 'stop_token_ids' must be a list of ints, got {self.stop_token_ids!r}")
            self.stop_token_ids = v
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(f"sampling parameter 'logit_bias' must be a dict token_id -> bias, got {self.logit_bias!r}")
        if isinstance(self.json_schema, dict):  # a schema given as a dict: SGLang takes its JSON text
            self.json_schema = json.dumps(self.json_schema)
        for name in ("json_schema", "regex", "ebnf", "structural_tag"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"sampling parameter {name!r} must be a string, got {type(v).__name__}")

    # --- validation against the model ----------------------------------------------------
    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError on values no model accepts, or token ids outside the vocabulary."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not (0.0 < self.repetition_penalty <= 2.0):
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.stop is not None and any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for pattern in self.stop_regex or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"stop_regex {pattern!r} is not a valid regular expression: {e}") from None
        constraints = [k for k in ("json_schema", "regex", "ebnf", "structural_tag") if getattr(self, k) is not None]
        if len(constraints) > 1:
            raise ValueError(f"only one of json_schema, regex, ebnf, structural_tag may be set, got {constraints}")
        if self.structural_tag is not None:
            raise ValueError("structural_tag is not supported; use json_schema, regex or ebnf")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        for name in ("regex", "ebnf"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must be a non-empty string")
        if vocab_size is not None:
            for t in self.stop_token_ids or []:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"stop_token_ids has {t}, outside the vocabulary [0, {vocab_size})")
        if self.logit_bias:
            for key, bias in self.logit_bias.items():
                tok = _token_key(key)
                if vocab_size is not None and not 0 <= tok < vocab_size:
                    raise ValueError(f"logit_bias has token {key!r}, outside the vocabulary [0, {vocab_size})")
                if not isinstance(bias, (int, float)) or isinstance(bias, bool) or math.isnan(bias):
                    raise ValueError(f"logit_bias[{key!r}] must be a number, got {bias!r}")

    # --- derived ---------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature <= _GREEDY_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    def logit_bias_items(self) -> list[tuple[int, float]]:
        return [(_token_key(k), float(v)) for k, v in (self.logit_bias or {}).items()]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _copy(getattr(self, f.name)) for f in fields(self)}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _copy(v: Any) -> Any:
    if isinstance(v, list):
        return list(v)
    if isinstance(v, dict):
        return dict(v)
    return v


def _token_key(key: Any) -> int:
    """logit_bias keys are token ids, as ints or (JSON-style) decimal strings."""
    if _is_int(key):
        return key
    if isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    raise ValueError(f"logit_bias keys must be token ids (int or decimal string), got {key!r}")


# The fields _check_types checks by kind, each tuple in the order they are checked.
_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "n")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")

# SamplingParams' field names in order (a dict: ordered, and `in` is a hash lookup), built once:
# dataclasses.fields() rebuilds its tuple on every call (from_dict 3.7 -> 2.5 us a request).
_FIELD_NAMES: dict[str, None] = dict.fromkeys(f.name for f in fields(SamplingParams))
