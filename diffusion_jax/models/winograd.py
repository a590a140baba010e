"""3×3 convolutions by Winograd's minimal filtering F(2×2, 3×3), for XLA:CPU.

XLA:CPU runs a 3×3 convolution as a direct (Eigen) convolution. Winograd's algorithm
(Lavin & Gray, 2016) computes each 2×2 output tile from a 4×4 input tile with 16
multiplications per channel pair instead of 36: the input tiles and the kernel are
transformed (additions only), the 16 transformed positions become 16 batched matrix
products over channels, and the products are transformed back. The train step of the
CPU benchmark cases ran 1.27× (small32) and 1.58× (paper64) faster with it on 2 cores
(PERF_NOTES.md, 2026-12-06). GPUs and TPUs keep XLA's convolution (cuDNN picks its own
algorithms), and so does every count of the model's FLOPs (`direct_convolutions`).

The result equals the direct convolution up to float32 rounding (relative differences
~1e-6 in the outputs and gradients, tests/test_winograd.py). Parameters are the usual
HWIO kernels: checkpoints do not depend on the algorithm.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

_STATE = threading.local()


@contextlib.contextmanager
def direct_convolutions():
  """Within this block, models trace XLA's convolution on every backend: for counting
  the FLOPs of the model as defined, or lowering for an accelerator from a CPU host.
  (A jitted function traced before keeps the algorithm it was traced with.)"""
  before = getattr(_STATE, "direct", False)
  _STATE.direct = True
  try:
    yield
  finally:
    _STATE.direct = before


def _nhwc_hwio(lhs, rhs) -> lax.ConvDimensionNumbers:
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))


def applies(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
            dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
            precision=None, preferred_element_type=None) -> bool:
  """Whether `conv_general_dilated` runs this convolution by Winograd's algorithm: on the
  CPU backend, outside `direct_convolutions`, for a float32 NHWC/HWIO 3×3 convolution with
  stride 1, padding 1 ("same"), no dilation or groups, and even height and width."""
  if getattr(_STATE, "direct", False) or jax.default_backend() != "cpu":
    return False
  if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return False
  if isinstance(padding, str) or tuple(map(tuple, padding)) != ((1, 1), (1, 1)):
    return False
  numbers = (dimension_numbers if isinstance(dimension_numbers, lax.ConvDimensionNumbers)
             or dimension_numbers is None else lax.conv_dimension_numbers(
                 lhs.shape, rhs.shape, dimension_numbers))
  return (numbers == _nhwc_hwio(lhs, rhs) and rhs.shape[:2] == (3, 3)
          and tuple(window_strides) == (1, 1)
          and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
          and feature_group_count == 1 and batch_group_count == 1 and precision is None
          and preferred_element_type in (None, jnp.float32)
          and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, **kwargs) -> Any:
  """`lax.conv_general_dilated`, by `conv3x3` where `applies` says so (flax's
  `nn.Conv(conv_general_dilated=...)` hook)."""
  if applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
             dimension_numbers, **kwargs):
    return conv3x3(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, **kwargs)


# The 1-D transforms of F(2, 3) on tuples of arrays. Inputs d0..d3 → Bᵀd; kernel taps
# g0..g2 → G g; products m0..m3 → Aᵀm; and the adjoint (transpose) of each.
def _bt(d0, d1, d2, d3):
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _bt_adjoint(v0, v1, v2, v3):
  return v0, v1 - v2 + v3, v1 + v2 - v0, -v3


def _g(g0, g1, g2):
  return g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2


def _g_adjoint(u0, u1, u2, u3):
  return u0 + (u1 + u2) * 0.5, (u1 - u2) * 0.5, (u1 + u2) * 0.5 + u3


def _at(m0, m1, m2, m3):
  return m0 + m1 + m2, m1 - m2 - m3


def _at_adjoint(y0, y1):
  return y0, y0 + y1, y0 - y1, -y1


def _input_transform(x):
  """(B, H, W, C) → (16, B·H/2·W/2, C): Bᵀ d B for every 4×4 tile (stride 2) of x padded by 1."""
  _, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = _bt(*(xp[:, i:i + h:2] for i in range(4)))
  tiles = [t for r in rows for t in _bt(*(r[:, :, j:j + w:2] for j in range(4)))]
  return jnp.stack(tiles).reshape(16, -1, c)


def _overlap_add(parts, axis: int, size: int):
  """Adjoint of taking 4 stride-2 slices along `axis` of an array padded by 1 on each
  side: tile t's part k lands at padded position 2t + k. Returns the unpadded `size`."""
  def pad(a, before, after):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (before, after)
    return jnp.pad(a, widths)
  even = pad(parts[0], 0, 1) + pad(parts[2], 1, 0)  # padded positions 2t
  odd = pad(parts[1], 0, 1) + pad(parts[3], 1, 0)   # padded positions 2t + 1
  both = jnp.stack([even, odd], axis + 1)
  shape = list(even.shape)
  shape[axis] *= 2
  return lax.slice_in_dim(both.reshape(shape), 1, size + 1, axis=axis)


