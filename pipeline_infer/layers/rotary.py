"""Rotary position embedding (NeoX "rotate half" layout, as in HF Llama/Qwen), with scaling.

Supported `rope_type`s: default, linear, llama3 (Llama 3.1+), yarn. The cos/sin table is built
once in fp32 as [max_position, rotary_dim] = [cos half | sin half] (the layout the Triton
rotary kernel reads) and indexed by each token's absolute position.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline_infer.layers.fast_path import use_triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """{rope_type, rope_theta, ...scaling keys} from a transformers 4 or 5 config."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, params: dict[str, Any]):
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.params = dict(params)
        _inv_freq(rotary_dim, float(params["rope_theta"]), params)  # reject bad scaling early
        self.register_buffer("cos_sin_cache", torch.empty(max_position, rotary_dim), persistent=False)
        if self.cos_sin_cache.device.type != "meta":
            self.build_cache(self.cos_sin_cache.device)

    def build_cache(self, device: torch.device | str) -> None:
        """(Re)compute the table on `device`; the loader calls it after building on 'meta'."""
        inv_freq, mscale = _inv_freq(self.rotary_dim, float(self.params["rope_theta"]), self.params)
        t = torch.arange(self.max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        cache = torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], dim=-1)
        self.cos_sin_cache = cache.to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] rotated by positions [T]."""
        if use_triton(q):
            from pipeline_infer.kernels.triton.rotary import apply_rotary

            return apply_rotary(q, k, positions, self.cos_sin_cache)
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)

    def rotate_heads(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] (e.g. q and k heads side by side) rotated by positions [T]; the torch path."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        return _rotate(x, cos, sin, self.rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    half = rotary_dim // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)


def _inv_freq(dim: int, base: float, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(params["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, factor, params), 1.0
    return _yarn(dim, base, factor, params)


def _llama3(inv_freq: torch.Tensor, factor: float, params: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(band, interpolated, scaled)


def _yarn(dim: int, base: float, factor: float, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    old_ctx = float(params.get("original_max_position_embeddings", 4096))
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(old_ctx / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    interpolation = extrapolation / factor
    keep = 1 - ramp  # 1 where frequencies stay (extrapolate), 0 where they are interpolated
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    mscale = params.get("attention_factor")
    if mscale is None:
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(mscale)
