"""guided-diffusion's ADM UNet in flax.linen, layer for layer, NHWC.

Submodules are named by their PyTorch module path ("input_blocks.1.0", "in_layers.2",
...), so a Flax parameter path joined with "." is the PyTorch state_dict key minus the
leaf name; `diffusion_jax.convert` relies on this. Parameters are float32; `dtype`
sets the compute precision of convolutions and dense layers, while GroupNorm (with the
ResBlocks' scale-shift and SiLU), the attention softmax, the timestep MLP and the output
head stay float32.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ARCHITECTURE_NAME = "adm_unet"


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


def _norm(name: str) -> nn.Module:
  # GroupNorm's params live directly under the PyTorch name (e.g. "in_layers.0").
  return GroupNorm(num_groups=32, epsilon=1e-5, name=name)


def _group_norm(module: nn.Module, x, scale_shift=None, silu: bool = False):
  return module(x, scale_shift, silu).astype(x.dtype)


def _conv(features: int, name: str, dtype: Dtype, kernel: int = 3, stride: int = 1,
          zero: bool = False) -> nn.Conv:
  pad = kernel // 2  # PyTorch's symmetric padding, also for stride 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.zeros if zero else _torch_default_init,
                 name=name)


def _torch_default_init(key, shape, dtype=jnp.float32):
  """PyTorch's default kernel init, kaiming_uniform(a=√5): U(±1/√fan_in). Biases start at 0."""
  fan_in = math.prod(shape[:-1])
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(features: int, name: str, dtype: Dtype, zero: bool = False) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.zeros if zero else _torch_default_init,
                  name=name)


def upsample_nearest(x):
  """Nearest-neighbour ×2 on H and W (NHWC)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x):
  """2×2 average pooling, stride 2 (NHWC)."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  channels: int
  use_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    if self.use_conv:
      x = _conv(self.channels, "conv", self.dtype)(x)
    return x


