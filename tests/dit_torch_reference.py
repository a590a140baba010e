"""A PyTorch DiT written from the paper and the official code's structure, as a test oracle.

Independent of `diffusion_jax.models.dit` (another framework, NCHW, its own arithmetic),
with the official module names, so its state_dict has facebookresearch/DiT's keys and
`convert` can be checked against it. tests/test_dit.py also runs the official
`models.py` itself when DIT_OFFICIAL_DIR points at a checkout (it needs timm).
"""
import math

import numpy as np
import torch
from torch import nn


def pos_embed_2d(dim, grid):
  """[sincos(col), sincos(row)] per token, as the official MAE/DiT helper."""
  quarter = dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.divmod(np.arange(grid * grid), grid)

  def axis(pos):
    ang = pos[:, None].astype(np.float64) * omega[None]
    return np.concatenate([np.sin(ang), np.cos(ang)], 1)

  return np.concatenate([axis(cols), axis(rows)], 1)


class PatchEmbed(nn.Module):
  def __init__(self, patch, cin, dim):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
    return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
  def __init__(self, dim, heads, ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, c):
    s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
    return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class TimestepEmbedder(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

  freqs = None  # a test may set the float32 frequency table (see tests/test_dit.py)

  def forward(self, t):
    freqs = self.freqs
    if freqs is None:
      freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    ang = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(ang), torch.sin(ang)], -1)
    return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, dim, drop):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(drop > 0), dim)


class FinalLayer(nn.Module):
  def __init__(self, dim, patch, cout):
    super().__init__()
    self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(dim, patch * patch * cout)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
  def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
               mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
    super().__init__()
    self.p, self.cout = patch_size, in_channels * (2 if learn_sigma else 1)
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    grid = input_size // patch_size
    self.pos_embed = nn.Parameter(
        torch.from_numpy(pos_embed_2d(hidden_size, grid)).float()[None], requires_grad=False)
    self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
    self.final_layer = FinalLayer(hidden_size, patch_size, self.cout)

  def forward(self, x, t, y):
    h = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
    for block in self.blocks:
      h = block(h, c)
    h = self.final_layer(h, c)
    n, tokens, _ = h.shape
    g = int(round(tokens ** 0.5))
    h = h.reshape(n, g, g, self.p, self.p, self.cout)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, self.cout, g * self.p, g * self.p)
