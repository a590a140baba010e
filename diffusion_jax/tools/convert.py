"""PyTorch checkpoints ⇄ Flax parameters, for every architecture in `models`:
guided-diffusion / Debias UNets and facebookresearch/DiT transformers.

Flax submodules carry their PyTorch module paths as names (see `models.unet`,
`models.dit`), so a PyTorch key is the Flax path joined by "." plus the PyTorch leaf
name. Layouts: conv weights (O, I, kh, kw) ⇄ kernels (kh, kw, I, O); linear (O, I) and
1×1 conv1d (O, I, 1; the architecture's TORCH_CONV1D) ⇄ dense kernels (I, O); GroupNorm
weight ⇄ scale; Embedding ⇄ embedding. Entries that are constants in Flax (DiT's fixed
`pos_embed`) are checked against the model's value on import and written on export.

Reading checkpoint files is a security boundary: `.safetensors` and `.npz` are read
without pickle; `.pt` (torch's zip format) goes through `torch_archive`, a restricted
unpickler that builds arrays and refuses every other object. torch is not needed.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Mapping
import zipfile
import zlib

from flax import traverse_util
import jax
import ml_dtypes
import numpy as np

from diffusion_jax import models
from diffusion_jax import paths
from diffusion_jax import torch_archive

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight",
                  "bias": "bias", "positional_embedding": "positional_embedding"}


class CheckpointMismatchError(ValueError):
  """A state_dict that does not fit the model; the message lists every difference."""


def param_shapes(model) -> dict[tuple, tuple]:
  """Flattened Flax param paths -> shapes, without allocating parameters."""
  shapes = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.PRNGKey(0))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def torch_key(path: tuple) -> str:
  return ".".join(path[:-1] + (_LEAF_TO_TORCH[path[-1]],))


def _to_torch_layout(path: tuple, value: np.ndarray, conv1d=()) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if path[-2].split(".")[-1] in conv1d:
    return value.T[:, :, None]
  return value.T


def _from_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 3:
    return value[:, :, 0].T
  return value.T


def expected_torch_shapes(model) -> dict[str, tuple]:
  """The PyTorch state_dict keys and shapes that `model` corresponds to."""
  arch = models.architecture_of(model)
  out = {k: v.shape for k, v in arch.torch_constants(model).items()}
  for path, shape in param_shapes(model).items():
    out[torch_key(path)] = _to_torch_layout(path, np.empty(shape, np.uint8),
                                            arch.TORCH_CONV1D).shape
  return out


def validate_state_dict(state_dict: Mapping[str, np.ndarray], model) -> None:
  """Raises CheckpointMismatchError listing missing, unexpected and mis-shaped keys."""
  expected = expected_torch_shapes(model)
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  wrong = {k: (tuple(np.shape(state_dict[k])), expected[k]) for k in sorted(expected)
           if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]}
  if not (missing or unexpected or wrong):
    return
  lines = ["The checkpoint does not match the model configuration."]
  if missing:
    lines.append(f"Missing keys ({len(missing)}): {', '.join(missing[:20])}"
                 + (" ..." if len(missing) > 20 else ""))
  if unexpected:
    lines.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                 + (" ..." if len(unexpected) > 20 else ""))
  for k, (got, want) in list(wrong.items())[:20]:
    lines.append(f"Shape of {k}: file {got}, model {want}")
  hints = models.architecture_of(model).mismatch_hints(missing, unexpected, wrong)
  lines.append("Likely cause: " + "; ".join(hints)
               + ". Fix the model config to match the checkpoint.")
  raise CheckpointMismatchError("\n".join(lines))


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model) -> dict:
  """Flax params (float32 pytree) for `model` from its PyTorch state_dict of arrays
  (guided-diffusion's UNet or the official DiT)."""
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  validate_state_dict(state_dict, model)
  for key, value in models.architecture_of(model).torch_constants(model).items():
    if not np.allclose(state_dict[key], value, rtol=1e-5, atol=1e-6):
      raise CheckpointMismatchError(
          f"{key} in the checkpoint differs from the fixed value this model computes "
          f"(max difference {np.abs(state_dict[key] - value).max():.3g}); the checkpoint "
          "was not made by this architecture.")
  flat = {path: _from_torch_layout(path, state_dict[torch_key(path)]).astype(np.float32)
          for path in param_shapes(model)}
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(params, model) -> dict[str, np.ndarray]:
  """The PyTorch state_dict (key -> float32 numpy array) of Flax `params` for `model`."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  shapes = param_shapes(model)
  if set(flat) != set(shapes):
    raise CheckpointMismatchError(
        f"params do not fit the model: {sorted(set(flat) ^ set(shapes))[:10]}")
  arch = models.architecture_of(model)
  out = {torch_key(p): np.ascontiguousarray(
      _to_torch_layout(p, np.asarray(v, np.float32), arch.TORCH_CONV1D))
         for p, v in flat.items()}
  out.update(arch.torch_constants(model))
  return out


# --- safe file reading ---

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str, max_bytes: int | None = None) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file (a JSON header and raw little-endian buffers).

  Every header entry is checked against the file: known dtype, non-negative shape,
  offsets inside the data and exactly shape × itemsize bytes; anything else is a
  ValueError naming the file and the tensor. A file over `max_bytes` is refused unread.
  """
  _check_file_size(path, max_bytes)
  data = paths.read_bytes(path)
  if len(data) < 8:
    raise ValueError(f"{path} is too short to be a safetensors file.")
  (header_len,) = struct.unpack("<Q", data[:8])
  if header_len > len(data) - 8:
    raise ValueError(f"{path}: its header claims {header_len} bytes but the file has "
                     f"{len(data) - 8}; the file is truncated or not safetensors.")
  try:
    header = json.loads(data[8:8 + header_len])
  except (ValueError, RecursionError) as e:
    raise ValueError(f"{path} has no valid safetensors header: {type(e).__name__}") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header is not a JSON object.")
  base = 8 + header_len
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    problem = _safetensors_entry_problem(info, len(data) - base)
    if problem:
      raise ValueError(f"{path}: tensor {name!r} {problem}; the file is damaged or crafted.")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[base + start:base + end],
                        dtype=np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"))
    out[name] = arr.reshape(info["shape"]).astype(arr.dtype.newbyteorder("="))
  return out


def _check_file_size(path: str, max_bytes: int | None) -> None:
  if max_bytes is None:
    return
  size = paths.path(path).stat().length
  if size > max_bytes:
    raise ValueError(f"{path} is {size:,} bytes, more than the {max_bytes:,} that the "
                     "model's weights can take in float64; it holds more than this "
                     "model's state_dict. Check the model config, or save only "
                     "model.state_dict().")


def _safetensors_entry_problem(info, data_len: int) -> str | None:
  if not isinstance(info, dict):
    return "has no dtype/shape/data_offsets record"
  dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
  if dtype not in _SAFETENSORS_DTYPES:
    return f"has unsupported dtype {dtype!r}"
  is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
  if not (isinstance(shape, list) and all(is_int(n) and n >= 0 for n in shape)):
    return f"has an invalid shape {shape!r}"
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
          and 0 <= offsets[0] <= offsets[1] <= data_len):
    return f"has data offsets {offsets!r} outside the file's {data_len} data bytes"
  expected = int(np.prod(shape, dtype=object)) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
  if offsets[1] - offsets[0] != expected:
    return (f"holds {offsets[1] - offsets[0]} bytes but shape {shape} × {dtype} needs "
            f"{expected}")
  return None


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    blob = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  head = json.dumps(header).encode()
  paths.write_bytes(path, struct.pack("<Q", len(head)) + head + b"".join(blobs))