def _input_transform_adjoint(dv, shape):
  b, h, w, c = shape
  dv = dv.reshape(4, 4, b, h // 2, w // 2, c)
  rows = [_overlap_add(_bt_adjoint(*(dv[i, j] for j in range(4))), 2, w) for i in range(4)]
  return _overlap_add(_bt_adjoint(*rows), 1, h)


def _kernel_transform(kernel):
  """(3, 3, Ci, Co) → (16, Ci, Co): G g Gᵀ."""
  rows = _g(kernel[0], kernel[1], kernel[2])
  return jnp.stack([t for r in rows for t in _g(r[0], r[1], r[2])])


def _kernel_transform_adjoint(du):
  du = du.reshape(4, 4, *du.shape[1:])
  rows = [jnp.stack(_g_adjoint(*(du[i, j] for j in range(4)))) for i in range(4)]
  return jnp.stack(_g_adjoint(*rows))


def _output_transform(m, shape):
  """(16, B·H/2·W/2, Co) → (B, H, W, Co): Aᵀ M A per tile, tiles put side by side."""
  b, h, w, _ = shape
  m = m.reshape(4, 4, b, h // 2, w // 2, -1)
  rows = _at(*(m[i] for i in range(4)))
  y = [_at(*(r[j] for j in range(4))) for r in rows]  # y[row in tile][column in tile]
  return jnp.stack([jnp.stack(y[i], 3) for i in range(2)], 2).reshape(b, h, w, -1)


def _output_transform_adjoint(dy):
  b, h, w, c = dy.shape
  d = dy.reshape(b, h // 2, 2, w // 2, 2, c)
  rows = [jnp.stack(_at_adjoint(d[:, :, i, :, 0], d[:, :, i, :, 1])) for i in range(2)]
  return jnp.stack(_at_adjoint(*rows)).reshape(16, -1, c)


@jax.custom_vjp
def conv3x3(x, kernel):
  """3×3 convolution, stride 1, zero padding 1: x (B, H, W, Ci) float32 with H and W
  even, kernel (3, 3, Ci, Co) → (B, H, W, Co), as `lax.conv_general_dilated` computes it
  (cross-correlation, NHWC/HWIO)."""
  return _conv3x3_forward(x, kernel)[0]


def _conv3x3_forward(x, kernel):
  v, u = _input_transform(x), _kernel_transform(kernel)
  y = _output_transform(jnp.einsum("tnc,tcd->tnd", v, u), (*x.shape[:3], kernel.shape[3]))
  return y, (v, u, x.shape)


def _conv3x3_backward(residuals, dy):
  # Written out (not left to autodiff) so the transposed transforms stay elementwise
  # passes and the products stay two batched matrix products.
  v, u, shape = residuals
  dm = _output_transform_adjoint(dy)
  dv = jnp.einsum("tnd,tcd->tnc", dm, u)
  du = jnp.einsum("tnc,tnd->tcd", v, dm)
  return _input_transform_adjoint(dv, shape), _kernel_transform_adjoint(du)


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)
