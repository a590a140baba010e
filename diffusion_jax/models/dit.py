"""DiT (Peebles & Xie 2023) in flax.linen, in pixel space, NHWC.

The architecture of facebookresearch/DiT's `models.py`: patchify (a p×p stride-p
convolution), a fixed 2-D sin-cos position embedding, `depth` adaLN-Zero transformer
blocks conditioned on timestep + class embeddings, and a modulated linear head that is
unpatchified to (B, H, W, out_channels), out_channels = 2·in_channels with learned sigma.
Initialisation follows the official code (xavier-uniform linears, N(0, 0.02) embeddings,
zeroed modulation and output layers), so a fresh DiT predicts 0.

Submodules are named by their PyTorch module paths ("blocks.3.attn.qkv"), so a Flax
parameter path joined with "." is the official state_dict key minus the leaf name
(`diffusion_jax.tools.convert`). The position embedding is a constant here, not a parameter;
the official state_dict stores it as `pos_embed`, which conversion checks and recreates.

Differences from the official module, all optional extensions: `num_classes=None` builds
an unconditional DiT (no label table; the official one is always class-conditional), and
`dtype`/`attention_impl` select the compute precision and attention kernel (LayerNorm,
softmax and the output head stay float32).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import layers

ARCHITECTURE_NAME = "dit"
Dtype = Any
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FREQUENCY_EMBEDDING_SIZE = 256

# The config fields of `config.model` for this architecture, with their defaults (a
# DiT-S/4 sized for 32 px). image_size, in_channels, learn_sigma, class_cond and
# num_classes are the fields every architecture shares; the rest are DiT's own names.
CONFIG_FIELDS = dict(
    name=ARCHITECTURE_NAME,
    image_size=32,           # DiT's input_size
    in_channels=3,
    learn_sigma=True,
    class_cond=False,        # False: no label embedding (num_classes is then unused)
    num_classes=10,
    patch_size=4,
    hidden_size=384,
    depth=12,
    num_heads=6,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,  # label dropout to the null class in training (for guidance)
)


def sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """The fixed 2-D position embedding (grid_size², embed_dim) float32 of MAE/DiT.

  Token m = row·grid_size + col gets [sincos(col), sincos(row)], each half being
  [sin(pos·ω), cos(pos·ω)] with ω_k = 10000^(−k/(embed_dim/4)), computed in float64.
  """
  if embed_dim % 4:
    raise ValueError(f"hidden_size={embed_dim} must be divisible by 4 for the 2-D "
                     "sin-cos position embedding.")
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
  row, col = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

  def one_axis(pos):
    out = pos.reshape(-1).astype(np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(col), one_axis(row)], axis=1).astype(np.float32)


def _xavier_conv(key, shape, dtype=jnp.float32):
  """xavier_uniform on the kernel viewed as a (out, in·p·p) matrix, as the official code."""
  fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(features: int, name: str, dtype: Dtype, zero: bool = False,
           std: float | None = None) -> nn.Dense:
  if zero:
    init = nn.initializers.zeros
  elif std is not None:
    init = nn.initializers.normal(std)
  else:
    init = nn.initializers.xavier_uniform()
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                  name=name)


def _layer_norm(x):
  """LayerNorm without affine parameters, eps 1e-6, in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + 1e-6)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def self_attention(qkv: jax.Array, num_heads: int, impl: str) -> jax.Array:
  """Multi-head self-attention: qkv (B, T, 3·D) laid out [3][heads][D/heads] -> (B, T, D)."""
  b, t, three_d = qkv.shape
  d = three_d // 3
  q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, num_heads, d // num_heads), 2, 0)
  if impl == "fused":
    out = jax.nn.dot_product_attention(q, k, v)
  else:
    scale = 1.0 / math.sqrt(d // num_heads)
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v)
  return out.reshape(b, t, d)


