"""The Flax ADM UNet: parameter counts, blocks against numpy, conversion, bf16."""
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import run as run_lib
from diffusion_jax.models import create_model
from diffusion_jax.models import init_params
from diffusion_jax.models import layers
from diffusion_jax.models import unet
from diffusion_jax.tools import convert

PAPER_ROWS = [  # (image_size, num_channels, num_head_channels, parameters)
    (256, 128, 64, 93_563_910),
    (64, 128, 64, 68_159_622),
    (32, 128, 64, 30_468_870),
    (32, 64, 32, 7_632_262),
]


def _count(model):
  shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("size,ch,head_ch,want", PAPER_ROWS)
def test_parameter_counts_equal_the_reference(size, ch, head_ch, want):
  model = create_model(size, ch, 1, attention_resolutions="16", num_head_channels=head_ch,
                       resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True)
  assert _count(model) == want


@pytest.mark.parametrize("size", [512, 256, 128, 64, 32])
def test_output_shape_for_every_default_channel_mult(size):
  model = create_model(size, 64, 1, attention_resolutions=str(size // 8),
                       learn_sigma=True, class_cond=True, num_classes=10)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  params = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
  out = jax.eval_shape(lambda p, x, t: model.apply({"params": p}, x, t, jnp.zeros(2, int)),
                       params, x, t)
  assert out.shape == (2, size, size, 6)


def test_bad_sizes_are_clear_errors():
  with pytest.raises(ValueError, match="image_size=28 is not divisible by 8"):
    create_model(28, 32, 1, channel_mult="1,2,2,2", attention_resolutions="7")
  with pytest.raises(ValueError, match="No default channel_mult for image_size=28"):
    create_model(28, 32, 1)
  model = create_model(32, 32, 1, channel_mult="1,2", attention_resolutions="16")
  params = init_params(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="not divisible by 2"):
    model.apply({"params": params}, jnp.zeros((1, 15, 15, 3)), jnp.zeros(1, int))
  with pytest.raises(ValueError, match="3 channels"):
    model.apply({"params": params}, jnp.zeros((1, 32, 32, 1)), jnp.zeros(1, int))


# ---------- blocks against numpy ----------

def test_timestep_embedding_against_numpy():
  t = np.array([0, 1, 17.5, 999])
  for dim in (8, 9):
    half = dim // 2
    f = np.exp(-np.log(10000) * np.arange(half) / half)
    want = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], 1)
    if dim % 2:
      want = np.concatenate([want, np.zeros((4, 1))], 1)
    np.testing.assert_allclose(layers.timestep_embedding(jnp.asarray(t), dim), want,
                               atol=2e-4)  # float32 arguments up to 1e3 rad


