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


def test_bad_classifier_arguments():
  with pytest.raises(ValueError, match="pool='max'"):
    classifier.create(32, pool="max")
  with pytest.raises(ValueError, match="attention resolution 7"):
    classifier.create(32, attention_resolutions="7")
