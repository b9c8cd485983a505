"""A rotated low-bit KV cache for transformers' `generate` (TurboQuant / RotorQuant style).

Keys and values are rotated by a seeded orthogonal matrix along the head dimension, quantized per
token to 2, 3, 4 or 8 bits, stored bit-packed, and dequantized (and rotated back) when attention
reads them. The most recent `residual_window` tokens of every layer stay in full precision.

Why rotate: K/V have a few outlier channels; an orthogonal rotation spreads each vector's energy
over all coordinates so that a per-token quantizer wastes less range on outliers (the point of
TurboQuant, arXiv 2504.19874). Block rotations (2-D Givens, 3-D rotors, 4-D quaternion pairs) mix
only within small blocks and cost O(d) instead of O(d²) (RotorQuant); `hadamard` and `dense` mix
all d coordinates. Rotations are orthogonal, so the L2 error of a dequantized vector equals the
L2 error of its quantized rotated coordinates.

The quantizer is asymmetric min/max per group of `group_size` rotated coordinates of one token,
not a Lloyd-Max codebook: it has a hard per-element error bound (half a step, scale / 2) that the
tests check, needs no calibration, and quantizes each token on its own, so tokens can be added
or dropped (sliding windows) without re-quantizing others. Scale and minimum are stored in fp16,
the minimum rounded down and the scale rounded up so every value lies inside the grid.

Gemma 4: keys are stored after RoPE, so partial ("p-")RoPE on full-attention layers needs nothing
special (the rotation treats the head vector as opaque, rotated or not by RoPE); sliding layers
keep at most `sliding_window - 1` tokens like transformers' DynamicSlidingWindowLayer; each layer
builds its rotation for its own head dim; KV-shared layers (`num_kv_shared_layers`) get no cache
layer at all (they read the K/V that their source layer's `update` returned), so nothing is stored
twice.

    cache = RotorQuantCache(model, bits=4, rotation="hadamard")
    model.generate(**inputs, past_key_values=cache)
    cache.memory_bytes()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

ROTATIONS = ("none", "givens", "rotor3", "quaternion", "hadamard", "dense")
BITS = (2, 3, 4, 8)
LAYER_TYPES = ("full_attention", "sliding_attention")
_FP16_MIN_SCALE = 2.0**-14  # smallest normal fp16: a constant group still gets a usable step


# ---------------------------------------------------------------- rotations


@dataclass(frozen=True)
class Rotation:
    """An orthogonal map of the last dimension: block-diagonal (`blocks`: n × k × k) or dense (d × d)."""

    name: str
    blocks: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return x @ self.dense.T
        if self.blocks is None:
            return x
        n, k, _ = self.blocks.shape
        y = torch.einsum("...nk,njk->...nj", x.reshape(*x.shape[:-1], n, k), self.blocks)
        return y.reshape(x.shape)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return y @ self.dense
        if self.blocks is None:
            return y
        n, k, _ = self.blocks.shape
        x = torch.einsum("...nj,njk->...nk", y.reshape(*y.shape[:-1], n, k), self.blocks)
        return x.reshape(y.shape)


def _unit_quaternions(n: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return q / q.norm(dim=-1, keepdim=True)


def _left_matrix(q: torch.Tensor) -> torch.Tensor:
    """p ↦ q·p as a 4 × 4 matrix per quaternion (w, x, y, z)."""
    a, b, c, d = q.unbind(-1)
    return torch.stack([torch.stack(r, -1) for r in (
        (a, -b, -c, -d), (b, a, -d, c), (c, d, a, -b), (d, -c, b, a))], -2)


def _right_matrix(q: torch.Tensor) -> torch.Tensor:
    """p ↦ p·q as a 4 × 4 matrix per quaternion."""
    a, b, c, d = q.unbind(-1)
    return torch.stack([torch.stack(r, -1) for r in (
        (a, -b, -c, -d), (b, a, d, -c), (c, -d, a, b), (d, c, -b, a))], -2)


def _rotor3_matrix(q: torch.Tensor) -> torch.Tensor:
    """The 3-D rotation v ↦ q v q⁻¹ of a unit quaternion (a Clifford rotor of Cl(3))."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([torch.stack(r, -1) for r in (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)))], -2)