class Downsample(nn.Module):
  channels: int
  use_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.use_conv:
      return _conv(self.channels, "op", self.dtype, stride=2)(x)
    return avg_pool2(x)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv, timestep embedding (add or scale-shift), GroupNorm-SiLU-dropout-conv."""
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    h = _group_norm(_norm("in_layers.0"), x, silu=True)
    if self.up:
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.down:
      h, x = avg_pool2(h), avg_pool2(x)
    h = _conv(self.out_channels, "in_layers.2", self.dtype)(h)
    emb_out = _dense(2 * self.out_channels if self.use_scale_shift_norm else self.out_channels,
                     "emb_layers.1", self.dtype)(nn.silu(emb)).astype(h.dtype)
    out_norm = _norm("out_layers.0")
    if self.use_scale_shift_norm:
      h = _group_norm(out_norm, h, scale_shift=jnp.split(emb_out, 2, axis=-1), silu=True)
    else:
      h = _group_norm(out_norm, h + emb_out[:, None, None, :], silu=True)
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = _conv(self.out_channels, "out_layers.3", self.dtype, zero=True)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, "skip_connection", self.dtype, kernel=1)(x)
    return x + h


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


class AttentionBlock(nn.Module):
  """Spatial self-attention with a residual connection; proj_out is zero-initialised."""
  num_heads: int = 1
  num_head_channels: int = -1
  use_new_attention_order: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    if self.num_head_channels == -1:
      heads = self.num_heads
    else:
      if c % self.num_head_channels:
        raise ValueError(f"{c} channels do not divide into heads of "
                         f"num_head_channels={self.num_head_channels}.")
      heads = c // self.num_head_channels
    if c % heads:
      raise ValueError(f"{c} channels do not divide into num_heads={heads}.")
    h = _group_norm(_norm("norm"), x).reshape(b, hgt * wid, c)
    qkv = _dense(3 * c, "qkv", self.dtype)(h)
    h = qkv_attention(qkv, heads, self.use_new_attention_order, self.attention_impl)
    h = _dense(c, "proj_out", self.dtype, zero=True)(h)
    return x + h.reshape(b, hgt, wid, c)


class UNetModel(nn.Module):
  """The ADM UNet (Dhariwal & Nichol), with guided-diffusion's options and names.

  Call: `model.apply({"params": p}, x, t, y=None, train=False, rngs={"dropout": k})`
  with x (B, H, W, in_channels) and t (B,) int or float; returns (B, H, W,
  out_channels) float32.
  """
  image_size: int
  in_channels: int
  model_channels: int
  out_channels: int
  num_res_blocks: int
  attention_resolutions: Sequence[int]  # downsampling factors (ds) with attention
  dropout: float = 0.0
  channel_mult: Sequence[float] = (1, 2, 4, 8)
  conv_resample: bool = True
  num_classes: int | None = None
  use_checkpoint: bool = False
  dtype: Dtype = jnp.float32
  num_heads: int = 1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  attention_impl: str = "einsum"  # see qkv_attention

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    if (self.num_classes is None) != (y is None):
      raise ValueError("Pass class labels y exactly when the model is class-conditional "
                       f"(num_classes={self.num_classes}).")
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"Expected NHWC input with {self.in_channels} channels; got shape "
                       f"{tuple(x.shape)}.")
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"Image size {x.shape[1:3]} is not divisible by {factor}, the "
                       f"downsampling of channel_mult={tuple(self.channel_mult)}.")
    res_block = nn.remat(ResBlock) if self.use_checkpoint else ResBlock
    attn_block = nn.remat(AttentionBlock) if self.use_checkpoint else AttentionBlock
    heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
    common = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                  deterministic=not train, dtype=self.dtype)

    def attention(name, heads):
      return attn_block(num_heads=heads, num_head_channels=self.num_head_channels,
                        use_new_attention_order=self.use_new_attention_order,
                        dtype=self.dtype, attention_impl=self.attention_impl, name=name)

    emb_dim = self.model_channels * 4
    emb = timestep_embedding(t, self.model_channels)
    emb = _dense(emb_dim, "time_embed.0", jnp.float32)(emb)
    emb = _dense(emb_dim, "time_embed.2", jnp.float32)(nn.silu(emb))
    if self.num_classes is not None:
      emb = emb + nn.Embed(self.num_classes, emb_dim, name="label_emb",
                           embedding_init=nn.initializers.normal(1.0))(y)

    h = x.astype(self.dtype)
    ch = int(self.channel_mult[0] * self.model_channels)
    h = _conv(ch, "input_blocks.0.0", self.dtype)(h)
    hs, chans, ds, block = [h], [ch], 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * self.model_channels)
        h = res_block(out_channels=ch, name=f"input_blocks.{block}.0", **common)(h, emb)
        if ds in self.attention_resolutions:
          h = attention(f"input_blocks.{block}.1", self.num_heads)(h)
        hs.append(h)
        chans.append(ch)
        block += 1
      if level != len(self.channel_mult) - 1:
        name = f"input_blocks.{block}.0"
        if self.resblock_updown:
          h = res_block(out_channels=ch, down=True, name=name, **common)(h, emb)
        else:
          h = Downsample(ch, self.conv_resample, self.dtype, name=name)(h)
        hs.append(h)
        chans.append(ch)
        ds *= 2
        block += 1

    h = res_block(out_channels=ch, name="middle_block.0", **common)(h, emb)
    h = attention("middle_block.1", self.num_heads)(h)
    h = res_block(out_channels=ch, name="middle_block.2", **common)(h, emb)

    block = 0
    for level, mult in list(enumerate(self.channel_mult))[::-1]:
      for i in range(self.num_res_blocks + 1):
        chans.pop()
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        ch = int(self.model_channels * mult)
        h = res_block(out_channels=ch, name=f"output_blocks.{block}.0", **common)(h, emb)
        sub = 1
        if ds in self.attention_resolutions:
          h = attention(f"output_blocks.{block}.1", heads_up)(h)
          sub = 2
        if level and i == self.num_res_blocks:
          name = f"output_blocks.{block}.{sub}"
          if self.resblock_updown:
            h = res_block(out_channels=ch, up=True, name=name, **common)(h, emb)
          else:
            h = Upsample(ch, self.conv_resample, self.dtype, name=name)(h)
          ds //= 2
        block += 1

    h = h.astype(jnp.float32)
    h = _group_norm(_norm("out.0"), h, silu=True)
    return _conv(self.out_channels, "out.2", jnp.float32, zero=True)(h)


NUM_CLASSES = 1000
# guided-diffusion's channel multipliers per image size (32 from improved-diffusion).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_channel_mult(channel_mult, image_size: int) -> tuple:
  """A channel_mult string ("" for the default, or "1,2,2,2") or sequence, validated."""
  if channel_mult in ("", None):
    if image_size not in DEFAULT_CHANNEL_MULT:
      raise ValueError(f"No default channel_mult for image_size={image_size}; the defaults "
                       f"cover {sorted(DEFAULT_CHANNEL_MULT)}. Set channel_mult, e.g. '1,2,2'.")
    mult = DEFAULT_CHANNEL_MULT[image_size]
  elif isinstance(channel_mult, str):
    mult = tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
  else:
    mult = tuple(channel_mult)
  factor = 2 ** (len(mult) - 1)
  if image_size % factor:
    raise ValueError(f"image_size={image_size} is not divisible by {factor}, the total "
                     f"downsampling of channel_mult={mult}; pick a channel_mult with fewer "
                     f"levels or an image size divisible by {factor}.")
  return mult


def create(image_size: int, num_channels: int, num_res_blocks: int,
                 channel_mult="", learn_sigma: bool = False, class_cond: bool = False,
                 use_checkpoint: bool = False, attention_resolutions: str = "16",
                 num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 dropout: float = 0.0, resblock_updown: bool = False,
                 use_fp16: bool = False, use_new_attention_order: bool = False,
                 num_classes: int = NUM_CLASSES, in_channels: int = 3,
                 dtype: str = "float32", attention_impl: str = "einsum") -> UNetModel:
  """The ADM UNet exactly as guided-diffusion's `create_model` builds it.

  `attention_resolutions` lists resolutions ("32,16,8"); `use_fp16` is accepted for
  argument compatibility and means dtype="bfloat16" here. `in_channels` (3 in the
  reference) allows grey images; `dtype` is the compute dtype; `attention_impl` is
  "einsum" (the reference's arithmetic) or "fused" (`jax.nn.dot_product_attention`).
  """
  mult = parse_channel_mult(channel_mult, image_size)
  attention_ds = []
  for res in str(attention_resolutions).split(","):
    res = int(res)
    if res <= 0 or image_size % res:
      raise ValueError(f"attention resolution {res} does not divide image_size={image_size}.")
    attention_ds.append(image_size // res)
  if use_fp16:
    dtype = "bfloat16"
  if dtype not in _DTYPES:
    raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(_DTYPES)}.")
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention implementation {attention_impl!r}; choose one of "
                     f"{list(ATTENTION_IMPLS)}.")
  return UNetModel(
      image_size=image_size,
      in_channels=in_channels,
      model_channels=num_channels,
      out_channels=in_channels * (2 if learn_sigma else 1),
      num_res_blocks=num_res_blocks,
      attention_resolutions=tuple(attention_ds),
      dropout=dropout,
      channel_mult=mult,
      num_classes=num_classes if class_cond else None,
      use_checkpoint=use_checkpoint,
      dtype=_DTYPES[dtype],
      num_heads=num_heads,
      num_head_channels=num_head_channels,
      num_heads_upsample=num_heads_upsample,
      use_scale_shift_norm=use_scale_shift_norm,
      resblock_updown=resblock_updown,
      use_new_attention_order=use_new_attention_order,
      attention_impl=attention_impl,
  )


def init_params(model: UNetModel, key, batch_size: int = 1):
  """Float32 parameters for `model` (a pytree)."""
  x = jnp.zeros((batch_size, model.image_size, model.image_size, model.in_channels))
  t = jnp.zeros((batch_size,), jnp.int32)
  y = jnp.zeros((batch_size,), jnp.int32) if model.num_classes else None
  return jax.jit(model.init)({"params": key, "dropout": key}, x, t, y)["params"]

# The config fields of `config.model` for this architecture (guided-diffusion's
# `create_model` arguments), with their defaults; see configs/default.py.
CONFIG_FIELDS = dict(
    name=ARCHITECTURE_NAME,
    image_size=32,
    in_channels=3,
    num_channels=64,
    num_res_blocks=1,
    channel_mult="",             # "" = guided-diffusion's default for image_size
    attention_resolutions="16",  # resolutions (pixels) with self-attention
    num_heads=1,
    num_head_channels=32,        # -1: use num_heads
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=False,
    learn_sigma=True,
    class_cond=False,
    num_classes=10,
    dropout=0.0,
    use_checkpoint=False,        # rematerialise blocks to save memory
)


def from_config(fields: dict, dtype: str, attention_impl: str) -> UNetModel:
  """The UNet that `config.model` (CONFIG_FIELDS) describes."""
  kw = {k: v for k, v in dict(fields).items() if k != "name"}
  return create(**kw, dtype=dtype, attention_impl=attention_impl)


# --- guided-diffusion's state_dict conventions (used by diffusion_jax.convert) ---

TORCH_CONV1D = ("qkv", "proj_out")  # Conv1d(k=1) in PyTorch, Dense in Flax


def torch_constants(model: UNetModel) -> dict:
  del model
  return {}


def mismatch_hints(missing, unexpected, wrong_shape) -> list[str]:
  keys = set(missing) | set(unexpected)
  hints = []
  if "label_emb.weight" in keys:
    hints.append("class_cond (the checkpoint %s a label embedding)" %
                 ("has" if "label_emb.weight" in unexpected else "lacks"))
  if any(re.match(r"(input|output)_blocks\.\d+\.\d+\.(in_layers|op|conv)", k) for k in keys):
    hints.append("num_res_blocks, channel_mult, image_size or resblock_updown (the block "
                 "structure differs)")
  if any(".qkv." in k or ".norm." in k for k in keys):
    hints.append("attention_resolutions (attention blocks sit at other resolutions)")
  if any(".skip_connection." in k for k in keys):
    hints.append("num_channels or channel_mult (skip convolutions differ)")
  if "out.2.weight" in wrong_shape:
    hints.append("learn_sigma (the output has %d channels in the file, %d in the model)"
                 % (wrong_shape["out.2.weight"][0][0], wrong_shape["out.2.weight"][1][0]))
  if any(k.startswith("time_embed.") for k in wrong_shape):
    hints.append("num_channels")
  if any(".emb_layers." in k for k in wrong_shape):
    hints.append("use_scale_shift_norm (embedding projections are 2× wide with it)")
  if wrong_shape and not hints:
    hints.append("num_channels or channel_mult")
  return hints