def _np_group_norm(x_nchw, w, b, groups=32, eps=1e-5):
  n, c = x_nchw.shape[:2]
  g = x_nchw.reshape(n, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  shape = (1, c) + (1,) * (x_nchw.ndim - 2)
  return g.reshape(x_nchw.shape) * w.reshape(shape) + b.reshape(shape)


def test_group_norm_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, size=(2, 5, 5, 64)).astype(np.float32)
  w, b = rng.normal(size=(2, 64)).astype(np.float32)
  gn = unet._norm("n")
  y = gn.apply({"params": {"scale": w, "bias": b}}, x)
  want = _np_group_norm(x.transpose(0, 3, 1, 2).astype(np.float64), w, b)
  np.testing.assert_allclose(y, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("shape,modulated,silu", [
    ((2, 5, 5, 64), False, False), ((3, 8, 8, 192), False, False),
    ((2, 5, 5, 64), True, True), ((3, 4, 4, 96), False, True)])
def test_group_norm_gradients_match_torch(shape, modulated, silu):
  """The written-out backward of GroupNorm [· (1 + s) + t] [→ SiLU] against torch's
  autograd in float64, for x, the norm's params and the modulation (s, t)."""
  torch = pytest.importorskip("torch")  # the oracle; installed with the test requirements
  rng = np.random.default_rng(1)
  b, c = shape[0], shape[-1]
  x = rng.normal(3.0, 2.0, size=shape).astype(np.float32)
  w, bias = rng.normal(size=(2, c)).astype(np.float32)
  s, t = rng.normal(0.0, 0.5, size=(2, b, c)).astype(np.float32)
  g = rng.normal(size=shape).astype(np.float32)
  gn = unet._norm("n")

  def loss(p, x, s, t):
    y = gn.apply({"params": p}, x, (s, t) if modulated else None, silu)
    return jnp.sum(y * g)

  gp, gx, gs, gt = jax.grad(loss, argnums=(0, 1, 2, 3))({"scale": w, "bias": bias}, x, s, t)
  tx, tw, tb, ts, tt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (
      x.transpose(0, 3, 1, 2), w, bias, s, t))
  y = torch.nn.functional.group_norm(tx, 32, tw, tb, eps=1e-5)
  if modulated:
    y = y * (1 + ts[:, :, None, None]) + tt[:, :, None, None]
  if silu:
    y = torch.nn.functional.silu(y)
  (y * torch.tensor(g.transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
  np.testing.assert_allclose(gx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp["scale"], tw.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gp["bias"], tb.grad.numpy(), rtol=1e-5, atol=1e-4)
  if modulated:
    np.testing.assert_allclose(gs, ts.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gt, tt.grad.numpy(), rtol=1e-5, atol=1e-4)


def _np_attention(qkv_nct, heads, new_order):
  """guided-diffusion's QKVAttention(Legacy) semantics on (N, 3·H·C, T) arrays."""
  n, width, length = qkv_nct.shape
  ch = width // (3 * heads)
  if new_order:
    q, k, v = (a.reshape(n * heads, ch, length) for a in np.split(qkv_nct, 3, axis=1))
  else:
    q, k, v = np.split(qkv_nct.reshape(n * heads, 3 * ch, length), 3, axis=1)
  w = np.einsum("bct,bcs->bts", q, k) / np.sqrt(ch)
  w = np.exp(w - w.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bts,bcs->bct", w, v).reshape(n, heads * ch, length)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_against_numpy(new_order):
  rng = np.random.default_rng(1)
  qkv = rng.normal(size=(2, 7, 3 * 4 * 8)).astype(np.float32)  # (B, T, 3·H·C)
  got = layers.qkv_attention(jnp.asarray(qkv), 4, new_order)
  want = _np_attention(qkv.transpose(0, 2, 1).astype(np.float64), 4, new_order)
  np.testing.assert_allclose(got, want.transpose(0, 2, 1), rtol=1e-5, atol=1e-6)



def _torch_attention(qkv_nct, heads, new_order):
  """guided-diffusion's QKVAttention(Legacy) arithmetic in torch, (N, 3·H·C, T)."""
  n, width, length = qkv_nct.shape
  ch = width // (3 * heads)
  if new_order:
    q, k, v = (a.reshape(n * heads, ch, length) for a in qkv_nct.chunk(3, dim=1))
  else:
    q, k, v = qkv_nct.reshape(n * heads, 3 * ch, length).split(ch, dim=1)
  scale = 1 / ch ** 0.25
  w = (q * scale).transpose(1, 2).bmm(k * scale).softmax(dim=-1)
  return v.bmm(w.transpose(1, 2)).reshape(n, heads * ch, length)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_gradients_match_torch(new_order):
  """The written-out backward of `softmax_attention` against torch's autograd in
  float64, through qkv_attention's head split; logits large enough that the max
  subtraction matters."""
  torch = pytest.importorskip("torch")  # the oracle; installed with the test requirements
  rng = np.random.default_rng(2)
  qkv = rng.normal(0.0, 3.0, size=(2, 24, 3 * 4 * 8)).astype(np.float32)  # (B, T, 3·H·C)
  g = rng.normal(size=(2, 24, 4 * 8)).astype(np.float32)
  out, grad = jax.value_and_grad(
      lambda a: jnp.sum(layers.qkv_attention(a, 4, new_order) * g))(jnp.asarray(qkv))
  tq = torch.tensor(qkv.transpose(0, 2, 1), dtype=torch.float64, requires_grad=True)
  t_out = (_torch_attention(tq, 4, new_order)
           * torch.tensor(g.transpose(0, 2, 1), dtype=torch.float64)).sum()
  t_out.backward()
  np.testing.assert_allclose(out, t_out.item(), rtol=1e-5)
  np.testing.assert_allclose(grad, tq.grad.numpy().transpose(0, 2, 1), rtol=1e-4, atol=1e-5)


def test_attention_in_bfloat16_keeps_dtypes_and_stays_close():
  """bf16 q, k, v: outputs and cotangents stay bf16 and near the float32 result."""
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 4, 16, 8)).astype(np.float32)) for _ in range(3))
  loss = lambda *a: jnp.sum(layers.softmax_attention(*a).astype(jnp.float32) ** 2)
  out16 = layers.softmax_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
  grads16 = jax.grad(loss, argnums=(0, 1, 2))(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
  grads32 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  assert out16.dtype == jnp.bfloat16
  for g16, g32 in zip(grads16, grads32):
    assert g16.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(g16.astype(jnp.float32) - g32) / jnp.linalg.norm(g32))
    assert rel < 3e-2