def max_elements(model) -> int:
  """How many tensor elements a file for `model` may hold: its state_dict's, plus 1% and
  a few thousand for slack. Readers refuse more before reading it."""
  total = sum(int(np.prod(shape, dtype=np.int64)) for shape in expected_torch_shapes(model).values())
  return total + total // 100 + 4096


def read_state_dict(path: str, max_elements: int | None = None) -> dict[str, np.ndarray]:
  """A state_dict of float32 numpy arrays from .pt/.pth (torch zip format, read by a
  restricted unpickler), .safetensors or .npz.

  max_elements: bounds the file before it is read (see `max_elements(model)`); .pt
  storages may declare no more elements in all, other formats hold at most that many
  float64 values.
  """
  if not paths.exists(path):
    raise FileNotFoundError(f"No checkpoint file at {path}.")
  ext = os.path.splitext(path)[1].lower()
  max_bytes = None if max_elements is None else 8 * max_elements + (1 << 20)
  if ext == ".safetensors":
    sd = read_safetensors(path, max_bytes)
  elif ext == ".npz":
    _check_file_size(path, max_bytes)
    try:
      sd = paths.load_npz(path, max_bytes)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e}).") from None
  elif ext in (".pt", ".pth", ".bin", ".ckpt"):
    # restricted unpickler: arrays only, no torch needed
    sd = torch_archive.load(path, **({} if max_elements is None
                                     else {"max_elements": max_elements}))
    if not isinstance(sd, Mapping) or not all(isinstance(v, np.ndarray) for v in sd.values()):
      raise ValueError(f"{path} holds a {type(sd).__name__} that is not a flat state_dict "
                       "of tensors; save model.state_dict() instead.")
  else:
    raise ValueError(f"Unsupported checkpoint format {ext!r} for {path}; use .pt, "
                     ".safetensors or .npz.")
  odd = [k for k in sd if not isinstance(k, str)]
  if odd:
    raise ValueError(f"{path}: a state_dict's keys are strings, but it has "
                     f"{type(odd[0]).__name__} key {odd[0]!r}; save model.state_dict().")
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def step_from_filename(path: str) -> int:
  """The training step in names like ema_0.9999_500000.pt (0 when there is none)."""
  m = re.search(r"(\d+)\.(pt|pth|safetensors|npz)$", os.path.basename(path))
  step = int(m.group(1)) if m else 0
  if step > np.iinfo(np.int32).max:
    raise ValueError(f"{path} names step {step}, more than a checkpoint step can hold "
                     f"({np.iinfo(np.int32).max}); rename the file (the step comes from "
                     "the digits before the extension).")
  return step