def _hadamard(d: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def make_rotation(name: str, head_dim: int, seed: int = 0) -> Rotation:
    """A seeded random orthogonal rotation of `head_dim` coordinates."""
    gen = torch.Generator().manual_seed(seed)
    block = {"givens": 2, "rotor3": 3, "quaternion": 4}.get(name)
    if block and head_dim % block:
        raise ValueError(f"rotation {name!r} rotates blocks of {block} coordinates; head dim {head_dim} is not a multiple")
    if name == "none":
        return Rotation(name)
    if name == "givens":
        theta = torch.rand(head_dim // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
        c, s = theta.cos(), theta.sin()
        blocks = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    elif name == "rotor3":
        blocks = _rotor3_matrix(_unit_quaternions(head_dim // 3, gen))
    elif name == "quaternion":
        # Every 4-D rotation is a left times a right isoclinic rotation: q_l · v · q_r.
        n = head_dim // 4
        blocks = _left_matrix(_unit_quaternions(n, gen)) @ _right_matrix(_unit_quaternions(n, gen))
    elif name == "hadamard":
        if head_dim & (head_dim - 1):
            raise ValueError(f"rotation 'hadamard' needs a power-of-two head dim, got {head_dim}")
        signs = torch.randint(0, 2, (head_dim,), generator=gen).to(torch.float64) * 2 - 1
        return Rotation(name, dense=(_hadamard(head_dim) * signs).float())
    elif name == "dense":
        q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
        return Rotation(name, dense=(q * torch.sign(torch.diagonal(r))).float())  # Haar-distributed
    else:
        raise ValueError(f"unknown rotation {name!r}; choose one of {', '.join(ROTATIONS)}")
    return Rotation(name, blocks=blocks.float())


# ---------------------------------------------------------------- quantizer and packing


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits, last dim a multiple of 8 -> `bits` bytes per 8 codes."""
    if bits == 8:
        return codes
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (codes.reshape(*codes.shape[:-1], -1, 8).to(torch.int64) << shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (packed.reshape(*packed.shape[:-1], -1, bits).to(torch.int64) << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((word >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(*packed.shape[:-1], -1)


def _fp16_rounded(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x in fp16, rounded toward `direction` (±inf) so the fp16 value bounds x from that side."""
    h = x.to(torch.float16)
    off = (h.float() > x) if direction < 0 else (h.float() < x)
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction)), h)


@dataclass
class Packed:
    """Quantized tokens: codes (B, H, T, D·bits/8) uint8, and per group of each token fp16 scale and minimum."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def last(self, n: int) -> Packed:
        start = self.tokens - n  # cloned: a view would keep the dropped tokens' storage alive
        return Packed(*(t[..., start:, :].clone() for t in (self.codes, self.scale, self.zero)))

    def cat(self, other: Packed) -> Packed:
        return Packed(*(torch.cat([a, b], dim=-2) for a, b in
                        ((self.codes, other.codes), (self.scale, other.scale), (self.zero, other.zero))))


def quantize(x: torch.Tensor, bits: int, group_size: int) -> Packed:
    """Asymmetric min/max quantization of the last dim in groups; every element within scale / 2."""
    levels = 2**bits - 1
    groups = x.float().reshape(*x.shape[:-1], -1, group_size)
    zero = _fp16_rounded(groups.amin(-1), -math.inf)
    step = ((groups.amax(-1) - zero.float()) / levels).clamp_min(_FP16_MIN_SCALE)
    scale = _fp16_rounded(step, math.inf)
    codes = ((groups - zero.float()[..., None]) / scale.float()[..., None]).round().clamp_(0, levels)
    return Packed(pack_codes(codes.to(torch.uint8).reshape(x.shape), bits), scale, zero)


def dequantize(p: Packed, bits: int, group_size: int) -> torch.Tensor:
    codes = unpack_codes(p.codes, bits)
    groups = codes.reshape(*codes.shape[:-1], -1, group_size).float()
    return (groups * p.scale.float()[..., None] + p.zero.float()[..., None]).reshape(codes.shape)


# ---------------------------------------------------------------- cache


class RotorQuantLayer(DynamicLayer):
    """One attention layer's K/V: quantized older tokens plus a full-precision window of recent ones.

    `self.keys` / `self.values` hold the full-precision window (DynamicLayer's fields, so transformers
    helpers that look at them still work); `self.qkeys` / `self.qvalues` the packed older tokens.
    """

    is_croppable = False

    def __init__(self, bits: int, rotation: str, residual_window: int, group_size: int | None,
                 sliding_window: int | None = None, seed: int = 0):
        super().__init__()
        self.bits, self.rotation_name, self.seed = bits, rotation, seed
        self.residual_window = residual_window
        self.requested_group_size = group_size
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        self.qkeys: Packed | None = None
        self.qvalues: Packed | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        head_dim = key_states.shape[-1]
        self.group_size = min(self.requested_group_size or head_dim, head_dim)
        if head_dim % self.group_size or head_dim % 8:
            raise ValueError(f"head dim {head_dim} must be a multiple of 8 and of group_size {self.group_size}")
        rotation = make_rotation(self.rotation_name, head_dim, self.seed)
        self.rotation = Rotation(rotation.name, *(t.to(self.device) if t is not None else None
                                                  for t in (rotation.blocks, rotation.dense)))

    @property
    def quantized_tokens(self) -> int:
        return self.qkeys.tokens if self.qkeys is not None else 0

    def _read(self, packed: Packed | None) -> torch.Tensor:
        if packed is None or packed.tokens == 0:
            return torch.empty(0, device=self.device, dtype=self.dtype)
        rotated = dequantize(packed, self.bits, self.group_size)
        return self.rotation.invert(rotated).to(self.dtype)

    def _quantize(self, x: torch.Tensor) -> Packed:
        return quantize(self.rotation.apply(x.float()), self.bits, self.group_size)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        fp_keys = torch.cat([self.keys, key_states], dim=-2)
        fp_values = torch.cat([self.values, value_states], dim=-2)
        # This step's own tokens are returned as they came; quantization affects later reads only.
        keys = torch.cat([self._read(self.qkeys), fp_keys], dim=-2)
        values = torch.cat([self._read(self.qvalues), fp_values], dim=-2)
        self._store(fp_keys, fp_values)
        return keys, values

    def _store(self, fp_keys: torch.Tensor, fp_values: torch.Tensor) -> None:
        """Keep the last `residual_window` tokens in full precision, quantize the ones before them,
        and on a sliding layer drop everything older than `sliding_window - 1` tokens."""
        fp_len = fp_keys.shape[-2]
        total = self.quantized_tokens + fp_len
        keep = total if self.sliding_window is None else min(total, self.sliding_window - 1)
        fp_keep = min(self.residual_window, keep, fp_len)
        from_fp = min(fp_len - fp_keep, keep - fp_keep)  # window overflow that is still kept
        from_old = keep - fp_keep - from_fp
        if from_fp:
            new_k = self._quantize(fp_keys[..., fp_len - fp_keep - from_fp: fp_len - fp_keep, :])
            new_v = self._quantize(fp_values[..., fp_len - fp_keep - from_fp: fp_len - fp_keep, :])
            self.qkeys = new_k if not from_old else self.qkeys.last(from_old).cat(new_k)
            self.qvalues = new_v if not from_old else self.qvalues.last(from_old).cat(new_v)
        elif self.quantized_tokens > from_old:
            self.qkeys, self.qvalues = self.qkeys.last(from_old), self.qvalues.last(from_old)
        # Cloned when cut: a view would keep the quantized or dropped tokens' full-precision storage alive.
        self.keys = fp_keys[..., fp_len - fp_keep:, :].clone() if fp_keep < fp_len else fp_keys
        self.values = fp_values[..., fp_len - fp_keep:, :].clone() if fp_keep < fp_len else fp_values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return self.cumulative_length + query_length, 0
        # As DynamicSlidingWindowLayer: the stored window plus the new queries.
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        stored = min(self.cumulative_length, self.sliding_window - 1)
        return stored + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.sliding_window is not None else -1

    def stored_tokens(self) -> int:
        return self.quantized_tokens + (self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0)

    def memory_bytes(self) -> int:
        """Bytes this layer holds for K and V: packed codes, scales and minimums, and the window."""
        if not self.is_initialized:
            return 0
        packed = sum(p.nbytes() for p in (self.qkeys, self.qvalues) if p is not None)
        return packed + sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def _map_packed(self, fn) -> None:
        """Apply a batch-dimension operation to the packed tokens (beam search, batch expansion)."""
        for name in ("qkeys", "qvalues"):
            p = getattr(self, name)
            if p is not None:
                setattr(self, name, Packed(fn(p.codes), fn(p.scale), fn(p.zero)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_packed(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_packed(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_packed(lambda t: t[indices, ...])


class RotorQuantCache(Cache):
    """A transformers Cache storing K/V rotated and quantized to `bits` (2, 3, 4 or 8).

    Args:
        model: a model or its config; the decoder's `layer_types`, `sliding_window` and
            `num_kv_shared_layers` decide the layers.
        bits: bits per stored coordinate; `bits_by_layer_type` overrides it per layer type,
            e.g. `{"full_attention": 4, "sliding_attention": 3}`.
        rotation: one of ROTATIONS; the default, a randomized Hadamard, measured near the dense rotation
            on Gemma 3 270M while the 4-D quaternion blocks did worse than none (benchmarks/RESULTS.md).
        residual_window: most recent tokens per layer kept in full precision.
        group_size: rotated coordinates of one token sharing a scale and minimum (None: the head dim).
        seed: the rotations' seed.
    """

    def __init__(self, model, bits: int = 4, rotation: str = "hadamard", residual_window: int = 128,
                 group_size: int | None = 64, bits_by_layer_type: dict[str, int] | None = None, seed: int = 0):
        config = getattr(model, "config", model).get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)  # drops KV-shared layers
        bits_by_layer_type = dict(bits_by_layer_type or {})
        unknown = (set(layer_types) | set(bits_by_layer_type)) - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"RotorQuantCache supports layer types {LAYER_TYPES}, got {sorted(unknown)}")
        for b in [bits, *bits_by_layer_type.values()]:
            if b not in BITS:
                raise ValueError(f"bits must be one of {BITS}, got {b}")
        if rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {rotation!r}; choose one of {', '.join(ROTATIONS)}")
        if residual_window < 0:
            raise ValueError(f"residual_window must be >= 0, got {residual_window}")
        self.bits, self.rotation, self.residual_window = bits, rotation, residual_window
        self.layer_types = layer_types
        layers = [
            RotorQuantLayer(
                bits=bits_by_layer_type.get(kind, bits), rotation=rotation, residual_window=residual_window,
                group_size=group_size, seed=seed,
                sliding_window=layer_kwargs["sliding_window"] if kind == "sliding_attention" else None,
            )
            for kind in layer_types
        ]
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        """Bytes held for K/V across all layers (what DynamicCache would hold as full tensors)."""
        return sum(layer.memory_bytes() for layer in self.layers)


def dynamic_cache_bytes(cache: Cache) -> int:
    """Bytes a transformers DynamicCache (or any cache with keys/values tensors per layer) holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_logits(model, input_ids: torch.Tensor, prefill: int, cache: Cache) -> torch.Tensor:
    """Prefill `input_ids[:, :prefill]` in one forward, then feed the remaining tokens one at a time as
    `generate` does; the logits of every decode step (T - prefill, vocab), each read through `cache`."""
    model(input_ids=input_ids[:, :prefill], past_key_values=cache, use_cache=True, logits_to_keep=1)
    steps = [model(input_ids=input_ids[:, t: t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
             for t in range(prefill, input_ids.shape[1])]
    return torch.stack(steps).float()


def next_token_agreement(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """KL(reference ‖ logits) per step (mean and max) and top-1 agreement, over rows of next-token logits."""
    ref, got = reference.float().log_softmax(-1), logits.float().log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item()}