# ---------- the whole network against a numpy forward over the PyTorch state_dict ----------

def _np_conv(x, w, b, stride=1):
  k = w.shape[-1]
  pad = k // 2
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  h = (x.shape[2] - k) // stride + 1
  wd = (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], h, wd))
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i:i + stride * h:stride, j:j + stride * wd:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out + b[None, :, None, None]


def _silu(x):
  return x / (1 + np.exp(-x))


class _NumpyUNet:
  """A direct NCHW float64 forward of guided-diffusion's UNet from its state_dict."""

  def __init__(self, sd, cfg):
    self.sd, self.cfg = {k: v.astype(np.float64) for k, v in sd.items()}, cfg

  def p(self, name):
    return self.sd[name]

  def resblock(self, pre, x, emb, updown=None):
    sd = self.sd
    h = _silu(_np_group_norm(x, sd[pre + ".in_layers.0.weight"], sd[pre + ".in_layers.0.bias"]))
    if updown == "up":
      h, x = (a.repeat(2, 2).repeat(2, 3) for a in (h, x))
    elif updown == "down":
      h, x = (a.reshape(a.shape[0], a.shape[1], a.shape[2] // 2, 2, a.shape[3] // 2, 2)
              .mean((3, 5)) for a in (h, x))
    h = _np_conv(h, sd[pre + ".in_layers.2.weight"], sd[pre + ".in_layers.2.bias"])
    e = _silu(emb) @ sd[pre + ".emb_layers.1.weight"].T + sd[pre + ".emb_layers.1.bias"]
    e = e[:, :, None, None]
    w0, b0 = sd[pre + ".out_layers.0.weight"], sd[pre + ".out_layers.0.bias"]
    if self.cfg["use_scale_shift_norm"]:
      scale, shift = np.split(e, 2, axis=1)
      h = _np_group_norm(h, w0, b0) * (1 + scale) + shift
    else:
      h = _np_group_norm(h + e, w0, b0)
    h = _np_conv(_silu(h), sd[pre + ".out_layers.3.weight"], sd[pre + ".out_layers.3.bias"])
    if pre + ".skip_connection.weight" in sd:
      x = _np_conv(x, sd[pre + ".skip_connection.weight"], sd[pre + ".skip_connection.bias"])
    return x + h

  def attention(self, pre, x):
    sd = self.sd
    n, c, hh, ww = x.shape
    heads = c // self.cfg["num_head_channels"]
    xf = x.reshape(n, c, -1)
    h = _np_group_norm(xf, sd[pre + ".norm.weight"], sd[pre + ".norm.bias"])
    qkv = np.einsum("oc,nct->not", sd[pre + ".qkv.weight"][:, :, 0], h)
    qkv += sd[pre + ".qkv.bias"][None, :, None]
    h = _np_attention(qkv, heads, self.cfg["use_new_attention_order"])
    h = np.einsum("oc,nct->not", sd[pre + ".proj_out.weight"][:, :, 0], h)
    h += sd[pre + ".proj_out.bias"][None, :, None]
    return (xf + h).reshape(n, c, hh, ww)

  def block(self, pre, x, emb, is_down_position):
    j = 0
    while any(k.startswith(f"{pre}.{j}.") for k in self.sd):
      sub = f"{pre}.{j}"
      if sub + ".qkv.weight" in self.sd:
        x = self.attention(sub, x)
      elif sub + ".in_layers.0.weight" in self.sd:
        updown = None
        if is_down_position:
          updown = "down"
        elif pre.startswith("output") and j > 0:
          updown = "up"
        x = self.resblock(sub, x, emb, updown)
      elif sub + ".op.weight" in self.sd:
        x = _np_conv(x, self.p(sub + ".op.weight"), self.p(sub + ".op.bias"), stride=2)
      elif sub + ".conv.weight" in self.sd:
        x = x.repeat(2, 2).repeat(2, 3)
        x = _np_conv(x, self.p(sub + ".conv.weight"), self.p(sub + ".conv.bias"))
      else:
        x = _np_conv(x, self.p(sub + ".weight"), self.p(sub + ".bias"))
      j += 1
    return x

  def __call__(self, x, t, y):
    sd, cfg = self.sd, self.cfg
    mc = cfg["num_channels"]
    half = mc // 2
    f = np.exp(-np.log(10000) * np.arange(half) / half)
    emb = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], 1)
    emb = emb @ sd["time_embed.0.weight"].T + sd["time_embed.0.bias"]
    emb = _silu(emb) @ sd["time_embed.2.weight"].T + sd["time_embed.2.bias"]
    if y is not None:
      emb = emb + sd["label_emb.weight"][y]
    n_levels, nrb = len(cfg["channel_mult"]), cfg["num_res_blocks"]
    down_positions, idx = set(), 1
    for level in range(n_levels):
      idx += nrb
      if level != n_levels - 1:
        down_positions.add(idx)
        idx += 1
    h, hs = x, []
    for i in range(idx):
      h = self.block(f"input_blocks.{i}", h, emb,
                     i in down_positions and cfg["resblock_updown"])
      hs.append(h)
    h = self.block("middle_block", h, emb, False)
    for i in range(idx):
      h = np.concatenate([h, hs.pop()], axis=1)
      h = self.block(f"output_blocks.{i}", h, emb, False)
    h = _silu(_np_group_norm(h, sd["out.0.weight"], sd["out.0.bias"]))
    return _np_conv(h, sd["out.2.weight"], sd["out.2.bias"])


