"""Parameter sharding (train.fsdp): the per-leaf rule, equal training at every fsdp, the
state's bytes per device, and checkpoints that restore under another fsdp/device count."""
import json
import os
import subprocess
import sys

from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from diffusion_jax import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices):
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def test_the_rule_shards_the_largest_divisible_dimension_and_replicates_small_leaves():
  assert state_lib.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
  assert state_lib.fsdp_spec((3, 3, 130, 64), 4) == P(None, None, None, "fsdp")  # 130 % 4 != 0
  assert state_lib.fsdp_spec((512, 512), 8) == P("fsdp", None)  # ties: the first dimension
  assert state_lib.fsdp_spec((3, 3, 131, 67), 4) == P()  # nothing divides
  assert state_lib.fsdp_spec((256,), 4) == P()  # a bias: below FSDP_MIN_ELEMENTS
  assert state_lib.fsdp_spec((), 4) == P()
  assert state_lib.fsdp_spec((3, 3, 64, 128), 1) == P()


_SHARDED_STEPS = """
import jax, jax.numpy as jnp, numpy as np, jax.flatten_util, json, sys
jax.config.update("jax_disable_most_optimizations", True)
from diffusion_jax import config_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.training import train
from diffusion_jax import state as state_lib
from tests import tiny_config
config = tiny_config.get_config()
# Adam's first steps are ±lr wherever |g| >> eps, so a different reduction order (an
# all-reduce against a reduce-scatter) in a near-zero gradient moves a parameter by up to
# lr. A larger eps keeps Adam proportional to g there, and the comparison meaningful.
config.optim.eps = 1e-3
it = input_pipeline.create_iterator(config.data, 0)
batches = [next(it) for _ in range(3)]
out = {}
for fsdp in FSDPS:
  config.train.fsdp = fsdp
  components, settings = config_lib.build(config), config_lib.train_settings(config)
  mesh = state_lib.make_mesh(config)
  state, sh = state_lib.create_train_state(components, settings, mesh)
  nbytes = state_lib.state_bytes_per_device(state, sh)
  step = train.jit_train_step(components, settings, mesh, sh)
  bs = state_lib.batch_sharding(mesh)
  losses = []
  for b in batches:
    state, m = step(state, {k: jax.device_put(v, bs) for k, v in b.items()})
    losses.append(float(m["loss"]))
  shards = {leaf.addressable_shards[0].data.size / leaf.size for leaf in jax.tree_util.tree_leaves(state.params) if leaf.size >= state_lib.FSDP_MIN_ELEMENTS}
  flat = np.asarray(jax.flatten_util.ravel_pytree(jax.device_get(state))[0])
  out[fsdp] = dict(bytes=nbytes, losses=losses, shard_fractions=sorted(shards))
  np.save(f"{sys.argv[1]}/state_{fsdp}.npy", flat)
print(json.dumps(out))
"""


@pytest.mark.slow  # four 8-device compiles in a subprocess (~1.5 min)
def test_fsdp_1_2_4_8_train_alike_and_shrink_the_state_per_device(tmp_path):
  script = _SHARDED_STEPS.replace("FSDPS", "(1, 2, 4, 8)")
  r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=_env(8), cwd=REPO,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
  ref = np.load(tmp_path / "state_1.npy")
  for fsdp in (2, 4, 8):
    np.testing.assert_allclose(out[fsdp]["losses"], out[1]["losses"], rtol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / f"state_{fsdp}.npy"), ref, rtol=1e-4,
                               atol=1e-6)
    # Every large param leaf holds 1/fsdp of itself on each device.
    assert out[fsdp]["shard_fractions"] == [1 / fsdp], out[fsdp]["shard_fractions"]
    # Biases and norms stay replicated, so the shrink is a little under the factor.
    assert out[1]["bytes"] / out[fsdp]["bytes"] > 0.85 * fsdp, (fsdp, out)
  assert out[1]["shard_fractions"] == [1.0]


_QUICK_8 = ["--config=configs/quickstart.py", "--mode=train", "--config.train.num_steps=8",
            "--config.train.checkpoint_every=4", "--config.train.log_every=4",
            "--config.train.sample_every=0", "--config.sample.num_samples=8",
            "--config.sample.batch_size=8", "--config.sample.steps=2",
            "--config.eval.classifier=False", "--config.optim.eps=1e-3"]


def _quickstart(workdir, devices, *args):
  r = subprocess.run([sys.executable, "-m", "diffusion_jax.main", f"--workdir={workdir}",
                      *_QUICK_8, *args], env=_env(devices), cwd=REPO, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # four quickstart CLI runs (~4 min)
def test_quickstart_at_fsdp_1_and_4_agree_and_each_checkpoint_restores_under_the_other(
    tmp_path):
  import jax  # pylint: disable=import-outside-toplevel

  from diffusion_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  _quickstart(tmp_path / "fsdp1", 8, "--config.train.fsdp=1")
  _quickstart(tmp_path / "fsdp4", 8, "--config.train.fsdp=4")
  a = run_lib.load_checkpoint(str(tmp_path / "fsdp1"))
  b = run_lib.load_checkpoint(str(tmp_path / "fsdp4"))
  assert int(a.step) == int(b.step) == 8
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  # Resume each under the other layout: fsdp=4 on 8 devices → fsdp=1 on 1 device, and back.
  _quickstart(tmp_path / "fsdp4", 1, "--config.train.fsdp=1", "--config.train.num_steps=9")
  _quickstart(tmp_path / "fsdp1", 8, "--config.train.fsdp=4", "--config.train.num_steps=9")
  for name in ("fsdp1", "fsdp4"):
    assert int(run_lib.load_checkpoint(str(tmp_path / name)).step) == 9


@pytest.mark.slow  # two bench subprocesses on 8 devices (~1 min)
def test_bench_reports_the_state_shrinking_with_fsdp(tmp_path):
  sizes = {}
  for fsdp in (1, 4):
    out = tmp_path / f"bench_{fsdp}.json"
    r = subprocess.run([sys.executable, "-m", "diffusion_jax.tools.bench",
                        "--config=configs/bench_cpu_small.py", f"--config.train.fsdp={fsdp}",
                        "--runs=1", "--warmup=0", f"--json={out}"], env=_env(8), cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    sizes[fsdp] = json.loads(out.read_text())["state_bytes_per_device"]
  assert sizes[1] / sizes[4] >= 3, sizes
