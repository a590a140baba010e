"""DiT against a PyTorch oracle: parameter counts, outputs from converted weights, round trip.

The oracle is tests/dit_torch_reference.py; with DIT_OFFICIAL_DIR set to a checkout of
facebookresearch/DiT (and timm installed) the same checks also run against the official
`models.py`.
"""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax import run as run_lib
from diffusion_jax.models import dit
from diffusion_jax.models import layers
from diffusion_jax.tools import convert

torch = pytest.importorskip("torch")

SETTINGS = [
    dict(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=4,
         mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True),
    dict(input_size=32, patch_size=2, in_channels=1, hidden_size=48, depth=3, num_heads=3,
         mlp_ratio=2.0, class_dropout_prob=0.0, num_classes=7, learn_sigma=False),
]


def _oracles():
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, here)
  import dit_torch_reference  # pylint: disable=import-outside-toplevel
  found = [("oracle", dit_torch_reference.DiT)]
  official = os.environ.get("DIT_OFFICIAL_DIR")
  if official:
    spec = importlib.util.spec_from_file_location("dit_official_models",
                                                  os.path.join(official, "models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found.append(("official", module.DiT))
  return found


ORACLES = _oracles()


def _randomised(torch_model, seed):
  """Every trainable tensor random (the adaLN-Zero init would make the output 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in torch_model.parameters():
      if p.requires_grad:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return torch_model


def _jax_frequencies():
  """Our float32 timestep frequencies (XLA's exp), as a torch tensor."""
  return torch.from_numpy(np.array(layers.timestep_frequencies(256)))


def test_timestep_frequencies_agree_to_one_ulp():
  """The only float32 difference by construction: exp of the frequency table differs by
  at most 1 ulp between XLA and torch; at t = 999 that moves DiT outputs by ~4e-5
  relative, so the network comparison below uses one table for both."""
  theirs = torch.exp(-np.log(10000) * torch.arange(128, dtype=torch.float32) / 128).numpy()
  assert np.abs(_jax_frequencies().numpy() / theirs - 1).max() <= 2.4e-7


@pytest.mark.parametrize("kind,oracle", ORACLES, ids=[k for k, _ in ORACLES])
@pytest.mark.parametrize("settings", SETTINGS, ids=["cond16", "grey32"])
def test_matches_the_torch_dit(kind, oracle, settings):
  torch.manual_seed(0)
  reference = _randomised(oracle(**settings).eval(), 1)
  # The official module computes its own table (1 ulp apart): a looser bound there.
  tolerance = 1e-4 if kind == "official" else 1e-5
  if kind == "oracle":
    reference.t_embedder.freqs = _jax_frequencies()
  model = models.create_model(name="dit", **settings)
  state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}

  params = convert.torch_to_flax(state_dict, model)
  ours = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
  trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
  assert ours == trainable  # pos_embed is a frozen buffer in both
  fresh = models.init_params(model, jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)

  rng = np.random.default_rng(0)
  s, c = settings["input_size"], settings["in_channels"]
  x = rng.standard_normal((3, c, s, s)).astype(np.float32)
  t = np.array([0, 311, 999])
  y = np.array([0, settings["num_classes"] - 1, 2])
  with torch.no_grad():
    want = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                               jnp.asarray(t), jnp.asarray(y)))
  got = got.transpose(0, 3, 1, 2)
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= tolerance * np.abs(want).max()

  back = convert.flax_to_torch(params, model)
  assert set(back) == set(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_allclose(back[k], v, rtol=1e-6, atol=1e-6, err_msg=k)


def test_fresh_dit_predicts_zero_and_has_the_official_init_statistics():
  model = models.create_model(name="dit", **SETTINGS[0])
  params = models.init_params(model, jax.random.PRNGKey(0))
  x = jnp.ones((2, 16, 16, 3))
  out = model.apply({"params": params}, x, jnp.array([1, 2]), jnp.array([1, 2]))
  assert float(jnp.abs(out).max()) == 0.0  # adaLN-Zero and the zeroed head
  emb = params["y_embedder.embedding_table"]["embedding"]
  assert emb.shape == (11, 64) and 0.015 < float(emb.std()) < 0.025
  qkv = params["blocks.0"]["attn.qkv"]["kernel"]
  assert float(jnp.abs(qkv).max()) <= np.sqrt(6 / (64 + 192)) + 1e-6


def test_label_dropout_uses_the_null_class_in_training_only():
  model = models.create_model(name="dit", **dict(SETTINGS[0], class_dropout_prob=0.5))
  params = models.init_params(model, jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(
      lambda a: jax.random.normal(jax.random.PRNGKey(a.size), a.shape) * 0.2, params)
  x = jnp.ones((64, 16, 16, 3))
  t = jnp.full((64,), 10)
  y = jnp.zeros((64,), jnp.int32)
  null = jnp.full((64,), 10)
  eval_out = models.bind(model, params, y)(x, t)
  null_out = models.bind(model, params, null)(x, t)
  train_out = models.bind(model, params, y, train=True,
                          dropout_key=jax.random.PRNGKey(3))(x, t)
  as_null = jnp.all(jnp.isclose(train_out, null_out), axis=(1, 2, 3))
  as_label = jnp.all(jnp.isclose(train_out, eval_out), axis=(1, 2, 3))
  assert bool(jnp.all(as_null | as_label))
  assert 16 < int(as_null.sum()) < 48  # about half dropped


def test_unconditional_dit_and_bad_settings():
  model = models.create_model(name="dit", **dict(SETTINGS[0], num_classes=None))
  params = models.init_params(model, jax.random.PRNGKey(0))
  assert "y_embedder.embedding_table" not in params
  with pytest.raises(ValueError, match="class labels"):
    model.apply({"params": params}, jnp.ones((1, 16, 16, 3)), jnp.ones((1,)), jnp.ones((1,)))
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    models.create_model(name="dit", **dict(SETTINGS[0], input_size=18))
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    models.create_model(name="dit", **dict(SETTINGS[0], num_heads=5))
  with pytest.raises(ValueError, match="Unknown model.name 'vit'"):
    models.create_model(name="vit")


def test_position_embedding_against_a_direct_formula():
  emb = dit.sincos_pos_embed(8, 3)
  # token (row 1, col 2): [sin(2ω), cos(2ω), sin(1ω), cos(1ω)], ω = (1, 1/100).
  omega = np.array([1.0, 0.01])
  want = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)])
  np.testing.assert_allclose(emb[1 * 3 + 2], want, rtol=1e-6)


