"""guided-diffusion's ADM UNet in flax.linen, layer for layer, NHWC.

Submodules are named by their PyTorch module path ("input_blocks.1.0", "in_layers.2",
...), so a Flax parameter path joined with "." is the PyTorch state_dict key minus the
leaf name; `diffusion_jax.tools.convert` relies on this. Parameters are float32; `dtype`
sets the compute precision of convolutions and dense layers, while GroupNorm (with the
ResBlocks' scale-shift and SiLU), the attention softmax, the timestep MLP and the output
head stay float32.
"""
from __future__ import annotations

import math
import re
from typing import Any
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models import winograd

Dtype = Any
ARCHITECTURE_NAME = "adm_unet"


def _norm(name: str) -> nn.Module:
  # GroupNorm's params live directly under the PyTorch name (e.g. "in_layers.0").
  return layers.GroupNorm(num_groups=32, epsilon=1e-5, name=name)


def _group_norm(module: nn.Module, x, scale_shift=None, silu: bool = False):
  return module(x, scale_shift, silu).astype(x.dtype)


def _conv(features: int, name: str, dtype: Dtype, kernel: int = 3, stride: int = 1,
          zero: bool = False) -> nn.Conv:
  pad = kernel // 2  # PyTorch's symmetric padding, also for stride 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.zeros if zero else _torch_default_init,
                 conv_general_dilated=winograd.conv_general_dilated, name=name)


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
    h = layers.qkv_attention(qkv, heads, self.use_new_attention_order, self.attention_impl)
    h = _dense(c, "proj_out", self.dtype, zero=True)(h)
    return x + h.reshape(b, hgt, wid, c)


def _blocks(m, train: bool):
  """(ResBlock, attention(name, heads), the ResBlocks' common arguments) of UNet-like
  module `m` (its dtype, dropout, checkpointing and attention settings)."""
  res_block = nn.remat(ResBlock) if m.use_checkpoint else ResBlock
  attn_block = nn.remat(AttentionBlock) if m.use_checkpoint else AttentionBlock
  common = dict(dropout=m.dropout, use_scale_shift_norm=m.use_scale_shift_norm,
                deterministic=not train, dtype=m.dtype)

  def attention(name, heads):
    return attn_block(num_heads=heads, num_head_channels=m.num_head_channels,
                      use_new_attention_order=m.use_new_attention_order, dtype=m.dtype,
                      attention_impl=m.attention_impl, name=name)
  return res_block, attention, common


def _time_embedding(m, t):
  """guided-diffusion's time_embed MLP on the sinusoidal embedding: (B, 4·model_channels)."""
  emb = layers.timestep_embedding(t, m.model_channels)
  emb = _dense(4 * m.model_channels, "time_embed.0", jnp.float32)(emb)
  return _dense(4 * m.model_channels, "time_embed.2", jnp.float32)(nn.silu(emb))


def _encoder(m, x, emb, train: bool):
  """The input blocks and the middle block, shared by the UNet and the classifier:
  (h, the input blocks' activations and channels, the final downsampling factor)."""
  res_block, attention, common = _blocks(m, train)
  h = x.astype(m.dtype)
  ch = int(m.channel_mult[0] * m.model_channels)
  h = _conv(ch, "input_blocks.0.0", m.dtype)(h)
  hs, chans, ds, block = [h], [ch], 1, 1
  for level, mult in enumerate(m.channel_mult):
    for _ in range(m.num_res_blocks):
      ch = int(mult * m.model_channels)
      h = res_block(out_channels=ch, name=f"input_blocks.{block}.0", **common)(h, emb)
      if ds in m.attention_resolutions:
        h = attention(f"input_blocks.{block}.1", m.num_heads)(h)
      hs.append(h)
      chans.append(ch)
      block += 1
    if level != len(m.channel_mult) - 1:
      name = f"input_blocks.{block}.0"
      if m.resblock_updown:
        h = res_block(out_channels=ch, down=True, name=name, **common)(h, emb)
      else:
        h = Downsample(ch, m.conv_resample, m.dtype, name=name)(h)
      hs.append(h)
      chans.append(ch)
      ds *= 2
      block += 1
  h = res_block(out_channels=ch, name="middle_block.0", **common)(h, emb)
  h = attention("middle_block.1", m.num_heads)(h)
  h = res_block(out_channels=ch, name="middle_block.2", **common)(h, emb)
  return h, hs, chans, ds


