"""The floor under an offline workload: the least time the hardware allows, from first principles.

Two phases, each bounded by the slower of its memory traffic and its arithmetic:

- prefill: every prompt token not already computed (a shared prefix counts once when the
  radix cache is on) costs 2 FLOPs per matmul weight, plus causal attention
  (2 matmuls x 2 FLOPs x q_heads x head_dim per token pair); at the measured bf16 matmul rate.
- decode: each step reads every weight once (the embedding table only where it doubles as
  the LM head) and the KV of every running sequence, a prefix that running sequences share
  once when the radix cache is on (as cascade attention can); continuous batching with at most
  `max_running` sequences, admitted in order. A step's time is the larger of those bytes at
  the measured copy bandwidth and its FLOPs at the matmul rate.

floor = prefill + decode. Real engines overlap a little of the two (mixed batches), so this is
a floor in spirit rather than a strict bound; it ignores launch overhead, sampling and
everything on the host, which is exactly what "% of floor" should expose.
"""

from __future__ import annotations

from dataclasses import dataclass

BF16 = 2  # bytes


@dataclass
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        q_heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type", "")
        return cls(
            vocab=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            q_heads=q_heads,
            kv_heads=cfg.get("num_key_value_heads") or q_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // q_heads,
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        q, kv = self.q_heads * d, self.kv_heads * d
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0) + (2 * d if self.qk_norm else 0)
        return attn + 3 * h * self.intermediate + 2 * h

    def total_params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params() + self.hidden + embed + (0 if self.tied_embeddings else embed)

    def decode_weight_bytes(self) -> int:
        """Weights one decode step reads: all layers, final norm, LM head (not embedding rows)."""
        return BF16 * (self.layers * self.layer_params() + self.hidden + self.vocab * self.hidden)

    def matmul_params(self) -> int:
        """Weights that take part in a token's matmuls (the LM head only for sampling rows)."""
        return self.layers * self.layer_params()

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * BF16

    def attention_flops(self, new: int, cached: int) -> float:
        """Causal attention FLOPs for `new` tokens after `cached` ones, all layers."""
        pairs = new * cached + new * (new + 1) / 2
        return self.layers * 4.0 * self.q_heads * self.head_dim * pairs


def unique_prefill_tokens(prompts: list[list[int]]) -> int:
    """Tokens a perfect prefix cache computes: the node count of a trie of the prompts."""
    ordered = sorted(tuple(p) for p in prompts)
    total, prev = 0, ()
    for p in ordered:
        lcp = 0
        for a, b in zip(p, prev):
            if a != b:
                break
            lcp += 1
        total += len(p) - lcp
        prev = p
    return total


def shared_prefix_lens(prompts: list[list[int]]) -> list[int]:
    """Per prompt: its longest common prefix with any other prompt (its neighbours in sorted order)."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    shared = [0] * len(prompts)
    for a, b in zip(order, order[1:]):
        n = 0
        for x, y in zip(prompts[a], prompts[b]):
            if x != y:
                break
            n += 1
        shared[a], shared[b] = max(shared[a], n), max(shared[b], n)
    return shared


def floor_seconds(
    shape: ModelShape,
    requests: list[tuple[list[int], int]],
    max_running: int,
    copy_bytes_per_s: float,
    matmul_flops_per_s: float,
    prefix_sharing: bool = True,
) -> dict:
    prompts = [p for p, _ in requests]
    tokens = unique_prefill_tokens(prompts) if prefix_sharing else sum(len(p) for p in prompts)
    # Attention cost per prompt as if computed alone (a cached prefix still costs its pairs
    # for the new tokens; this slightly over-counts shared prefixes' own attention).
    attn = sum(shape.attention_flops(len(p), 0) for p in prompts)
    lm_head = 2.0 * shape.vocab * shape.hidden * len(requests)
    prefill_flops = 2.0 * shape.matmul_params() * tokens + attn + lm_head
    prefill_s = prefill_flops / matmul_flops_per_s

    # Decode: the first output token comes from prefill; output_len - 1 decode steps each.
    weights = shape.decode_weight_bytes()
    kv_tok = shape.kv_bytes_per_token()
    step_flops_per_seq = 2.0 * (shape.matmul_params() + shape.vocab * shape.hidden)
    # With prefix sharing, a step reads a prefix that running sequences share once: each
    # sequence's KV less its shared prefix, plus each distinct shared prefix once (one level of
    # sharing, as in the shared-prefix workload; deeper trees are counted by their longest level).
    shared = shared_prefix_lens(prompts) if prefix_sharing else [0] * len(prompts)
    pending = [(len(p), o - 1, tuple(p[:n]) if n else None) for (p, o), n in zip(requests, shared) if o > 1]
    pending.reverse()  # pop() admits in submission order
    running: list[list] = []  # [context length, steps left, shared prefix or None]
    decode_s, steps = 0.0, 0
    while pending or running:
        while pending and len(running) < max_running:
            ctx, left, prefix = pending.pop()
            running.append([ctx + 1, left, prefix])
        prefixes = {r[2] for r in running if r[2] is not None}
        kv_tokens = sum(r[0] - (len(r[2]) if r[2] else 0) for r in running) + sum(map(len, prefixes))
        kv = kv_tokens * kv_tok
        flops = len(running) * step_flops_per_seq + sum(shape.attention_flops(1, r[0]) for r in running)
        decode_s += max((weights + kv) / copy_bytes_per_s, flops / matmul_flops_per_s)
        steps += 1
        for r in running:
            r[0] += 1
            r[1] -= 1
        running = [r for r in running if r[1] > 0]
    return {"prefill_s": prefill_s, "decode_s": decode_s, "floor_s": prefill_s + decode_s,
            "decode_steps": steps, "prefill_tokens": tokens}