def test_a_foreign_pos_embed_is_refused():
  model = models.create_model(name="dit", **SETTINGS[0])
  params = models.init_params(model, jax.random.PRNGKey(0))
  state_dict = convert.flax_to_torch(params, model)
  state_dict["pos_embed"] = state_dict["pos_embed"] + 0.5
  with pytest.raises(convert.CheckpointMismatchError, match="pos_embed"):
    convert.torch_to_flax(state_dict, model)
  del state_dict["blocks.1.attn.qkv.weight"]
  with pytest.raises(convert.CheckpointMismatchError, match="depth"):
    convert.torch_to_flax(state_dict, model)


def test_dit_xl2_has_the_official_parameter_count():
  # 674,834,720 trainable parameters: counted from the official models.py (DiT-XL/2,
  # 256 px latents of 32×32×4, 1000 classes) on 2026-11-27; the paper rounds it to 675M.
  model = models.create_model(name="dit", depth=28, hidden_size=1152, patch_size=2,
                              num_heads=16)
  assert sum(int(np.prod(s)) for s in convert.param_shapes(model).values()) == 674_834_720


# --- the DiT through the whole system: train, sample, resume, compare ---

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SMALL = ["--config.train.num_steps=40", "--config.train.checkpoint_every=4",
          "--config.train.log_every=4", "--config.train.sample_every=0",
          "--config.model.hidden_size=32", "--config.model.depth=2",
          "--config.model.num_heads=2", "--config.data.dataset=digits",
          "--config.sample.num_samples=4", "--config.sample.batch_size=4",
          "--config.sample.steps=3", "--config.eval.classifier=False"]


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _cli(workdir, *args, mode="train"):
  return [sys.executable, "-m", "diffusion_jax.main", "--config=configs/dit_quickstart.py",
          f"--workdir={workdir}", f"--mode={mode}", *_SMALL, *args]


def test_one_dit_step_lowers_the_loss_on_a_fixed_batch():
  from configs import dit_quickstart  # pylint: disable=import-outside-toplevel
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import state as state_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.data import input_pipeline
  from diffusion_jax.training import train
  c = dit_quickstart.get_config()
  c.model.update(hidden_size=32, depth=2, num_heads=2)
  c.data.update(dataset="digits", batch_size=8)
  c.optim.update(lr=3e-3, warmup_steps=0, lr_schedule="constant")
  config_lib.validate_config(c, num_devices=jax.device_count())
  components, settings = config_lib.build(c), config_lib.train_settings(c)
  mesh = state_lib.make_mesh(c)
  state, shardings = state_lib.create_train_state(components, settings, mesh)
  step = jax.jit(train.make_train_step(components, settings))
  batch = {k: jnp.asarray(v) for k, v in next(input_pipeline.create_iterator(c.data, 0)).items()}
  del shardings
  losses = []
  for _ in range(8):
    state = state.replace(step=jnp.zeros((), jnp.int32))  # the same t and noise each time
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses


@pytest.mark.slow  # two 40-step DiT runs through the CLI (~2 min)
def test_dit_quickstart_trains_samples_and_resumes_bitwise_after_sigkill(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel

  from tests import process_kill  # pylint: disable=import-outside-toplevel
  ref = subprocess.run(_cli(tmp_path / "ref"), env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert (tmp_path / "ref" / "samples.png").exists()
  saved = process_kill.kill_after_first_checkpoint(_cli(tmp_path / "killed"),
                                                  tmp_path / "killed", _env(), REPO, 0.1)
  assert max(saved) < 40, f"the run finished before it was killed: {saved}"
  rerun = subprocess.run(_cli(tmp_path / "killed"), env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  a = run_lib.load_checkpoint(str(tmp_path / "ref"))
  b = run_lib.load_checkpoint(str(tmp_path / "killed"))
  assert int(a.step) == int(b.step) == 40
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  sample = subprocess.run(_cli(tmp_path / "ref", mode="sample"), env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert sample.returncode == 0, sample.stderr[-3000:]


@pytest.mark.slow  # trains and evaluates two tiny DiT runs (~3 min)
def test_dit_compare_constant_and_debias(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  r = subprocess.run(_cli(tmp_path, "--config.compare.weightings=constant,debias",
                          "--config.eval.num_samples=8", "--config.eval.num_reference=16",
                          "--config.eval.colour_num_samples=4",
                          "--config.eval.x0_num_examples=8", "--config.eval.x0_buckets=4",
                          "--config.eval.steps=2,3", "--config.eval.colour_steps=2",
                          "--config.eval.batch_size=4", "--config.eval.samplers=ddim",
                          mode="compare"),
                     env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  report = (tmp_path / "report.md").read_text()
  assert "constant" in report and "debias" in report
  assert "| FID" in report or "FID" in report