def convert_checkpoint(path: str, config, workdir: str) -> int:
  """Imports a PyTorch checkpoint (UNet or DiT, per config.model) into WORKDIR as a train-state checkpoint.

  The weights become both the params and every EMA params; optimiser and sampler
  states start fresh, so the workdir can be sampled, evaluated or fine-tuned. Refuses
  a workdir that already has checkpoints. Returns the step it was saved at.
  """
  from diffusion_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import state as state_lib  # pylint: disable=import-outside-toplevel
  config_lib.validate_config(config)
  if checkpoints.checkpoint_steps(workdir):
    raise FileExistsError(f"{workdir} already holds checkpoints; convert into a new "
                          "--workdir (nothing was changed).")
  step = step_from_filename(path)
  components = config_lib.build(config)
  model, tx = components.model, components.tx
  params = torch_to_flax(read_state_dict(path, max_elements(model)), model)
  state = state_lib.init_state(components, config_lib.train_settings(config),
                           jax.random.PRNGKey(0))
  state = state.replace(params=params, ema_params=[params] * len(state.ema_params),
                        opt_state=tx.init(params), step=np.int32(step))
  paths.check_writable(workdir)
  manager = checkpoints.create_manager(workdir, config)
  checkpoints.save(manager, step, state, {}, config_lib.as_json_dict(config))
  manager.wait_until_finished()
  manager.close()
  return step


def convert_classifier(path: str, config, workdir: str) -> int:
  """Imports guided-diffusion's noisy classifier (a .pt, .safetensors or .npz state_dict,
  built as config.classifier says) into WORKDIR/classifier/, where
  `--mode=train_classifier` would have written it: `--mode=sample
  --config.sample.classifier_scale=S` then guides with it, and train_classifier
  fine-tunes it. Refuses a workdir that already has a classifier. Returns its step."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import noisy_classifier  # pylint: disable=import-outside-toplevel
  config_lib.validate_config(config)
  config_lib.validate_classifier(config)
  model = noisy_classifier.build(config)
  params = torch_to_flax(read_state_dict(path, max_elements(model)), model)
  step = step_from_filename(path)
  paths.check_writable(workdir)
  manager = noisy_classifier.manager(workdir)
  if manager.latest_step() is not None:
    raise FileExistsError(f"{workdir} already holds a classifier (step "
                          f"{manager.latest_step()}); import into a new --workdir (nothing "
                          "was changed).")
  tx = noisy_classifier.optimizer(config)
  state = {"params": params, "opt_state": tx.init(params), "step": np.int32(step)}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data_iter=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  return step
