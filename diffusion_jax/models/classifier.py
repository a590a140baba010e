"""guided-diffusion's noisy classifier (EncoderUNetModel) in flax.linen, NHWC.

The UNet's time embedding, input blocks and middle block (`unet._encoder`, the same
modules and names), then a head over the final feature map: "attention" (CLIP's
attention pooling, guided-diffusion's default) or "adaptive" (global mean and a
zero-initialised 1×1 convolution). Called as `model.apply({"params": p}, x, t)` with x
(B, H, W, in_channels) and t (B,) on the training scale, it returns (B, out_channels)
float32 logits of p(y | x_t, t), for classifier guidance (`samplers.ClassifierGuidance`).
Parameter names follow the PyTorch module paths, so `tools.convert` reads
guided-diffusion's classifier state_dicts.
"""
from __future__ import annotations

from typing import Any
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models import unet

Dtype = Any
TORCH_CONV1D = ("qkv", "proj_out", "qkv_proj", "c_proj")  # Conv1d(k=1) in PyTorch
POOLS = ("attention", "adaptive")


class AttentionPool2d(nn.Module):
  """Attention pooling (CLIP, as guided-diffusion adapts it): the spatial mean is
  prepended as a query token, a learned positional embedding is added, multi-head
  attention (new channel order) runs over the HW+1 tokens, and the mean token's output
  is projected to `out_features`."""
  num_head_channels: int
  out_features: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    x = x.reshape(b, hgt * wid, c)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    # (C, HW+1) as PyTorch stores it, initialised as N(0, 1/C).
    pos = self.param("positional_embedding",
                     lambda k, shape: jax.random.normal(k, shape) / c ** 0.5,
                     (c, hgt * wid + 1))
    x = x + pos.T[None].astype(x.dtype)
    qkv = unet._dense(3 * c, "qkv_proj", self.dtype)(x)  # pylint: disable=protected-access
    h = layers.qkv_attention(qkv, c // self.num_head_channels, True, self.attention_impl)
    out = unet._dense(self.out_features, "c_proj", self.dtype)(h[:, 0])  # pylint: disable=protected-access
    return out.astype(jnp.float32)


class EncoderUNetModel(nn.Module):
  """The half UNet with a classification head (guided-diffusion's EncoderUNetModel)."""
  image_size: int
  in_channels: int
  model_channels: int
  out_channels: int
  num_res_blocks: int
  attention_resolutions: Sequence[int]  # downsampling factors (ds) with attention
  dropout: float = 0.0
  channel_mult: Sequence[float] = (1, 2, 4, 8)
  conv_resample: bool = True
  use_checkpoint: bool = False
  dtype: Dtype = jnp.float32
  num_heads: int = 1
  num_head_channels: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  pool: str = "attention"
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    unet.check_input(self, x)
    emb = unet._time_embedding(self, t)  # pylint: disable=protected-access
    h, _, _, _ = unet._encoder(self, x, emb, train)  # pylint: disable=protected-access
    h = unet._group_norm(unet._norm("out.0"), h.astype(jnp.float32), silu=True)  # pylint: disable=protected-access
    if self.pool == "adaptive":
      h = h.mean(axis=(1, 2), keepdims=True)
      return unet._conv(self.out_channels, "out.3", jnp.float32, kernel=1,  # pylint: disable=protected-access
                        zero=True)(h).reshape(h.shape[0], -1)
    return AttentionPool2d(self.num_head_channels, self.out_channels, self.dtype,
                           self.attention_impl, name="out.2")(h)


def create(image_size: int, width: int = 128, depth: int = 2,
           attention_resolutions: str = "32,16,8", use_scale_shift_norm: bool = True,
           resblock_updown: bool = True, pool: str = "attention", num_classes: int = 1000,
           in_channels: int = 3, channel_mult="", num_head_channels: int = 64,
           dtype: str = "float32") -> EncoderUNetModel:
  """The classifier as guided-diffusion's `create_classifier` builds it (its defaults:
  width 128, depth 2, attention at 32, 16 and 8 px, scale-shift norm, resblock
  up/down, attention pooling, 64-channel heads, 1000 classes). channel_mult "" is the
  UNet's default for image_size; `in_channels` and `num_classes` allow other data."""
  if pool not in POOLS:
    raise ValueError(f"pool={pool!r}: choose one of {list(POOLS)}.")
  return EncoderUNetModel(
      image_size=image_size, in_channels=in_channels, model_channels=width,
      out_channels=num_classes, num_res_blocks=depth,
      attention_resolutions=unet.attention_factors(attention_resolutions, image_size),
      channel_mult=unet.parse_channel_mult(channel_mult, image_size),
      dtype=unet._DTYPES[dtype], num_head_channels=num_head_channels,  # pylint: disable=protected-access
      use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown, pool=pool)


def init_params(model: EncoderUNetModel, key, batch_size: int = 1):
  """Float32 parameters for `model` (a pytree)."""
  x = jnp.zeros((batch_size, model.image_size, model.image_size, model.in_channels))
  return jax.jit(model.init)({"params": key}, x, jnp.zeros((batch_size,), jnp.int32))["params"]


def torch_constants(model) -> dict:
  del model
  return {}


def mismatch_hints(missing, unexpected, wrong_shape) -> list[str]:
  hints = unet.mismatch_hints(missing, unexpected, wrong_shape)
  if any(k.startswith("out.") for k in set(missing) | set(unexpected) | set(wrong_shape)):
    hints.append("pool or num_classes (the head differs)")
  return hints
