"""The model runner's side of logprobs and hidden states, for one step.

`StepExtras.plan(chunks)` says which rows of the step's hidden states are wanted (prompt
positions whose logits give prompt logprobs; positions whose hidden state is returned) and which
sampling rows report the sampled token's logprob. `collect` computes all of it on the device,
appends it to the sampled tokens and fetches everything in one transfer, so a step keeps its one
host synchronisation, then records it into each request's ExtraOutputs.

Logprobs are log_softmax of the raw logits (before logit_bias, penalties, the grammar mask,
temperature and top-k/top-p/min-p): the model's own distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline_infer.extra_outputs import ExtraOutputs
    from pipeline_infer.scheduler import ScheduledChunk

# Prompt-logprob rows turned into full-vocabulary logits at a time (bounds the extra memory).
_PROMPT_BLOCK_ROWS = 256


class StepExtras:
    def __init__(self) -> None:
        self.prompt_rows: list[int] = []  # rows of the step's hidden states
        self.prompt_targets: list[int] = []  # the token each of those rows' logits is scored on
        self.prompt_owners: list[tuple["ExtraOutputs", int]] = []  # (request outputs, rows) in order
        self.prompt_k = 0
        self.hidden_rows: list[int] = []
        self.hidden_owners: list[tuple["ExtraOutputs", int]] = []
        self.out_rows: list[int] = []  # indices among the sampling rows
        self.out_owners: list["ExtraOutputs"] = []
        self.out_k = 0

    @classmethod
    def plan(cls, chunks: list["ScheduledChunk"]) -> "StepExtras | None":
        """What this step must compute beyond the sampled tokens; None when nothing."""
        if all(c.req.extra_outputs is None for c in chunks):
            return None
        plan = cls()
        offset = 0  # row of the chunk's first token in the step's flattened hidden states
        sample_row = 0
        for c in chunks:
            ex = c.req.extra_outputs
            end = c.start + c.length
            if ex is not None:
                if ex.wants_prompt_logprobs:
                    pos = ex.next_prompt_logprob_pos
                    assert c.start <= pos, "prompt-logprob positions were skipped (prefix cache past max_prefix_len)"
                    hi = min(end, ex.prompt_len - 1)
                    if hi > pos:
                        plan.prompt_rows.extend(range(offset + pos - c.start, offset + hi - c.start))
                        plan.prompt_targets.extend(c.req.token_ids[pos + 1 : hi + 1])
                        plan.prompt_owners.append((ex, hi - pos))
                        plan.prompt_k = max(plan.prompt_k, ex.top_logprobs_num)
                if ex.return_hidden_states:
                    pos = ex.num_hidden
                    assert c.start <= pos, "hidden-state positions were skipped (prefix cache past max_prefix_len)"
                    if end > pos:
                        plan.hidden_rows.extend(range(offset + pos - c.start, offset + end - c.start))
                        plan.hidden_owners.append((ex, end - pos))
                if c.samples and ex.return_logprob and c.req.params.max_new_tokens > 0:
                    plan.out_rows.append(sample_row)
                    plan.out_owners.append(ex)
                    plan.out_k = max(plan.out_k, ex.top_logprobs_num)
            offset += c.length
            sample_row += int(c.samples)
        if not (plan.prompt_rows or plan.hidden_rows or plan.out_rows):
            return None
        return plan

    @property
    def needs_hidden_states(self) -> bool:
        """Whether the step needs the model's hidden states (not just the sampling logits)."""
        return bool(self.prompt_rows or self.hidden_rows)

    def collect(
        self, model, hidden: torch.Tensor | None, logits: torch.Tensor | None, tokens: torch.Tensor
    ) -> list[int]:
        """Compute, fetch (one transfer, with the sampled tokens) and record; the sampled tokens."""
        dev = tokens.device
        parts: list[torch.Tensor] = [tokens]
        if self.out_rows:
            idx = _index(self.out_rows, dev)
            parts += _score(logits[idx].float(), tokens[idx], self.out_k)
        for b in range(0, len(self.prompt_rows), _PROMPT_BLOCK_ROWS):
            rows = _index(self.prompt_rows[b : b + _PROMPT_BLOCK_ROWS], dev)
            targets = _index(self.prompt_targets[b : b + _PROMPT_BLOCK_ROWS], dev)
            parts += _score(model.compute_logits(hidden[rows]).float(), targets, self.prompt_k)
        if self.hidden_rows:
            parts.append(hidden[_index(self.hidden_rows, dev)])
        # float32 holds token ids exactly (< 2**24) and bf16/fp16 hidden states losslessly.
        host = torch.cat([p.reshape(-1).float() for p in parts]).cpu().numpy()
        return self._record(host, len(tokens), hidden.shape[-1] if hidden is not None else 0)

    def _record(self, host: np.ndarray, num_tokens: int, hidden_size: int) -> list[int]:
        at = 0

        def take(n: int) -> np.ndarray:
            nonlocal at
            out = host[at : at + n]
            at += n
            return out

        sampled = take(num_tokens).astype(np.int64).tolist()
        if self.out_rows:
            n, k = len(self.out_rows), self.out_k
            chosen = take(n)
            top_v = take(n * k).reshape(n, k) if k else None
            top_i = take(n * k).reshape(n, k).astype(np.int64) if k else None
            for j, ex in enumerate(self.out_owners):
                ex.add_output_logprob(
                    float(chosen[j]), top_v[j] if k else None, top_i[j] if k else None
                )
        if self.prompt_rows:
            k = self.prompt_k
            values, top_values, top_ids = [], [], []
            for b in range(0, len(self.prompt_rows), _PROMPT_BLOCK_ROWS):
                n = min(_PROMPT_BLOCK_ROWS, len(self.prompt_rows) - b)
                values.append(take(n))
                if k:
                    top_values.append(take(n * k).reshape(n, k))
                    top_ids.append(take(n * k).reshape(n, k).astype(np.int64))
            vals = np.concatenate(values)
            tv = np.concatenate(top_values) if k else None
            ti = np.concatenate(top_ids) if k else None
            row = 0
            for ex, n in self.prompt_owners:
                ex.add_prompt_logprobs(
                    vals[row : row + n], tv[row : row + n] if k else None, ti[row : row + n] if k else None
                )
                row += n
        if self.hidden_rows:
            rows = take(len(self.hidden_rows) * hidden_size).reshape(-1, hidden_size)
            row = 0
            for ex, n in self.hidden_owners:
                ex.add_hidden(rows[row : row + n].copy())
                row += n
        return sampled


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def _score(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[torch.Tensor]:
    """[logprob of each row's target] (+ [top-k logprobs, their ids], most likely first)."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = [logits.gather(1, targets.view(-1, 1)) - lse]
    if k:
        values, ids = logits.topk(k, dim=-1)
        out += [values - lse, ids]
    return out
