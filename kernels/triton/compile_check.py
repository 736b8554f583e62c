"""Compile every kernel for a CUDA architecture without a GPU: `python -m pipeline_infer.kernels.triton.compile_check`.

Triton's interpreter (the CPU tests) runs kernels as Python, so it accepts code that the
real compiler rejects. Triton can compile to PTX and cubin without a device (its wheel ships
ptxas), so CPU CI can still catch those errors. Must run with TRITON_INTERPRET unset, in a
process that has not imported triton under the interpreter. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# Pointer arguments by name: the element type they carry in the bf16 engine.
_POINTER_TYPES = {
    "page_table_ptr": "*i32", "seq_lens_ptr": "*i32", "qo_indptr_ptr": "*i32", "prefix_lens_ptr": "*i32",
    "block_seq_ptr": "*i32", "block_start_ptr": "*i32", "num_blocks_ptr": "*i32",
    "kv_start_ptr": "*i32", "rows_ptr": "*i32", "items_ptr": "*i32", "num_items_ptr": "*i32",
    "loc_ptr": "*i64", "pos_ptr": "*i64", "lse_ptr": "*fp32", "part_ptr": "*fp32", "cos_sin_ptr": "*fp32",
    "idx_out_ptr": "*i64", "part_max_ptr": "*fp32", "part_idx_ptr": "*i32",
}
_FLOAT_ARGS = {"sm_scale_log2", "eps"}


def _variants() -> list[tuple[Any, dict, str]]:
    """(kernel, constexprs, dtype of data pointers) for each compiled variant the wrappers use."""
    from pipeline_infer.kernels.triton import (
        activation, argmax, decode_attention, extend_attention, rms_norm, rope_store_kv, rotary, shared_prefix_attention,
        store_kv,
    )

    decode = dict(PAGE_SIZE=16, GROUP=7, HEAD_DIM=64, BLOCK_H=16, BLOCK_D=64, BLOCK_N=64)
    prefix = dict(PAGE_SIZE=1, GROUP=7, HEAD_DIM=64, BLOCK_H=8, ROWS=16, BLOCK_D=64, BLOCK_N=64, DOT_FP32=False)
    extend = dict(PAGE_SIZE=16, GROUP=4, HEAD_DIM=128, TOKENS_PER_BLOCK=16, BLOCK_M=64, BLOCK_N=32, BLOCK_D=128)
    return [
        (store_kv._store_kv_kernel, dict(NUM_HEADS=2, HEAD_DIM=64, BLOCK_H=2, BLOCK_D=64), "bf16"),
        (decode_attention._decode_split_kernel, dict(decode, WRITE_LSE=True, DOT_FP32=False), "bf16"),
        (decode_attention._decode_split_kernel, dict(decode, PAGE_SIZE=1, WRITE_LSE=False, DOT_FP32=True), "fp32"),
        (decode_attention._decode_split_kernel, dict(decode, WRITE_LSE=True, DOT_FP32=False, HAS_START=True), "bf16"),
        (decode_attention._decode_split_kernel, dict(decode, WRITE_LSE=False, DOT_FP32=False, HEADS_FASTEST=True), "bf16"),
        (decode_attention._decode_merge_kernel, dict(NUM_HEADS=32, BLOCK_HEADS=32, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=8, HAS_START=False), "bf16"),
        (decode_attention._decode_merge_kernel, dict(NUM_HEADS=14, BLOCK_HEADS=16, HEAD_DIM=64, BLOCK_D=64, BLOCK_S=4, HAS_START=True), "bf16"),
        (shared_prefix_attention._shared_prefix_kernel, dict(prefix, FUSE_ROPE=True, HALF=32), "bf16"),
        (shared_prefix_attention._shared_prefix_kernel, dict(prefix, GROUP=4, BLOCK_H=4, ROWS=32, HEAD_DIM=128,
                                                             BLOCK_D=128, BLOCK_N=32, FUSE_ROPE=False, HALF=0), "bf16"),
        (extend_attention._extend_kernel, dict(extend, DOT_FP32=False, BOUNDED=False), "bf16"),
        (extend_attention._extend_kernel, dict(extend, DOT_FP32=False, BOUNDED=True), "bf16"),
        (extend_attention._extend_kernel, dict(extend, PAGE_SIZE=1, GROUP=7, TOKENS_PER_BLOCK=9, DOT_FP32=True,
                                               BOUNDED=False), "fp32"),
        (rms_norm._rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096), "bf16"),
        (rms_norm._rms_norm_kernel, dict(HAS_RESIDUAL=False, BLOCK=1024), "fp16"),
        (rotary._rotary_kernel, dict(NUM_Q_HEADS=14, NUM_K_HEADS=2, HALF=32, PASS=0, BLOCK_H=16, BLOCK_HALF=32, BLOCK_PASS=1), "bf16"),
        (rotary._rotary_kernel, dict(NUM_Q_HEADS=8, NUM_K_HEADS=8, HALF=32, PASS=64, BLOCK_H=8, BLOCK_HALF=32, BLOCK_PASS=64), "fp32"),
        (rope_store_kv._rope_store_kv_kernel, dict(NUM_Q_HEADS=14, NUM_KV_HEADS=2, HEAD_DIM=64, HALF=32, PASS=0, BLOCK_QH=16,
                                                   BLOCK_KH=2, BLOCK_HALF=32, BLOCK_PASS=1, BLOCK_D=64), "bf16"),
        (rope_store_kv._rope_store_kv_kernel, dict(NUM_Q_HEADS=4, NUM_KV_HEADS=4, HEAD_DIM=128, HALF=32, PASS=64, BLOCK_QH=4,
                                                   BLOCK_KH=4, BLOCK_HALF=32, BLOCK_PASS=64, BLOCK_D=128), "fp32"),
        (activation._silu_and_mul_kernel, dict(BLOCK=1024), "bf16"),
        (argmax._argmax_kernel, dict(BLOCK=argmax.BLOCK, SINGLE=True), "bf16"),
        (argmax._argmax_kernel, dict(BLOCK=argmax.BLOCK, SINGLE=False), "fp32"),
        (argmax._pick_chunk_kernel, dict(BLOCK_C=8), "fp32"),
    ]


def compile_all(arch: int) -> list[str]:
    """Compile every variant for sm_<arch>; returns one error line per failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    errors = []
    for fn, constexprs, dtype in _variants():
        if not isinstance(fn, triton.runtime.JITFunction):
            return ["kernels were decorated under TRITON_INTERPRET=1; run this in a process without it"]
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = _POINTER_TYPES.get(name, f"*{dtype}")
            else:
                signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
        try:
            triton.compile(ASTSource(fn, signature, constexprs), target=target, options={"num_warps": 4, "num_stages": 2})
        except Exception as e:  # noqa: BLE001 - report every failing kernel, not only the first
            errors.append(f"{fn.__name__} {constexprs}: {type(e).__name__}: {e}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90 (default 90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.stderr.write("unset TRITON_INTERPRET: the interpreter does not compile\n")
        return 1
    errors = compile_all(args.arch)
    for line in errors:
        sys.stderr.write(line + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
