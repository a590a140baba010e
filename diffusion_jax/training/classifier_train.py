"""--mode=train_classifier: guided-diffusion's noisy classifier, for classifier guidance.

Trains `models.classifier` (config.classifier) to predict the label of x_t = √ᾱ_t x_0 +
√(1 − ᾱ_t) ε at t ~ U{0..T−1}, given t, with cross-entropy and AdamW, on config.data with
the run's diffusion, as guided-diffusion's classifier_train.py does (noised=True).
Checkpoints (params, optimizer, step, data position) go to WORKDIR/classifier/ every
classifier.checkpoint_every steps and at the end; a rerun resumes, and a finished one is
left alone. `--mode=sample --config.sample.classifier_scale=S` then guides with it.
"""
from __future__ import annotations

import collections
import os
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from diffusion_jax import config_lib
from diffusion_jax import noisy_classifier
from diffusion_jax import paths
from diffusion_jax.data import input_pipeline


def train_classifier(config, workdir: str) -> dict:
  """Trains (or resumes) the noisy classifier; returns {"step", "accuracy", "dir"}."""
  config_lib.validate_config(config)
  config_lib.validate_classifier(config)
  c = config.classifier
  model, tx = noisy_classifier.build(config), noisy_classifier.optimizer(config)
  diffusion = config_lib.build_diffusion(config)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = jax.jit(lambda k: noisy_classifier.init_state(model, tx, k),
                  out_shardings=replicated)(
      jax.random.PRNGKey(c.seed))
  data_iter = input_pipeline.create_iterator(config.data, config.data.seed)
  mgr = noisy_classifier.manager(workdir)
  if mgr.latest_step() is not None:
    restored = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data_iter=ocp.args.JsonRestore()))
    state = restored["state"]
    if restored["data_iter"]:  # an imported classifier starts the data afresh
      data_iter.set_state(restored["data_iter"])

  def loss_fn(params, images, labels, key):
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, labels.shape, 0, diffusion.num_timesteps)
    x_t = diffusion.q_sample(images, t, jax.random.normal(k_noise, images.shape))
    logits = model.apply({"params": params}, x_t, t, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

  @jax.jit
  def step_fn(state, images, labels):
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), state["step"])
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], images, labels, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
             "step": state["step"] + 1}, {"loss": loss, "accuracy": accuracy})

  step, recent = int(state["step"]), collections.deque(maxlen=c.log_every)
  start = time.time()
  with tqdm(total=c.num_steps, initial=step, desc="classifier", unit="step",
            disable=jax.process_index() != 0) as bar:
    while step < c.num_steps:
      batch = next(data_iter)
      images, labels = (jax.make_array_from_process_local_data(batch_sharding,
                                                               np.asarray(batch[k]))
                        for k in ("image", "label"))
      state, metrics = step_fn(state, images, labels)
      step += 1
      recent.append(metrics)
      bar.update(1)
      if step % c.log_every == 0:
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                        acc=f"{float(metrics['accuracy']):.2f}")
      if step % c.checkpoint_every == 0 or step == c.num_steps:
        mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave(data_iter.get_state())))
  mgr.wait_until_finished()
  mgr.close()
  accuracy = float(np.mean([float(m["accuracy"]) for m in recent])) if recent else None
  out = os.fspath(paths.path(workdir) / noisy_classifier.CHECKPOINTS)
  if jax.process_index() == 0:
    if recent:
      print(f"Noisy classifier at step {step}: accuracy {accuracy:.2f} over all t (last "
            f"{len(recent)} batches), {time.time() - start:.0f} s → {out}", flush=True)
    else:
      print(f"Noisy classifier already trained to step {step} (classifier.num_steps = "
            f"{c.num_steps}) in {out}; raise classifier.num_steps to train on.", flush=True)
  return {"step": step, "accuracy": accuracy, "dir": out}