def _randomise(params, seed=0):
  """Every parameter random (the zero-initialised output convs too), O(1) activations."""
  rng = np.random.default_rng(seed)
  def draw(leaf):
    fan_in = math.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 4
    return (rng.normal(size=leaf.shape) / math.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map(draw, params)


TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="8", num_head_channels=16, learn_sigma=True)


@pytest.mark.parametrize("variant", [
    dict(use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
         class_cond=True),
    dict(use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=True,
         class_cond=False),
])
def test_whole_network_matches_numpy_forward_of_the_torch_state_dict(variant):
  cfg = dict(TINY, **variant)
  model = create_model(**cfg, num_classes=5)
  params = _randomise(init_params(model, jax.random.PRNGKey(0)))
  sd = convert.flax_to_torch(params, model)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  t = np.array([3, 777])
  y = np.array([1, 4]) if cfg["class_cond"] else None
  got = jax.jit(model.apply)({"params": params}, x, t, y)
  ref = _NumpyUNet(sd, dict(cfg, channel_mult=(1, 2)))(
      x.transpose(0, 3, 1, 2).astype(np.float64), t.astype(np.float64), y)
  want = ref.transpose(0, 2, 3, 1)
  rel = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
  assert rel < 1e-5


# ---------- conversion ----------

def test_convert_round_trip_is_exact():
  model = create_model(**dict(TINY, class_cond=True, use_scale_shift_norm=True,
                              resblock_updown=True), num_classes=3)
  params = _randomise(init_params(model, jax.random.PRNGKey(1)))
  sd = convert.flax_to_torch(params, model)
  assert sd["out.2.weight"].shape == (6, 32, 3, 3)
  assert sd["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)
  assert sd["time_embed.0.weight"].shape == (128, 32)
  back = convert.torch_to_flax(sd, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.device_get(params))
  assert set(sd) == set(convert.expected_torch_shapes(model))


def test_file_formats_round_trip(tmp_path):
  model = create_model(**TINY)
  sd = convert.flax_to_torch(init_params(model, jax.random.PRNGKey(2)), model)
  convert.write_safetensors(sd, tmp_path / "m.safetensors")
  np.savez(tmp_path / "m.npz", **sd)
  for name in ("m.safetensors", "m.npz"):
    loaded = convert.read_state_dict(str(tmp_path / name))
    assert set(loaded) == set(sd)
    for k in sd:
      np.testing.assert_array_equal(loaded[k], sd[k])


def test_npz_with_pickled_objects_is_refused(tmp_path):
  np.savez(tmp_path / "evil.npz", a=np.array([object()], dtype=object))
  with pytest.raises(ValueError, match="allow_pickle"):
    convert.read_state_dict(str(tmp_path / "evil.npz"))


def test_mismatch_errors_name_the_cause():
  model = create_model(**TINY)
  sd = convert.flax_to_torch(init_params(model, jax.random.PRNGKey(3)), model)
  with pytest.raises(convert.CheckpointMismatchError, match="class_cond"):
    convert.torch_to_flax(sd, create_model(**dict(TINY, class_cond=True)))
  with pytest.raises(convert.CheckpointMismatchError, match="learn_sigma"):
    convert.torch_to_flax(sd, create_model(**dict(TINY, learn_sigma=False)))
  with pytest.raises(convert.CheckpointMismatchError, match="num_res_blocks"):
    convert.torch_to_flax(sd, create_model(**dict(TINY, num_res_blocks=2)))
  with pytest.raises(convert.CheckpointMismatchError, match="use_scale_shift_norm"):
    convert.torch_to_flax(sd, create_model(**dict(TINY, use_scale_shift_norm=True)))
  bad = dict(sd)
  del bad["out.0.bias"]
  with pytest.raises(convert.CheckpointMismatchError, match=r"Missing keys \(1\): out.0.bias"):
    convert.torch_to_flax(bad, model)


def test_bf16_stays_close_to_fp32():
  cfg = dict(TINY, use_scale_shift_norm=True, resblock_updown=True)
  model32 = create_model(**cfg)
  model16 = create_model(**cfg, dtype="bfloat16")
  params = _randomise(init_params(model32, jax.random.PRNGKey(4)))
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 16, 3))
  t = jnp.array([10, 500])
  out32 = jax.jit(model32.apply)({"params": params}, x, t)
  out16 = jax.jit(model16.apply)({"params": params}, x, t)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 2e-2


