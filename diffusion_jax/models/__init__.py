"""Model construction with guided-diffusion's `create_model` arguments."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.models.unet import ATTENTION_IMPLS, UNetModel

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


def create_model(image_size: int, num_channels: int, num_res_blocks: int,
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


__all__ = ["UNetModel", "create_model", "init_params", "parse_channel_mult"]
