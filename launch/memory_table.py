"""Device memory of the paper-scale train step, on paper: no accelerator needed.

  python3 launch/memory_table.py --json=memory.json [--models=celebahq256,adm512]

For each model (celebahq256: the paper's ADM at 256 px, batch 8; adm512: guided-
diffusion's class-conditional ImageNet-512 ADM, about 559M parameters, batch 8 per
device), compute dtype (float32, bfloat16) and use_checkpoint (off, on):

- train-state bytes per device at fsdp 1 and 8: exact, from the abstract TrainState
  (params, Adam moments, one EMA) and `state_lib.fsdp_spec`;
- activation bytes: the residuals the backward pass keeps, counted from the leaves of
  `jax.vjp`'s backward function under `jax.eval_shape` (nothing is allocated or
  compiled; the weights the backward reads are included). This is an upper bound of
  the same order as the real need: XLA fuses elementwise ops into their consumers and
  recomputes them in the backward pass instead of storing them, so compiled steps keep
  less (see docs/benchmarks.md for an H100 measurement beside it). Under fsdp the step also
  gathers the weights it uses (at most the full params, in the compute dtype).

Prints a Markdown table with the fit (state + activation bound) against H100 (80 GB),
TPU v4 (32 GB) and v5e (16 GB) HBM.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

HBM_GB = {"H100": 80, "TPU v4": 32, "TPU v5e": 16}


def _config(name: str, dtype: str, remat: bool):
  from configs import celebahq256  # pylint: disable=import-outside-toplevel
  c = celebahq256.get_config()
  if name == "adm512":  # guided-diffusion's 512×512 conditional model
    c.model.update(image_size=512, num_channels=256, num_res_blocks=2,
                   attention_resolutions="32,16,8", num_head_channels=64,
                   class_cond=True, num_classes=1000, channel_mult="")
    c.data.image_size = 512
  elif name != "celebahq256":
    raise ValueError(f"Unknown model {name!r}: choose celebahq256 or adm512.")
  c.data.batch_size = 8
  c.model.use_checkpoint = remat
  c.train.compute_dtype = dtype
  c.optim.ema_rates = (0.9999,)
  return c


def _state_bytes(abstract_state, fsdp: int) -> int:
  from diffusion_jax import state as state_lib  # pylint: disable=import-outside-toplevel
  total = 0
  sharded = (abstract_state.params, abstract_state.ema_params, abstract_state.opt_state)
  for leaf in jax_leaves(sharded):
    spec = state_lib.fsdp_spec(leaf.shape, fsdp)
    divisor = fsdp if any(s == "fsdp" for s in spec) else 1
    total += int(np.prod(leaf.shape)) * leaf.dtype.itemsize // divisor
  rest = (abstract_state.step, abstract_state.rng, abstract_state.objective_state,
          abstract_state.nonfinite_steps)
  return total + sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax_leaves(rest))


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_leaves(tree)


def measure(name: str, dtype: str, remat: bool) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import models  # pylint: disable=import-outside-toplevel
  from diffusion_jax import state as state_lib  # pylint: disable=import-outside-toplevel
  c = _config(name, dtype, remat)
  components, settings = config_lib.build(c), config_lib.train_settings(c)
  state = state_lib.abstract_state(components, settings)
  n, s = c.data.batch_size, c.model.image_size
  x = jax.ShapeDtypeStruct((n, s, s, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32) if c.model.class_cond else None

  def residuals(params, x, t, labels):
    def loss(p):
      out = models.bind(components.model, p, labels, train=True,
                        dropout_key=jax.random.PRNGKey(0))(x, t)
      return jnp.mean(out.astype(jnp.float32) ** 2)
    return jax.tree_util.tree_leaves(jax.vjp(loss, params)[1])

  kept = jax.eval_shape(residuals, state.params, x, t, labels)
  return {"model": name, "compute_dtype": dtype, "use_checkpoint": remat, "batch": n,
          "params": sum(int(np.prod(x.shape)) for x in jax_leaves(state.params)),
          "state_bytes_fsdp1": _state_bytes(state, 1),
          "state_bytes_fsdp8": _state_bytes(state, 8),
          "activation_bytes": sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in kept)}


def markdown(rows: list[dict]) -> str:
  gb = lambda b: b / 2**30
  head = ["model", "params", "dtype", "remat", "state/device fsdp 1", "fsdp 8",
          "activations (bound)"] + [f"fits {k} (fsdp 1 / 8)" for k in HBM_GB]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    need = [gb(r[f"state_bytes_fsdp{f}"] + r["activation_bytes"]) for f in (1, 8)]
    fits = ["/".join("yes" if x <= hbm else "no" for x in need) for hbm in HBM_GB.values()]
    lines.append("| " + " | ".join(
        [r["model"], f"{r['params'] / 1e6:.1f} M", r["compute_dtype"],
         "on" if r["use_checkpoint"] else "off", f"{gb(r['state_bytes_fsdp1']):.2f} GB",
         f"{gb(r['state_bytes_fsdp8']):.2f} GB", f"{gb(r['activation_bytes']):.1f} GB"]
        + fits) + " |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="celebahq256,adm512")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--remat", default="off,on")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  rows = []
  for name in args.models.split(","):
    for dtype in args.dtypes.split(","):
      for remat in args.remat.split(","):
        rows.append(measure(name, dtype, remat == "on"))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
          with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
  print(markdown(rows))
  return rows


if __name__ == "__main__":
  main()