def test_remat_gives_the_same_gradients():
  model = create_model(**TINY)
  model_ckpt = create_model(**dict(TINY, use_checkpoint=True))
  params = _randomise(init_params(model, jax.random.PRNGKey(6)))
  x = jax.random.normal(jax.random.PRNGKey(7), (1, 16, 16, 3))
  t = jnp.array([100])
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x, t) ** 2)
  g1 = jax.jit(jax.grad(loss(model)))(params)
  g2 = jax.jit(jax.grad(loss(model_ckpt)))(params)
  flat1, flat2 = (jax.flatten_util.ravel_pytree(g)[0] for g in (g1, g2))
  assert float(jnp.linalg.norm(flat1 - flat2) / jnp.linalg.norm(flat2)) < 1e-5


def test_convert_cli_writes_a_loadable_checkpoint_and_never_overwrites(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from tests import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config.get_config()
  model = config_lib.build_model(config)
  params = _randomise(init_params(model, jax.random.PRNGKey(8)))
  convert.write_safetensors(convert.flax_to_torch(params, model),
                            str(tmp_path / "ema_0.9999_123.safetensors"))
  cmd = [sys.executable, "-m", "diffusion_jax.main", "--mode=convert",
         f"--checkpoint={tmp_path / 'ema_0.9999_123.safetensors'}",
         "--config=tests/tiny_config.py", f"--workdir={tmp_path / 'wd'}"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  state = run_lib.load_checkpoint(str(tmp_path / "wd"))
  assert int(state.step) == 123
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.ema_params[0],
                         jax.device_get(params))
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "already holds checkpoints" in r.stderr


def test_pt_files_are_read_without_torch(tmp_path, monkeypatch):
  """torch.save'd state_dicts load through the restricted unpickler, torch not imported."""
  import builtins  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel  (test-only: writes the file)
  model = create_model(**TINY)
  sd = convert.flax_to_torch(init_params(model, jax.random.PRNGKey(4)), model)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, tmp_path / "m.pt")
  torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
  real_import = builtins.__import__
  def no_torch(name, *a, **k):
    if name == "torch" or name.startswith("torch."):
      raise ImportError("torch must not be needed")
    return real_import(name, *a, **k)
  monkeypatch.setattr(builtins, "__import__", no_torch)
  loaded = convert.read_state_dict(str(tmp_path / "m.pt"))
  assert set(loaded) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(loaded[k], sd[k])
  with pytest.raises(Exception, match="Refusing to load torch.nn"):
    convert.read_state_dict(str(tmp_path / "module.pt"))


@pytest.mark.parametrize("new_order", [False, True])
def test_fused_attention_matches_the_reference_arithmetic(new_order):
  """train.attention=fused (jax.nn.dot_product_attention): same outputs and gradients."""
  cfg = dict(TINY, use_new_attention_order=new_order)
  ref, fused = create_model(**cfg), create_model(**cfg, attention_impl="fused")
  params = _randomise(init_params(ref, jax.random.PRNGKey(8)))
  x = jax.random.normal(jax.random.PRNGKey(9), (2, 16, 16, 3))
  t = jnp.array([10, 700])
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(m.apply({"params": p}, x, t) ** 2)))
  (l_ref, g_ref), (l_fused, g_fused) = loss(ref)(params), loss(fused)(params)
  np.testing.assert_allclose(l_fused, l_ref, rtol=1e-5)
  flat_ref, _ = jax.flatten_util.ravel_pytree(g_ref)
  flat_fused, _ = jax.flatten_util.ravel_pytree(g_fused)
  assert float(jnp.linalg.norm(flat_fused - flat_ref) / jnp.linalg.norm(flat_ref)) < 1e-5
  with pytest.raises(ValueError, match="attention implementation"):
    create_model(**cfg, attention_impl="flash")
