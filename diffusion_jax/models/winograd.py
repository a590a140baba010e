"""3×3 convolutions by Winograd's minimal filtering F(4×4, 3×3) and F(2×2, 3×3), for XLA:CPU.

XLA:CPU runs a 3×3 convolution as a direct (Eigen) convolution: 9 multiplications per output
and channel pair. Winograd's algorithm (Lavin & Gray, 2016) computes an m×m output tile from
an (m+2)×(m+2) input tile: the input tiles and the kernel are transformed (additions and
scalings), the (m+2)² transformed positions become that many batched matrix products over
channels, and the products are transformed back. F(4×4, 3×3) does 36 products per 16 outputs
(2.25 per output), F(2×2, 3×3) 16 per 4 (4 per output). Heights and widths divisible by 4 take
F(4×4, 3×3), other even ones F(2×2, 3×3). Speed-ups of the CPU benchmark's train step are in
PERF_NOTES.md (2026-12-06). GPUs and TPUs keep XLA's convolution (cuDNN picks its own
algorithms), and so does every count of the model's FLOPs (`direct_convolutions`).

The result equals the direct convolution up to float32 rounding: relative differences ~1e-6
for F(2×2, 3×3) and ~5e-6 for F(4×4, 3×3), whose transforms scale by up to 8 and 1/24
(tests/test_winograd.py). Parameters are the usual HWIO kernels: checkpoints do not depend on
the algorithm.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any
from typing import NamedTuple
from typing import Sequence

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


class Tiling(NamedTuple):
  """F(m×m, 3×3): output tile size m and the transforms of Lavin & Gray (2016), rows of
  Bᵀ ((m+2)×(m+2), input), G ((m+2)×3, kernel) and Aᵀ (m×(m+2), output)."""
  m: int
  bt: tuple[tuple[float, ...], ...]
  g: tuple[tuple[float, ...], ...]
  at: tuple[tuple[float, ...], ...]


F2x2 = Tiling(
    m=2,
    bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    g=((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1)),
    at=((1, 1, 1, 0), (0, 1, -1, -1)))

F4x4 = Tiling(
    m=4,
    bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
    g=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
       (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
    at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)))


def tiling_for(height: int, width: int) -> Tiling | None:
  """The largest tiling whose tile divides both sides; None if a side is odd."""
  for tiling in (F4x4, F2x2):
    if height % tiling.m == 0 and width % tiling.m == 0:
      return tiling
  return None


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
          and tiling_for(lhs.shape[1], lhs.shape[2]) is not None)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, **kwargs) -> Any:
  """`lax.conv_general_dilated`, by `conv3x3` where `applies` says so (flax's
  `nn.Conv(conv_general_dilated=...)` hook)."""
  if applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
             dimension_numbers, **kwargs):
    return conv3x3(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, **kwargs)


def _combine(matrix: Sequence[Sequence[float]], xs: Sequence[jax.Array]) -> list[jax.Array]:
  """[Σ_j matrix[i][j] · xs[j] for each row i], skipping zero coefficients and
  multiplications by ±1 (the transforms are sparse)."""
  out = []
  for row in matrix:
    acc = None
    for coefficient, x in zip(row, xs):
      if coefficient == 0:
        continue
      term = x if coefficient == 1 else -x if coefficient == -1 else x * coefficient
      acc = term if acc is None else acc + term
    out.append(acc)
  return out


def _transposed(matrix):
  return tuple(zip(*matrix))


def _input_transform(x, tiling: Tiling):
  """(B, H, W, C) → ((m+2)², B·H/m·W/m, C): Bᵀ d B for every (m+2)×(m+2) tile (stride m)
  of x padded by 1."""
  _, h, w, c = x.shape
  m, a = tiling.m, tiling.m + 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = _combine(tiling.bt, [xp[:, i:i + h:m] for i in range(a)])
  tiles = [t for r in rows for t in _combine(tiling.bt, [r[:, :, j:j + w:m] for j in range(a)])]
  return jnp.stack(tiles).reshape(a * a, -1, c)


def _overlap_add(parts, axis: int, size: int, m: int):
  """Adjoint of taking m+2 stride-m slices along `axis` of an array padded by 1 on each
  side: tile t's part k lands at padded position m·t + k, so phase p < m collects part p of
  tile t and part p + m of tile t − 1. Returns the unpadded `size`."""
  def pad(a, before, after):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (before, after)
    return jnp.pad(a, widths)
  phases = [pad(parts[p], 0, 1) + pad(parts[p + m], 1, 0) if p + m < len(parts)
            else pad(parts[p], 0, 1) for p in range(m)]
  shape = list(phases[0].shape)
  shape[axis] *= m
  return lax.slice_in_dim(jnp.stack(phases, axis + 1).reshape(shape), 1, size + 1, axis=axis)


def _input_transform_adjoint(dv, shape, tiling: Tiling):
  b, h, w, c = shape
  m, a = tiling.m, tiling.m + 2
  dv = dv.reshape(a, a, b, h // m, w // m, c)
  b_matrix = _transposed(tiling.bt)
  rows = [_overlap_add(_combine(b_matrix, [dv[i, j] for j in range(a)]), 2, w, m)
          for i in range(a)]
  return _overlap_add(_combine(b_matrix, rows), 1, h, m)


def _kernel_transform(kernel, tiling: Tiling):
  """(3, 3, Ci, Co) → ((m+2)², Ci, Co): G g Gᵀ."""
  rows = _combine(tiling.g, [kernel[0], kernel[1], kernel[2]])
  return jnp.stack([t for r in rows for t in _combine(tiling.g, [r[0], r[1], r[2]])])


def _kernel_transform_adjoint(du, tiling: Tiling):
  a = tiling.m + 2
  du = du.reshape(a, a, *du.shape[1:])
  g_t = _transposed(tiling.g)
  rows = [jnp.stack(_combine(g_t, [du[i, j] for j in range(a)])) for i in range(a)]
  return jnp.stack(_combine(g_t, rows))


def _output_transform(products, shape, tiling: Tiling):
  """((m+2)², B·H/m·W/m, Co) → (B, H, W, Co): Aᵀ M A per tile, tiles put side by side."""
  b, h, w, _ = shape
  m, a = tiling.m, tiling.m + 2
  products = products.reshape(a, a, b, h // m, w // m, -1)
  rows = _combine(tiling.at, [products[i] for i in range(a)])
  y = [_combine(tiling.at, [r[j] for j in range(a)]) for r in rows]  # y[tile row][tile col]
  return jnp.stack([jnp.stack(y[i], 3) for i in range(m)], 2).reshape(b, h, w, -1)


def _output_transform_adjoint(dy, tiling: Tiling):
  b, h, w, c = dy.shape
  m, a = tiling.m, tiling.m + 2
  d = dy.reshape(b, h // m, m, w // m, m, c)
  a_matrix = _transposed(tiling.at)
  rows = [jnp.stack(_combine(a_matrix, [d[:, :, i, :, j] for j in range(m)]))
          for i in range(m)]
  return jnp.stack(_combine(a_matrix, rows)).reshape(a * a, -1, c)


def conv3x3(x, kernel, tiling: Tiling | None = None):
  """3×3 convolution, stride 1, zero padding 1: x (B, H, W, Ci) float32 with H and W
  even, kernel (3, 3, Ci, Co) → (B, H, W, Co), as `lax.conv_general_dilated` computes it
  (cross-correlation, NHWC/HWIO). `tiling` defaults to `tiling_for(H, W)`."""
  tiling = tiling or tiling_for(x.shape[1], x.shape[2])
  if tiling is None or x.shape[1] % tiling.m or x.shape[2] % tiling.m:
    raise ValueError(f"Winograd's 3×3 convolution needs height and width divisible by its "
                     f"tile ({tiling.m if tiling else 2}), got {x.shape[1:3]}")
  return _conv3x3(x, kernel, tiling)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, kernel, tiling):
  return _conv3x3_forward(x, kernel, tiling)[0]


def _conv3x3_forward(x, kernel, tiling):
  v, u = _input_transform(x, tiling), _kernel_transform(kernel, tiling)
  y = _output_transform(jnp.einsum("tnc,tcd->tnd", v, u), (*x.shape[:3], kernel.shape[3]),
                        tiling)
  return y, (v, u, x.shape)


def _conv3x3_backward(tiling, residuals, dy):
  # Written out (not left to autodiff) so the transposed transforms stay elementwise
  # passes and the products stay two batched matrix products.
  v, u, shape = residuals
  dm = _output_transform_adjoint(dy, tiling)
  dv = jnp.einsum("tnd,tcd->tnc", dm, u)
  du = jnp.einsum("tnc,tnd->tcd", v, dm)
  return _input_transform_adjoint(dv, shape, tiling), _kernel_transform_adjoint(du, tiling)


_conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)
