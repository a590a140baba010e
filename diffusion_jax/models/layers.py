"""Layers shared by the architectures: the timestep embedding, GroupNorm with a custom
gradient, and self-attention kernels. NHWC / (B, T, C) arrays; statistics, softmax and
the embedding in float32 whatever the compute dtype.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> jax.Array:
  """f_i = P^(−i/half) for i < dim // 2, float32 (dim // 2,)."""
  half = dim // 2
  return jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding (B,) -> (B, dim) float32: [cos(t·f), sin(t·f)], f_i = P^(−i/half)."""
  freqs = timestep_frequencies(dim, max_period)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class GroupNorm(nn.Module):
  """GroupNorm of x (B, ..., C) in float32, optionally followed by a per-example affine
  (`scale_shift`, the ResBlock's timestep modulation) and SiLU; see `group_norm`.

  The parameters ("scale", "bias", shape (C,)) and the arithmetic are flax's GroupNorm
  with the two-pass variance (PyTorch's). Returns float32.
  """
  num_groups: int = 32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, scale_shift=None, silu: bool = False):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not divide into {self.num_groups} groups.")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon, scale_shift, silu)


def group_norm(x, scale, bias, num_groups: int, epsilon: float, scale_shift=None,
               silu: bool = False):
  """y = GroupNorm(x)·scale + bias, then ·(1 + s) + t with (s, t) = scale_shift, then
  SiLU when `silu`; float32 (B, ..., C) out.

  x: (B, ..., C), any float dtype. scale, bias: (C,). scale_shift: None or a pair of
  (B, C) arrays. Statistics are taken per group over the spatial axes and the group's
  channels (per channel first, then averaged within each group, so every pass over the
  activations keeps the channel axis minor; flax's reshape to (..., groups, C/groups)
  leaves a minor axis of 2–6 that XLA:CPU cannot vectorise).

  The backward pass is written out (`jax.custom_vjp`): two passes over (x, dy), one
  reducing Σdz and Σdz·(x − mean) per example and channel, one writing dx. Left to
  autodiff, XLA:CPU recomputed the normalisation inside many of the backward's fusions
  (the train step +8.7%, PERF_NOTES.md).
  """
  b, c = x.shape[0], x.shape[-1]
  if scale_shift is None:
    zeros = jnp.zeros((b, c), jnp.float32)
    scale_shift = (zeros, zeros)
  s, t = (a.astype(jnp.float32).reshape(b, c) for a in scale_shift)
  return _group_norm_fn(num_groups, epsilon, silu)(x, scale.astype(jnp.float32),
                                                   bias.astype(jnp.float32), s, t)


def _per_channel(x, coefficient):
  """(B, C) coefficients broadcast against x (B, ..., C)."""
  return coefficient.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


def _group_average(per_channel, num_groups: int):
  """(B, C) -> each channel's group average, (B, C).

  A product with a constant (C, C) averaging matrix rather than a reshape and repeat:
  fused into the full-size loops that consume it, the repeat's index arithmetic kept
  XLA:CPU from vectorising them; a dot's result is materialised.
  """
  c = per_channel.shape[-1]
  group = jnp.arange(c) // (c // num_groups)
  averaging = (group[:, None] == group[None, :]).astype(jnp.float32) / (c // num_groups)
  return jnp.dot(per_channel, averaging, precision=jax.lax.Precision.HIGHEST)


@functools.cache
def _group_norm_fn(num_groups: int, epsilon: float, silu: bool):
  """The custom-VJP function (x, scale, bias, s, t) -> y for one (groups, eps, silu)."""

  def statistics(x):
    spatial = tuple(range(1, x.ndim - 1))
    mean = _group_average(jnp.mean(x, axis=spatial), num_groups)
    centred = x - _per_channel(x, mean)
    var = _group_average(jnp.mean(centred * centred, axis=spatial), num_groups)
    return mean, jax.lax.rsqrt(var + epsilon)

  def coefficients(rstd, scale, bias, s, t):
    """z = (x − mean)·a + c with (B, C) a = rstd·gain, gain = scale·(1+s), c = bias·(1+s) + t."""
    gain = scale * (1 + s)
    return rstd * gain, bias * (1 + s) + t, gain

  def forward(x, scale, bias, s, t):
    x = x.astype(jnp.float32)
    mean, rstd = statistics(x)
    a, c, _ = coefficients(rstd, scale, bias, s, t)
    z = (x - _per_channel(x, mean)) * _per_channel(x, a) + _per_channel(x, c)
    return (z * jax.nn.sigmoid(z) if silu else z), (mean, rstd)

  @jax.custom_vjp
  def fn(x, scale, bias, s, t):
    return forward(x, scale, bias, s, t)[0]

  def fwd(x, scale, bias, s, t):
    y, (mean, rstd) = forward(x, scale, bias, s, t)
    return y, (x, mean, rstd, scale, bias, s, t)

  def bwd(res, dy):
    x_in, mean, rstd, scale, bias, s, t = res
    x = x_in.astype(jnp.float32)
    a, c, gain = coefficients(rstd, scale, bias, s, t)
    centred = x - _per_channel(x, mean)
    dz = dy.astype(jnp.float32)
    if silu:
      z = centred * _per_channel(x, a) + _per_channel(x, c)
      sig = jax.nn.sigmoid(z)
      dz = dz * sig * (1 + z * (1 - sig))
    spatial = tuple(range(1, x.ndim - 1))
    sum_dz = jnp.sum(dz, axis=spatial)                       # (B, C)
    sum_dz_xhat = jnp.sum(dz * centred, axis=spatial) * rstd  # (B, C): Σ dz·x̂
    count = math.prod(x.shape[1:-1])
    # dx̂ = dz·gain; dx = rstd·(dx̂ − mean_g(dx̂) − x̂·mean_g(dx̂·x̂)), group means over the
    # spatial axes and the group's channels.
    m1 = _group_average(gain * sum_dz, num_groups) / count
    m2 = _group_average(gain * sum_dz_xhat, num_groups) / count
    dx = (dz * _per_channel(x, a) - centred * _per_channel(x, rstd * rstd * m2)
          - _per_channel(x, rstd * m1))
    d_scale = jnp.sum(sum_dz_xhat * (1 + s), axis=0)
    d_bias = jnp.sum(sum_dz * (1 + s), axis=0)
    d_s = sum_dz_xhat * scale + sum_dz * bias
    return dx.astype(x_in.dtype), d_scale, d_bias, d_s, sum_dz

  fn.defvjp(fwd, bwd)
  return fn


ATTENTION_IMPLS = ("einsum", "fused")


def qkv_attention(qkv: jax.Array, num_heads: int, new_order: bool,
                  impl: str = "einsum") -> jax.Array:
  """Self-attention over the T axis of qkv (B, T, 3·C); returns (B, T, C).

  Channel layout of qkv follows guided-diffusion: the legacy order interleaves per
  head [q_h, k_h, v_h]; the new order is [q (all heads), k, v]. impl="einsum" scales
  the logits by 1/√d as two factors d^(−1/4) on q and k, like the reference, softmax in
  float32 (`softmax_attention`); impl="fused" calls `jax.nn.dot_product_attention`
  (cuDNN's fused kernel on GPUs where it applies), equal up to float rounding.
  """
  b, t, width = qkv.shape
  ch = width // (3 * num_heads)
  if new_order:
    q, k, v = (a.reshape(b, t, num_heads, ch) for a in jnp.split(qkv, 3, axis=-1))
  else:
    q, k, v = jnp.split(qkv.reshape(b, t, num_heads, 3 * ch), 3, axis=-1)
  if impl == "fused":
    return jax.nn.dot_product_attention(q, k, v).reshape(b, t, num_heads * ch)
  scale = 1.0 / math.sqrt(math.sqrt(ch))
  heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # (B, T, H, C) <-> (B, H, T, C)
  out = softmax_attention(heads_major(q * scale), heads_major(k * scale), heads_major(v))
  return heads_major(out).reshape(b, t, num_heads * ch)


@jax.custom_vjp
def softmax_attention(q, k, v):
  """softmax(q·kᵀ)·v: q, k, v (B, H, T, C) of one float dtype, q and k already scaled;
  returns (B, H, T, C) in that dtype, the logits and softmax in float32.

  Normalises after the product with v, and its backward uses rowsum(dout·out) for the
  softmax's Σ p·dp, so no (T, T) reduction or broadcast is materialised beyond the
  unnormalised weights; XLA:CPU's library fusions ran the autodiff of the plain
  formula 4–14× slower forward and 1.3× slower forward + backward (PERF_NOTES.md).
  """
  return _softmax_attention_fwd(q, k, v)[0]


def _softmax_attention_fwd(q, k, v):
  logits = jnp.einsum("bhtc,bhsc->bhts", q, k).astype(jnp.float32)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised
  total = jnp.sum(weights, axis=-1, keepdims=True)                     # (B, H, T, 1)
  out = jnp.einsum("bhts,bhsc->bhtc", weights.astype(v.dtype), v).astype(jnp.float32)
  out = (out / total).astype(v.dtype)
  return out, (q, k, v, weights, total, out)


def _softmax_attention_bwd(res, d_out):
  q, k, v, weights, total, out = res
  d_out32 = d_out.astype(jnp.float32)
  # Σ_s p·dp = Σ_c d_out·out per query (p = weights / total, dp = d_out·vᵀ).
  p_dot_dp = jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_probs = jnp.einsum("bhtc,bhsc->bhts", d_out, v).astype(jnp.float32)
  d_logits = (weights * ((d_probs - p_dot_dp) / total)).astype(q.dtype)
  # Contracting over the query axis as (C, T)·(T, S) keeps the (T, S) operand in its
  # row-major layout; the (S, C) results are transposed back, which is cheap.
  d_v = jnp.einsum("bhtc,bhts->bhcs", (d_out32 / total).astype(v.dtype),
                   weights.astype(v.dtype))
  d_k = jnp.einsum("bhtc,bhts->bhcs", q, d_logits)
  d_q = jnp.einsum("bhts,bhsc->bhtc", d_logits, k)
  return d_q, jnp.swapaxes(d_k, -1, -2).astype(k.dtype), jnp.swapaxes(d_v, -1, -2)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def drop_labels(module: nn.Module, labels, num_classes: int, prob: float, train: bool):
  """Class labels int (B,), each replaced by the null class `num_classes` with
  probability `prob` in training (rng "dropout"): classifier-free guidance's label
  dropout. Unchanged outside training or when prob is 0."""
  if not (train and prob > 0):
    return labels
  drop = jax.random.uniform(module.make_rng("dropout"), labels.shape) < prob
  return jnp.where(drop, num_classes, labels)
