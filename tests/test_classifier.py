"""The noisy classifier against guided-diffusion's EncoderUNetModel (the paper's
official code in ../shared/baseline, run beside ours as an oracle), through `convert`."""
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import classifier
from diffusion_jax.sampling import samplers
from diffusion_jax.tools import convert

BASELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared", "baseline", "debias")


@pytest.fixture(name="reference")
def _reference(monkeypatch):
  """guided_diffusion.unet of the official code (its unused cv2 import stubbed)."""
  if not os.path.isdir(os.path.join(BASELINE, "guided_diffusion")):
    pytest.fail(f"The official code is the oracle here; expected it at {BASELINE}.")
  import torch  # pylint: disable=import-outside-toplevel
  monkeypatch.syspath_prepend(BASELINE)
  if "cv2" not in sys.modules:
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))
  from guided_diffusion import unet as reference_unet  # pylint: disable=import-outside-toplevel
  return torch, reference_unet


@pytest.mark.parametrize("pool", ["attention", "adaptive"])
def test_logits_equal_guided_diffusion_through_convert(reference, pool):
  torch, reference_unet = reference
  torch.manual_seed(0)
  theirs = reference_unet.EncoderUNetModel(
      image_size=32, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
      attention_resolutions=(2, 4), channel_mult=(1, 2, 2), num_head_channels=16,
      use_scale_shift_norm=True, resblock_updown=True, pool=pool).eval()
  with torch.no_grad():  # the zero-initialised layers get values too
    for p in theirs.parameters():
      p.add_(0.05 * torch.randn_like(p))
  ours = classifier.create(32, width=32, depth=1, attention_resolutions="16,8",
                           channel_mult="1,2,2", num_classes=10, num_head_channels=16,
                           pool=pool)
  params = convert.torch_to_flax({k: v.numpy() for k, v in theirs.state_dict().items()}, ours)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
  t = np.array([0, 10, 500, 999])
  with torch.no_grad():
    expected = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                      torch.from_numpy(t)).numpy()
  got = np.asarray(ours.apply({"params": params}, jnp.asarray(x), jnp.asarray(t)))
  assert got.shape == (4, 10)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert np.abs(expected).max() > 0.1  # not a trivial zero output


def test_the_classifier_guides_a_sampler():
  """Its log-softmax is a ClassifierGuidance: the gradient has x's shape and is finite."""
  model = classifier.create(32, width=32, depth=1, attention_resolutions="8",
                            channel_mult="1,2", num_classes=10, num_head_channels=32,
                            in_channels=1)
  params = classifier.init_params(model, jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda a: a + 0.05, params)  # past the zero-init head
  log_prob = lambda x, t: jax.nn.log_softmax(model.apply({"params": params}, x, t))
  guidance = samplers.ClassifierGuidance(log_prob, jnp.arange(4) % 10, 2.0)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 1))
  g = guidance.gradient(x, jnp.full((4,), 300.0))
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_the_classifier_defaults_bind_only_where_a_classifier_is_used():
  """guided-diffusion's defaults (attention at 32/16/8 px) do not fit 16 px data: a run that
  never uses a classifier is not refused for it, training one is, naming the field."""
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = _tiny_classifier_config()
  config.classifier.attention_resolutions = "32,16,8"
  config.data.image_size = config.model.image_size = 16
  config.model.attention_resolutions = "8"
  config_lib.validate_config(config, num_devices=1)
  with pytest.raises(config_lib.ConfigError,
                     match="classifier.attention_resolutions='32,16,8': each must divide "
                           "data.image_size=16"):
    config_lib.validate_classifier(config)


def test_bad_classifier_arguments():
  with pytest.raises(ValueError, match="pool='max'"):
    classifier.create(32, pool="max")
  with pytest.raises(ValueError, match="attention resolution 7"):
    classifier.create(32, attention_resolutions="7")


def _tiny_classifier_config():
  from tests import tiny_config  # pylint: disable=import-outside-toplevel
  c = tiny_config.get_config()
  c.classifier.update(width=32, depth=1, attention_resolutions="8", channel_mult="1,2",
                      num_head_channels=32, num_steps=4, log_every=2, checkpoint_every=2)
  return c


