"""ExtendGraphRunner's static buffers against the eager forward of the same steps.

Without CUDA the graphs are not captured (capture=False) and a replay runs the forward on the
static, padded batch eagerly, with Triton's interpreter: what is checked is what the graphs
would compute, i.e. the padding (empty sequences, a work list longer than used, tokens past
the step sent to the scratch slot) and the stale values earlier, larger steps leave in the
buffers. On a GPU the captured graphs themselves are checked (marked gpu).
"""


import torch

import random  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from pipeline_infer.cache.kv_pool import KVPool  # noqa: E402
from pipeline_infer.extend_graph import ExtendGraphRunner, token_buckets  # noqa: E402
from pipeline_infer.forward_batch import ForwardBatch  # noqa: E402
from pipeline_infer.kernels.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pipeline_infer.models.qwen2 import Qwen2ForCausalLM  # noqa: E402
from tiny_models import _COMMON, FAMILIES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = 4


class _Runner:
    """The parts of ModelRunner that ExtendGraphRunner reads."""

    def __init__(self, model, backend, page_size, device):
        self.model, self.attn_backend, self.page_size, self.device = model, backend, page_size, torch.device(device)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    config_cls, _, extra = FAMILIES["qwen2"]
    config = config_cls(**{**_COMMON, **extra})
    model = Qwen2ForCausalLM(config).to(DEVICE).eval()
    for p in model.parameters():  # random weights, in a range that keeps activations tame
        torch.nn.init.normal_(p, std=0.05)
    head_dim = config.hidden_size // config.num_attention_heads
    pool = KVPool(config.num_hidden_layers, 200, PAGE, config.num_key_value_heads, head_dim, torch.float32, DEVICE)
    backend = TritonAttentionBackend(pool, config.num_attention_heads, config.num_key_value_heads, head_dim, num_sms=4)
    return model, pool, backend, config


def _batch(backend, pool, rng, extend_lens, prefix_lens, vocab):
    """A step over fresh pages (prefixes hold random K/V already written by earlier steps)."""
    ids, pos, slots, rows, tables = [], [], [], [], []
    for p, e in zip(prefix_lens, extend_lens):
        pages = pool.allocator.alloc(pool.pages_for(p + e))
        tables.append(pages)
        for i in range(p, p + e):
            pos.append(i)
            slots.append(pages[i // PAGE] * PAGE + i % PAGE)
        ids += [rng.randrange(3, vocab) for _ in range(e)]
        rows.append(len(pos) - 1)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return ForwardBatch(
        input_ids=torch.tensor(ids, device=DEVICE), positions=torch.tensor(pos, device=DEVICE),
        extend_lens=list(extend_lens), prefix_lens=list(prefix_lens), page_table=table.to(DEVICE),
        page_table_host=table.numpy(), out_cache_loc=torch.tensor(slots, device=DEVICE),
        logits_indices=torch.tensor(rows, device=DEVICE), attn_backend=backend,
    )


def test_token_buckets():
    assert token_buckets(8448) == [64, 128, 256, 512, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192, 8448]
    assert token_buckets(100) == [64, 100]
    assert token_buckets(64) == [64]


def test_pack_extend_meta_matches_plan():
    _, pool, backend, _ = _setup()
    extend, prefix = [1, 1, 30, 0, 11], [17, 5, 0, 9, 40]
    packed = backend.pack_extend_meta(extend, prefix, max_seqs=8, max_blocks=12)
    meta = torch.from_numpy(packed)
    qo, pre, seq, start, nb = meta.split([9, 8, 12, 12, 1])
    assert qo.tolist() == [0, 1, 2, 32, 32, 43, 43, 43, 43]  # empty sequences past the batch
    assert pre.tolist()[:5] == prefix
    fb = ForwardBatch(input_ids=torch.zeros(43, dtype=torch.long), positions=torch.zeros(43, dtype=torch.long),
                      extend_lens=extend, prefix_lens=prefix, page_table=torch.zeros(5, 16, dtype=torch.int32),
                      out_cache_loc=torch.zeros(43, dtype=torch.long), logits_indices=torch.zeros(0, dtype=torch.long),
                      attn_backend=backend)
    backend.plan(fb)
    md = fb.attn_metadata
    n = int(nb)
    assert n == md.block_seq.numel()
    assert seq[:n].tolist() == md.block_seq.tolist() and start[:n].tolist() == md.block_start.tolist()
    with pytest.raises(ValueError, match="exceeds"):
        backend.pack_extend_meta(extend, prefix, max_seqs=4, max_blocks=12)


def test_replay_equals_the_eager_forward_step_after_step():
    model, pool, backend, config = _setup(1)
    runner = _Runner(model, backend, PAGE, DEVICE)
    graphs = ExtendGraphRunner(runner, max_tokens=160, max_seqs=12, max_context=256, capture=DEVICE == "cuda")
    rng = random.Random(3)
    # A large mixed step first, so the later, smaller ones find its leftovers in the buffers.
    steps = [
        ([1] * 6 + [70, 40], [20, 3, 11, 50, 7, 9, 0, 12]),
        ([33, 1, 1], [0, 60, 2]),
        ([5], [0]),
        ([1, 0, 19, 1], [8, 30, 0, 4]),
    ]
    with torch.inference_mode():
        for extend, prefix in steps:
            fb = _batch(backend, pool, rng, extend, prefix, config.vocab_size)
            assert graphs.can_run(fb)
            backend.plan(fb)
            # Eager reference first (it writes the step's K/V; the replay writes the same values).
            expected = model(fb).clone()
            got = graphs.replay(fb)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            # The replay sent every padding token's K/V to the scratch slot, never a live one.
            n = fb.num_tokens
            bucket = next(b for b in graphs.buckets if b >= n)
            assert (graphs.out_cache_loc[n:bucket] == 0).all()
    assert not graphs.can_run(_batch(backend, pool, rng, [1] * 3, [5] * 3, config.vocab_size))  # decodes: no
