"""Request: one sequence's state from submission to finish. Pure Python, no torch.

Token bookkeeping: `token_ids` = prompt + generated tokens. `num_computed` of them have
their K/V in the cache (in `pages`, page_size tokens a page), or are being computed by a step
already launched. A step feeds token_ids[num_computed : num_computed + n] to the model; when
that reaches the end of `token_ids`, the step's logits sample the next token. The scheduler
appends a PLACEHOLDER for that token as soon as it schedules the step, and the step's commit
fills it in (`fill_token`): with the overlap schedule the next step is scheduled before this
one's token is known, and the model runner takes a placeholder's id from the previous step's
samples on the device. Placeholders are only ever at the end of `token_ids` (at most two: the
token of the step being committed and of the step launched after it) and never in
`output_ids`; finishing drops them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable

from pipeline_infer.sampling_params import SamplingParams


PLACEHOLDER = -1  # a sampled token not yet on the host (see the module docstring)
_NEVER = 1 << 62  # an output count no request reaches
# Positions a decode window may run past a request's last token (scheduler.MAX_SCHEDULER_STEPS).
_WINDOW_ROOM = 16


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "matched": self.matched}
        if self.message is not None:
            d["message"] = self.message
        return d


@dataclass(eq=False)  # identity semantics: requests live in sets and dicts
class Request:
    rid: str
    # The prompt's token ids: copied into token_ids, which holds them from then on (the
    # `prompt_ids` attribute reads them back from there: see the end of this module).
    prompt_ids: InitVar[list[int]]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    context_length: int = 1 << 30
    seed: int | None = None  # per-request sampling seed (already derived for n > 1)
    detokenizer: Any = None  # IncrementalDetokenizer or None (skip_tokenizer_init / input_ids only)
    on_output: Callable[["Request", bool], None] | None = None  # (request, finished) -> None
    # False: on_output is called only once the request finishes (a non-streaming call), not
    # for each of its tokens: a Python call per running request per step saved.
    output_every_step: bool = True
    arrival_time: float = field(default_factory=time.perf_counter)
    # Submitted with others by one generate call (a list of prompts, or n > 1): the "auto"
    # schedule policy runs it as a batch job.
    batch_job: bool = False
    # Structured output: a structured.GrammarState fed every sampled token (None: unconstrained).
    grammar: Any = None
    # Logprobs / hidden states to return: an extra_outputs.ExtraOutputs (None: none asked for).
    extra_outputs: Any = None

    # generation state
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None

    # KV state (owned by the scheduler)
    pages: list[int] = field(default_factory=list)
    # Bumped whenever `pages` changes other than by appending (admission, sharing with the
    # prefix cache, release): the model runner patches its page table from step to step
    # and must rebuild a request's row then.
    pages_version: int = 0
    num_computed: int = 0
    # Leading pages owned by the prefix cache: from the match at admission, then also the pages
    # this request computed and handed to the tree after each prefill chunk. Never freed by it.
    num_shared_pages: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache at admission
    prefix_node: Any = None  # radix node spelling pages[:num_shared_pages], locked while it runs
    num_retractions: int = 0
    sample_row: int = -1  # row of this request's token in its last step's samples (model runner)
    queue_seq: int = -1  # submission order to the scheduler (kept across retractions): its age
    # Scheduler memos, so a step costs O(changes) rather than O(waiting queue): the prefix-cache
    # probe (max_prefix_len, where its match ended, cached tokens, cache stamp) and the batch group key.
    prefix_probe: Any = None
    group_key: Any = None
    # Model-runner memo: pages shared with the first row of its decode group (shared_prefix.py).
    shared_prefix_memo: Any = None

    # output state (owned by the engine core)
    output_text: str = ""  # text released to the user so far
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self, prompt_ids: list[int]) -> None:
        # The one copy of the prompt a request keeps (generate() hands over the caller's lists
        # as they are): a second list per request cost a pass over its ids to make, and each
        # collection of the cyclic GC another pass over them (~1,100 a prompt in the
        # shared-prefix workload).
        self.token_ids: list[int] = list(prompt_ids)
        self.prompt_len: int = len(self.token_ids)
        # Output count from which sampling this request's next token is a bare argmax (greedy,
        # no penalties, no logit_bias, min_new_tokens reached); never when it is not greedy or
        # has penalties or a bias. Worked out once here (a request's params do not change), so a
        # step of such requests can skip the per-row sampling set-up (SamplingBatchInfo.build).
        p = self.params
        plain = p.is_greedy and not p.has_penalties and not p.logit_bias
        self.argmax_from: int = p.min_new_tokens if plain else _NEVER
        # Token count (prompt + generated, in flight included) at which decoding stops by
        # length: max_new_tokens or the context, whichever comes first. Neither changes.
        self.decode_end: int = min(self.prompt_len + p.max_new_tokens, self.context_length)
        # For the scheduler's decode commit (Scheduler._commit_decodes), worked out once too:
        # the tokens that stop it (from its first token on: min_new_tokens is 0), and whether
        # a token that is neither one of those nor its last by length only needs appending:
        # no grammar to feed, no text to grow as it goes (no detokenizer, or one that decodes
        # once at the end: its ids are appended here too).
        self.stop_tokens: frozenset[int] = frozenset(p.stop_token_ids or ()) | (
            frozenset() if p.ignore_eos else frozenset(self.eos_token_ids)
        )
        det = self.detokenizer
        self.deferred_ids: list[int] | None = det.deferred_ids if det is not None else None
        self.plain_commit: bool = (
            self.grammar is None and p.min_new_tokens == 0 and p.max_new_tokens > 0
            and (det is None or self.deferred_ids is not None)
        )
        # Whether its decode steps may run in a window of several steps from one schedule
        # (Scheduler._window_steps): sampling that needs nothing from the host between steps (no
        # penalties or min_new_tokens, which count the outputs; no grammar, whose mask follows
        # each token; a logit_bias is the same every step), nothing to return but its final
        # result (the scheduler clears it for one that streams: Scheduler.add), and room in the
        # context for a window's steps past its last token (their samples are dropped, but their
        # positions must exist).
        self.window_ok: bool = not self.needs_sync and self.decode_end + _WINDOW_ROOM <= self.context_length

    # --- sizes -----------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.output_ids)

    @property
    def max_prefix_len(self) -> int:
        """Tokens the prefix cache may supply: all but the last (its logits sample the next token),
        and none from the first position whose logprobs or hidden states are still to be returned."""
        n = self.num_tokens - 1
        if self.extra_outputs is not None:
            n = min(n, self.extra_outputs.first_pending_position)
        return n

    @property
    def remaining_new_tokens(self) -> int:
        """Upper bound on tokens still to generate (max_new_tokens and the context both cap it)."""
        by_params = self.params.max_new_tokens - self.num_output
        by_context = self.context_length - self.num_tokens
        return max(0, min(by_params, by_context))

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    # --- generation --------------------------------------------------------------
    @property
    def needs_sync(self) -> bool:
        """Whether sampling its next token needs its previous one on the host first: penalties
        and min_new_tokens count the generated tokens, a grammar must accept each token before
        the next mask, logprobs / hidden states come back with the token (no overlap schedule)."""
        p = self.params
        return (
            p.has_penalties or p.min_new_tokens > 0 or self.grammar is not None or self.extra_outputs is not None
        )

    def fill_token(self, position: int, token_id: int) -> None:
        """Put the token sampled for `position` in place of its placeholder, record it as output
        and decide whether the request is done."""
        p = self.params
        if p.max_new_tokens == 0:  # a prompt-only request (prompt logprobs, hidden states): done
            return self.finish(FinishReason("length", None))
        # Called for every running request every step: lists and sizes are read into locals
        # once rather than through the properties (num_output, prompt_len) again and again.
        output_ids, token_ids, grammar, detokenizer = self.output_ids, self.token_ids, self.grammar, self.detokenizer
        assert position == self.prompt_len + len(output_ids) and token_ids[position] == PLACEHOLDER, (
            f"{self.rid}: token for position {position} does not fill the first placeholder"
        )
        output_ids.append(token_id)
        token_ids[position] = token_id
        num_output = len(output_ids)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        grammar_ok = grammar is None or grammar.accept(token_id)
        stop_token = num_output >= p.min_new_tokens and (
            (p.stop_token_ids is not None and token_id in p.stop_token_ids)
            or (not p.ignore_eos and token_id in self.eos_token_ids)
        )
        # A stop token stays in output_ids (as in SGLang) but its text is trimmed unless no_stop_trim.
        if detokenizer is not None and (not stop_token or p.no_stop_trim):
            self.output_text += detokenizer.add(token_id)
        if stop_token:
            return self.finish(FinishReason("stop", token_id))
        if not grammar_ok:  # only when another constraint (e.g. min_new_tokens) overrode the grammar
            return self.finish(FinishReason("abort", None, f"structured output: token {token_id} breaks the grammar"))
        if grammar is not None and grammar.is_terminated():
            return self.finish(FinishReason("stop", token_id))
        # Stop strings end a request even before min_new_tokens: the detokenizer has already
        # withheld the match, and emitting past it would break the stream's contract.
        if detokenizer is not None and detokenizer.stopped is not None:
            return self.finish(FinishReason("stop", detokenizer.stopped))
        if num_output >= p.max_new_tokens or position + 1 >= self.context_length:
            return self.finish(FinishReason("length", None))

    def finish(self, reason: FinishReason) -> None:
        if self.is_finished:
            return
        # Tokens of steps still in flight are dropped with their placeholders.
        del self.token_ids[self.prompt_len + len(self.output_ids) :]
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()
        if self.detokenizer is not None and self.detokenizer.stopped is None:
            self.output_text += self.detokenizer.finish()
        elif self.detokenizer is not None:
            self.output_text = self.detokenizer.text


# The prompt's ids, a fresh list from token_ids (penalties, prompt logprobs and the like read
# them; none on a step's hot path). Set after the dataclass is made: as a class attribute in
# its body the property would be taken for the `prompt_ids` init argument's default.
Request.prompt_ids = property(lambda self: self.token_ids[: self.prompt_len], doc="The prompt's token ids (a copy).")
