"""What one model step needs to know about its batch, and nothing about requests.

The scheduler decides which tokens run; the model runner turns that decision into this
object; the model and the attention backend read it. Tokens of all sequences are
flattened into one dimension T, sequence after sequence, so linear layers never see
padding. Host-side lists (`extend_lens`, `prefix_lens`) are for planning; tensors live
on the model's device.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipeline_infer.kernels.attention.base import AttentionBackend


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64: absolute position of each new token in its sequence
    extend_lens: list[int]  # new tokens per sequence this step (1 for a decode)
    prefix_lens: list[int]  # tokens of each sequence already in the KV cache before this step
    page_table: torch.Tensor  # [B, max_pages] int32: KV page ids of each sequence, prefix and new
    out_cache_loc: torch.Tensor  # [T] int64: slot (page * page_size + offset) for each new token's K/V
    logits_indices: torch.Tensor  # [N] int64: rows of the hidden states that produce logits
    page_table_host: Any = None  # numpy copy of page_table, for backends that plan on the host
    attn_backend: "AttentionBackend | None" = None
    attn_metadata: Any = None  # whatever the backend's plan() computed for this batch
    extras: dict = field(default_factory=dict)  # e.g. "hidden_states" requests
    # Decode steps: which rows share prefix pages (a shared_prefix.SharedPrefixPlan), or None.
    shared_prefix: Any = None
    # True when the builder knows every row is a one-token decode (spares is_decode its pass).
    decode_only: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]

    @property
    def is_decode(self) -> bool:
        return self.decode_only or all(e == 1 for e in self.extend_lens)


# array typecodes of the int dtypes steps send ('q': 8 bytes, 'i': 4 on every platform torch runs on).
_TYPECODES = {torch.long: "q", torch.int32: "i"}
# The unsigned twin tried first (ints_to_device). int64 only: int32 lists are short (a step's
# attention metadata), and an unsigned 4-byte array would take 2**31..2**32-1 and wrap them,
# where the signed one refuses them.
_UNSIGNED_TYPECODES = {torch.long: "Q"}


def ints_to_device(values: list[int], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A step's list of Python ints as a tensor on the device. Through array.array, whose
    buffer torch wraps without copying: about 4x faster than torch.tensor(list) (1,300 ints:
    14 us against 54 us on a 2-core CPU), which was a step's largest single host cost after
    the Python loops.

    int64 goes through an unsigned array first: CPython converts ints to one ~2.7x faster than
    to a signed one (2-core CPU, 30,000 ints: 132 against 358 us; a 16,384-token mixed step
    sends ~30,000 with its page-table update). A step's ints (token ids, positions, slots, page
    ids, rows) are non-negative and far below 2**63, where the bytes are those of the signed
    array; a negative one (OverflowError) takes the signed conversion."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    unsigned = _UNSIGNED_TYPECODES.get(dtype)
    buffer = None
    if unsigned is not None:
        try:
            buffer = array(unsigned, values)
        except OverflowError:  # a negative value
            pass
    if buffer is None:
        buffer = array(_TYPECODES[dtype], values)
    return to_device(torch.frombuffer(buffer, dtype=dtype), device)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A step's host-built tensor on the device. On CUDA through pinned memory: a copy from
    pageable memory goes through the driver's staging buffers and can make the host wait for
    the device, which stalls the overlap schedule (the next step's host work waits for this
    one's GPU work); a pinned copy is queued and returns, and torch keeps the pinned block
    until the copy has run."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