def test_train_classifier_learns_checkpoints_and_resumes(tmp_path, capsys):
  from diffusion_jax import noisy_classifier  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import classifier_train  # pylint: disable=import-outside-toplevel
  config = _tiny_classifier_config()
  first = classifier_train.train_classifier(config, str(tmp_path))
  assert first["step"] == 4 and 0 <= first["accuracy"] <= 1
  _, params_4, step = noisy_classifier.load_params(config, str(tmp_path))
  assert step == 4
  config.classifier.num_steps = 6  # a longer run resumes from step 4
  assert classifier_train.train_classifier(config, str(tmp_path))["step"] == 6
  _, params_6, step = noisy_classifier.load_params(config, str(tmp_path))
  assert step == 6
  changed = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), params_4, params_6)
  assert max(jax.tree_util.tree_leaves(changed)) > 0
  capsys.readouterr()
  again = classifier_train.train_classifier(config, str(tmp_path))  # finished: left alone
  assert again["step"] == 6 and again["accuracy"] is None
  assert "already trained to step 6" in capsys.readouterr().out
  _, params_again, _ = noisy_classifier.load_params(config, str(tmp_path))
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params_6, params_again))
  with pytest.raises(FileNotFoundError, match="--mode=train_classifier"):
    noisy_classifier.load_params(config, str(tmp_path / "none"))


@pytest.mark.slow  # trains a tiny denoiser and classifier, then samples twice (~2 min)
def test_cli_trains_a_classifier_and_samples_with_classifier_guidance(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "wd"

  def cli(*args, expect=0):
    run = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.main", "--config=tests/tiny_config.py",
         f"--workdir={workdir}", "--cpu_devices=1", "--config.eval.classifier=False",
         "--config.classifier.width=32", "--config.classifier.depth=1",
         "--config.classifier.attention_resolutions=8", "--config.classifier.channel_mult=1,2",
         "--config.classifier.num_head_channels=32", "--config.classifier.num_steps=4",
         "--config.classifier.checkpoint_every=2"] + list(args),
        cwd=repo, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu"))
    assert run.returncode == expect, run.stderr[-3000:]
    return run.stdout + run.stderr

  cli("--mode=train")
  out = cli("--mode=sample", "--config.sample.classifier_scale=2", expect=2)
  assert "--mode=train_classifier" in out and "Traceback" not in out
  assert "Noisy classifier at step 4" in cli("--mode=train_classifier")
  assert "samples/ddim_3_cg2/samples_grid.png" in cli("--mode=sample",
                                                      "--config.sample.classifier_scale=2")
  guided = np.load(workdir / "samples" / "ddim_3_cg2" / "samples.npz")
  assert guided["arr_0"].shape == (4, 32, 32, 1)
  np.testing.assert_array_equal(guided["arr_1"], np.arange(4) % 10)  # the guided labels
  cli("--mode=sample")
  plain = np.load(workdir / "samples" / "ddim_3" / "samples.npz")["arr_0"]
  assert np.abs(plain.astype(int) - guided["arr_0"]).max() > 0


def test_a_guided_diffusion_classifier_file_imports_and_loads(reference, tmp_path):
  torch, reference_unet = reference
  torch.manual_seed(1)
  theirs = reference_unet.EncoderUNetModel(
      image_size=32, in_channels=1, model_channels=32, out_channels=10, num_res_blocks=1,
      attention_resolutions=(4,), channel_mult=(1, 2), num_head_channels=32,
      use_scale_shift_norm=True, resblock_updown=True, pool="attention").eval()
  path = str(tmp_path / "classifier_000300.pt")
  torch.save(theirs.state_dict(), path)
  config = _tiny_classifier_config()
  from diffusion_jax import noisy_classifier  # pylint: disable=import-outside-toplevel
  assert convert.convert_classifier(path, config, str(tmp_path / "wd")) == 300
  model, params, step = noisy_classifier.load_params(config, str(tmp_path / "wd"))
  assert step == 300
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
  t = np.array([3, 700])
  with torch.no_grad():
    expected = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                      torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x, t)), expected,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(FileExistsError, match="already holds a classifier"):
    convert.convert_classifier(path, config, str(tmp_path / "wd"))