class DiTBlock(nn.Module):
  """x + gate·Attn(modulate(LN(x))), then x + gate·MLP(modulate(LN(x))), from c (B, D)."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float
  dtype: Dtype
  attention_impl: str

  @nn.compact
  def __call__(self, x, c):
    d = self.hidden_size
    mod = _dense(6 * d, "adaLN_modulation.1", jnp.float32, zero=True)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    h = _modulate(_layer_norm(x), shift_msa, scale_msa).astype(self.dtype)
    h = self_attention(_dense(3 * d, "attn.qkv", self.dtype)(h), self.num_heads,
                       self.attention_impl)
    h = _dense(d, "attn.proj", self.dtype)(h)
    x = x + gate_msa[:, None] * h.astype(jnp.float32)
    h = _modulate(_layer_norm(x), shift_mlp, scale_mlp).astype(self.dtype)
    h = _dense(int(d * self.mlp_ratio), "mlp.fc1", self.dtype)(h)
    h = _dense(d, "mlp.fc2", self.dtype)(nn.gelu(h, approximate=True))
    return x + gate_mlp[:, None] * h.astype(jnp.float32)


class DiT(nn.Module):
  """The diffusion transformer. Call like the UNet:
  `model.apply({"params": p}, x, t, y=None, train=False, rngs={"dropout": k})` with x
  (B, H, W, in_channels), t (B,) and y (B,) int class labels (exactly when num_classes is
  set); returns (B, H, W, out_channels) float32. In training (train=True) each label is
  replaced by the null class with probability class_dropout_prob (rng "dropout").
  """
  input_size: int
  patch_size: int
  in_channels: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int | None = 1000
  learn_sigma: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @property
  def image_size(self) -> int:
    return self.input_size

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    if (self.num_classes is None) != (y is None):
      raise ValueError("Pass class labels y exactly when the model is class-conditional "
                       f"(num_classes={self.num_classes}).")
    b, hgt, wid, ch = x.shape
    p, d = self.patch_size, self.hidden_size
    if ch != self.in_channels or hgt != self.input_size or wid != self.input_size:
      raise ValueError(f"Expected NHWC input ({self.input_size}, {self.input_size}, "
                       f"{self.in_channels}); got shape {tuple(x.shape)}.")
    grid = self.input_size // p
    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=_xavier_conv,
                name="x_embedder.proj")(x.astype(self.dtype))
    h = h.reshape(b, grid * grid, d).astype(jnp.float32) + sincos_pos_embed(d, grid)[None]

    c = layers.timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE)
    c = _dense(d, "t_embedder.mlp.0", jnp.float32, std=0.02)(c)
    c = _dense(d, "t_embedder.mlp.2", jnp.float32, std=0.02)(nn.silu(c))
    if self.num_classes is not None:
      y = layers.drop_labels(self, y, self.num_classes, self.class_dropout_prob, train)
      c = c + nn.Embed(self.num_classes + int(self.class_dropout_prob > 0), d, name="y_embedder.embedding_table",
                       embedding_init=nn.initializers.normal(0.02))(y)

    for i in range(self.depth):
      h = DiTBlock(d, self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl,
                   name=f"blocks.{i}")(h, c)

    shift, scale = jnp.split(
        _dense(2 * d, "final_layer.adaLN_modulation.1", jnp.float32, zero=True)(nn.silu(c)),
        2, -1)
    h = _dense(p * p * self.out_channels, "final_layer.linear", jnp.float32, zero=True)(
        _modulate(_layer_norm(h), shift, scale))
    h = h.reshape(b, grid, grid, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, hgt, wid, self.out_channels)


def create(input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
           hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
           mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
           num_classes: int | None = 1000, learn_sigma: bool = True,
           dtype: str = "float32", attention_impl: str = "einsum") -> DiT:
  """A DiT with the official constructor's arguments and defaults (DiT-XL/2 on 32×32×4)."""
  problems = []
  if input_size % patch_size:
    problems.append(f"input_size={input_size} is not divisible by patch_size={patch_size}")
  if hidden_size % num_heads:
    problems.append(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
  if hidden_size % 4:
    problems.append(f"hidden_size={hidden_size} is not divisible by 4 (position embedding)")
  if not 0 <= class_dropout_prob < 1:
    problems.append(f"class_dropout_prob={class_dropout_prob} is not in [0, 1)")
  if min(input_size, patch_size, in_channels, hidden_size, depth, num_heads) < 1 or (
      mlp_ratio <= 0):
    problems.append("sizes, depth, heads and mlp_ratio must be positive")
  if dtype not in _DTYPES:
    problems.append(f"dtype={dtype!r} is not one of {list(_DTYPES)}")
  if attention_impl not in layers.ATTENTION_IMPLS:
    problems.append(f"attention_impl={attention_impl!r} is not one of "
                    f"{list(layers.ATTENTION_IMPLS)}")
  if problems:
    raise ValueError("DiT: " + "; ".join(problems) + ".")
  return DiT(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
             hidden_size=hidden_size, depth=depth, num_heads=num_heads,
             mlp_ratio=float(mlp_ratio), class_dropout_prob=float(class_dropout_prob),
             num_classes=num_classes, learn_sigma=learn_sigma, dtype=_DTYPES[dtype],
             attention_impl=attention_impl)


def from_config(fields: dict, dtype: str, attention_impl: str) -> DiT:
  """The DiT that `config.model` (CONFIG_FIELDS) describes."""
  f = dict(fields)
  return create(input_size=f["image_size"], patch_size=f["patch_size"],
                in_channels=f["in_channels"], hidden_size=f["hidden_size"], depth=f["depth"],
                num_heads=f["num_heads"], mlp_ratio=f["mlp_ratio"],
                class_dropout_prob=f["class_dropout_prob"],
                num_classes=f["num_classes"] if f["class_cond"] else None,
                learn_sigma=f["learn_sigma"], dtype=dtype, attention_impl=attention_impl)


def init_params(model: DiT, key, batch_size: int = 1):
  """Float32 parameters for `model` (a pytree)."""
  x = jnp.zeros((batch_size, model.input_size, model.input_size, model.in_channels))
  t = jnp.zeros((batch_size,), jnp.int32)
  y = jnp.zeros((batch_size,), jnp.int32) if model.num_classes is not None else None
  return jax.jit(model.init)({"params": key, "dropout": key}, x, t, y)["params"]


# --- the official state_dict's conventions (used by diffusion_jax.tools.convert) ---

TORCH_CONV1D = ()  # every linear layer is nn.Linear


def torch_constants(model: DiT) -> dict[str, np.ndarray]:
  """state_dict entries that are constants here: the fixed position embedding."""
  grid = model.input_size // model.patch_size
  return {"pos_embed": sincos_pos_embed(model.hidden_size, grid)[None]}


def mismatch_hints(missing, unexpected, wrong_shape) -> list[str]:
  keys = set(missing) | set(unexpected)
  hints = []
  if any(k.startswith("blocks.") for k in keys):
    hints.append("depth (the number of blocks differs)")
  if "y_embedder.embedding_table.weight" in keys:
    hints.append("class_cond")
  if "y_embedder.embedding_table.weight" in wrong_shape:
    hints.append("num_classes or class_dropout_prob (0 drops the null-class row)")
  if "x_embedder.proj.weight" in wrong_shape or "final_layer.linear.weight" in wrong_shape:
    hints.append("patch_size, in_channels or learn_sigma")
  if "pos_embed" in wrong_shape:
    hints.append("image_size or patch_size (the token grid differs)")
  if any(".mlp.fc1." in k for k in wrong_shape):
    hints.append("mlp_ratio")
  if wrong_shape and not hints:
    hints.append("hidden_size")
  return hints
