"""One process of the multi-host test (run by test_distributed.py, not by pytest).

  python tests/distributed_worker.py WORKDIR single            # 1 process, 8 devices
  python tests/distributed_worker.py WORKDIR multi PORT PID    # 2 processes × 4 devices
Trains the quickstart model 3 steps on a fixed global batch and checkpoints it; in
multi mode it then also runs `train_and_sample` for 2 steps on the tiny config.
"""
import os
import sys

import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")

if __name__ == "__main__":
  workdir, mode = sys.argv[1], sys.argv[2]
  if mode == "multi":
    port, pid = sys.argv[3], int(sys.argv[4])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from diffusion_jax import checkpoints
  from diffusion_jax import config_lib
  from diffusion_jax import state as state_lib
  from diffusion_jax.training import train
  from tests import tiny_config

  assert jax.device_count() == 8, jax.devices()
  config = quickstart.get_config()
  # No warmup, and an Adam eps that keeps updates proportional to tiny gradients, so
  # that the comparison is not dominated by sign flips of near-zero gradients.
  config.optim.update(warmup_steps=0, eps=1e-3)
  components, settings = config_lib.build(config), config_lib.train_settings(config)
  mesh = state_lib.make_mesh(config)
  state, shardings = state_lib.create_train_state(components, settings, mesh)
  step = train.jit_train_step(components, settings, mesh, shardings)
  manager = checkpoints.create_manager(os.path.join(workdir, "fixed"), config)
  checkpoints.save(manager, 0, state, {}, config_lib.as_json_dict(config))
  manager.wait_until_finished()
  rng = np.random.default_rng(0)
  n, p = config.data.batch_size, jax.process_count()
  lo, hi = jax.process_index() * n // p, (jax.process_index() + 1) * n // p
  for _ in range(3):
    images = rng.uniform(-1, 1, (n, 32, 32, 1)).astype(np.float32)
    labels = np.zeros((n,), np.int32)
    batch = {k: jax.make_array_from_process_local_data(state_lib.batch_sharding(mesh), v[lo:hi])
             for k, v in (("image", images), ("label", labels))}
    state, metrics = step(state, batch)
  print("loss", float(metrics["loss"]), "grad_norm", float(metrics["grad_norm"]))
  checkpoints.save(manager, 3, state, {}, config_lib.as_json_dict(config))
  manager.wait_until_finished()
  manager.close()
  if mode == "multi":
    tiny = tiny_config.get_config()
    tiny.train.update(num_steps=2, checkpoint_every=2, log_every=1)
    final = train.train_and_sample(tiny, os.path.join(workdir, "tiny"))
    assert int(final.step) == 2
  print("done", jax.process_index())