def check_input(m, x) -> None:
  """NHWC with m.in_channels channels, divisible by the total downsampling."""
  if x.ndim != 4 or x.shape[-1] != m.in_channels:
    raise ValueError(f"Expected NHWC input with {m.in_channels} channels; got shape "
                     f"{tuple(x.shape)}.")
  factor = 2 ** (len(m.channel_mult) - 1)
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f"Image size {x.shape[1:3]} is not divisible by {factor}, the "
                     f"downsampling of channel_mult={tuple(m.channel_mult)}.")


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
  class_dropout_prob: float = 0.0  # > 0: labels dropped to a null class (index num_classes)
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
    check_input(self, x)
    heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
    res_block, attention, common = _blocks(self, train)
    emb = _time_embedding(self, t)
    if self.num_classes is not None:
      y = layers.drop_labels(self, y, self.num_classes, self.class_dropout_prob, train)
      emb = emb + nn.Embed(self.num_classes + int(self.class_dropout_prob > 0), emb.shape[-1],
                           name="label_emb", embedding_init=nn.initializers.normal(1.0))(y)
    h, hs, chans, ds = _encoder(self, x, emb, train)

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


def attention_factors(attention_resolutions: str, image_size: int) -> tuple:
  """Resolutions with attention ("32,16,8") as guided-diffusion's downsampling factors."""
  factors = []
  for res in str(attention_resolutions).split(","):
    res = int(res)
    if res <= 0 or image_size % res:
      raise ValueError(f"attention resolution {res} does not divide image_size={image_size}.")
    factors.append(image_size // res)
  return tuple(factors)


def create(image_size: int, num_channels: int, num_res_blocks: int,
                 channel_mult="", learn_sigma: bool = False, class_cond: bool = False,
                 use_checkpoint: bool = False, attention_resolutions: str = "16",
                 num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 dropout: float = 0.0, resblock_updown: bool = False,
                 use_fp16: bool = False, use_new_attention_order: bool = False,
                 num_classes: int = NUM_CLASSES, in_channels: int = 3,
                 dtype: str = "float32", attention_impl: str = "einsum",
                 class_dropout_prob: float = 0.0) -> UNetModel:
  """The ADM UNet exactly as guided-diffusion's `create_model` builds it.

  `attention_resolutions` lists resolutions ("32,16,8"); `use_fp16` is accepted for
  argument compatibility and means dtype="bfloat16" here. `in_channels` (3 in the
  reference) allows grey images; `dtype` is the compute dtype; `attention_impl` is
  "einsum" (the reference's arithmetic) or "fused" (`jax.nn.dot_product_attention`).
  `class_dropout_prob` > 0 (not in the reference) drops training labels to a null class
  with that probability, for classifier-free guidance; its embedding gets one more row.
  """
  mult = parse_channel_mult(channel_mult, image_size)
  attention_ds = attention_factors(attention_resolutions, image_size)
  if not 0 <= class_dropout_prob < 1:
    raise ValueError(f"class_dropout_prob={class_dropout_prob} is not in [0, 1).")
  if use_fp16:
    dtype = "bfloat16"
  if dtype not in _DTYPES:
    raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(_DTYPES)}.")
  if attention_impl not in layers.ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention implementation {attention_impl!r}; choose one of "
                     f"{list(layers.ATTENTION_IMPLS)}.")
  return UNetModel(
      image_size=image_size,
      in_channels=in_channels,
      model_channels=num_channels,
      out_channels=in_channels * (2 if learn_sigma else 1),
      num_res_blocks=num_res_blocks,
      attention_resolutions=attention_ds,
      dropout=dropout,
      channel_mult=mult,
      num_classes=num_classes if class_cond else None,
      class_dropout_prob=class_dropout_prob,
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
# `create_model` arguments), with their defaults; see diffusion_jax/configs/defaults.py.
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
    class_dropout_prob=0.0,      # > 0: label dropout to a null class (for guidance)
    dropout=0.0,
    use_checkpoint=False,        # rematerialise blocks to save memory
)


def from_config(fields: dict, dtype: str, attention_impl: str) -> UNetModel:
  """The UNet that `config.model` (CONFIG_FIELDS) describes."""
  kw = {k: v for k, v in dict(fields).items() if k != "name"}
  return create(**kw, dtype=dtype, attention_impl=attention_impl)


# --- guided-diffusion's state_dict conventions (used by diffusion_jax.tools.convert) ---

TORCH_CONV1D = ("qkv", "proj_out")  # Conv1d(k=1) in PyTorch, Dense in Flax


def torch_constants(model: UNetModel) -> dict:
  del model
  return {}


def mismatch_hints(missing, unexpected, wrong_shape) -> list[str]:
  keys = set(missing) | set(unexpected)
  hints = []
  if "label_emb.weight" in wrong_shape:
    hints.append("num_classes or class_dropout_prob (a null class adds a row to the label "
                 "embedding)")
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
