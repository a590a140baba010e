"""The ODE solvers (DPM-Solver++, UniPC) and their settings, on Gaussian data."""
import re

import jax
import numpy as np
import pytest

from diffusion_jax import config_lib
from diffusion_jax.sampling import samplers
from diffusion_jax.sampling import solvers
from tests import tiny_config
from tests.gaussian_data import make_diffusion as _diffusion
from tests.gaussian_data import run_sampler as _run


def test_solvers_beat_ddim_and_converge_at_their_order():
  """Errors against DDIM-1000 (the issue's converged ODE) and, for the order, against a
  much finer solve (UniPC-3, 1000 steps), since DDIM-1000 itself is off by ~1e-3."""
  diff = _diffusion()
  steps = [5, 10, 20, 40]
  refs = {"DDIM-1000": _run(diff, "ddim", 1000),
          "UniPC3-1000": _run(diff, "unipc", 1000, order=3)}
  runs = {s: [_run(diff, s, k) for k in steps] for s in ("ddim", "dpm_solver++", "unipc")}
  err = {r: {s: [float(np.sqrt(np.mean((x - ref) ** 2))) for x in xs]
             for s, xs in runs.items()} for r, ref in refs.items()}
  for r in refs:
    print(f"\nRMSE against {r}, linear schedule, Gaussian data")
    print("sampler        " + "  ".join(f"{k:>8d}" for k in steps) + "   order 20→40")
    for s, e in err[r].items():
      print(f"{s:13s}" + "  ".join(f"{v:8.1e}" for v in e)
            + f"   {np.log2(e[2] / e[3]):.1f}")
  ddim = err["DDIM-1000"]["ddim"]
  for s in ("dpm_solver++", "unipc"):
    assert err["DDIM-1000"][s][1] < ddim[1] and err["DDIM-1000"][s][2] < ddim[2]
  fine = err["UniPC3-1000"]
  assert 0.7 < np.log2(fine["ddim"][2] / fine["ddim"][3]) < 1.3  # DDIM: first order
  for s in ("dpm_solver++", "unipc"):
    assert np.log2(fine[s][2] / fine[s][3]) > 1.6, s  # second order (or better)



def test_skip_type_and_order_change_the_solve():
  diff = _diffusion()
  base = _run(diff, "unipc", 6)
  assert np.abs(_run(diff, "unipc", 6, skip_type="time_uniform") - base).max() > 1e-4
  assert np.abs(_run(diff, "unipc", 6, order=1) - base).max() > 1e-4
  assert np.abs(_run(diff, "unipc", 6, order=2, skip_type="logSNR") - base).max() == 0


@pytest.mark.parametrize("sampler,fields,message", [
    ("unipc", dict(order=4), "sample.order=4: UniPC takes order 1, 2 or 3"),
    ("dpm_solver++", dict(order=3), "sample.order=3: DPM-Solver++ here is the second-order"),
    ("unipc", dict(skip_type="quadratic"), "sample.skip_type='quadratic'"),
    ("ddim", dict(order=3), "sample.order=3: applies to ['dpm_solver++', 'unipc'], not to"),
    ("ddpm", dict(skip_type="time_uniform"), "sample.skip_type='time_uniform': applies to"),
])
def test_an_invalid_sampler_combination_names_the_field(sampler, fields, message):
  config = tiny_config.get_config()
  config.sample.sampler = sampler
  for k, v in fields.items():
    with config.unlocked():
      config.sample[k] = v
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate_config(config, num_devices=1)


def test_generate_passes_the_solver_settings():
  """config.sample.order reaches the solver through `generate` (not only `sample`)."""
  config = tiny_config.get_config()
  model, diffusion = config_lib.build_model(config), config_lib.build_diffusion(config)
  from diffusion_jax import models  # pylint: disable=import-outside-toplevel
  params = models.init_params(model, jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(
      jax.random.PRNGKey(a.size), a.shape), params)  # zero-init output layers would hide it
  images = {}
  for order in (1, 3):
    s = config.sample.copy_and_resolve_references()
    s.update(sampler="unipc", steps=4, num_samples=2, batch_size=2, order=order)
    images[order] = samplers.generate(model, diffusion, params, s, "", class_cond=False,
                                      num_classes=1, image_shape=(32, 32, 1),
                                      write=False)["images"]
  assert np.abs(images[1].astype(int) - images[3].astype(int)).max() > 0
  assert solvers.SKIP_TYPES == ("logSNR", "time_uniform")
