"""Command line: one library call per --mode.

  python -m diffusion_jax.main --config=configs/quickstart.py --workdir=DIR --mode=train

Config fields are overridden with --config.SECTION.FIELD=VALUE.
"""
import errno
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ("train", "sample", "evaluate", "compare", "prepare", "convert", "posthoc_ema",
         "train_classifier")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_string("checkpoint", None, "--mode=convert: the PyTorch checkpoint to import.")
flags.DEFINE_enum("convert_target", "model", ("model", "classifier"),
                  "--mode=convert: import the denoiser (config.model) or guided-diffusion's "
                  "noisy classifier (config.classifier, into WORKDIR/classifier/).")
flags.DEFINE_integer("cpu_devices", -1, "CPU runs: split the host into this many XLA devices "
                     "for data parallelism over the cores (-1: as many as the cores, "
                     "dividing the batch sizes into shares of at least 8). Ignored by "
                     "GPU/TPU runs.")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("cpu_devices", lambda n: n == -1 or n >= 1,
                         "--cpu_devices must be -1 (as many as the cores) or a count ≥ 1")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    # A failed save (disk full) makes Orbax log hundreds of lines of tracebacks from its
    # threads; the run reports it in one line (checkpoints.CheckpointSaveError).
    from diffusion_jax import checkpoints  # pylint: disable=import-outside-toplevel
    logging.get_absl_handler().addFilter(checkpoints.quiet_library_errors)
    sys.unraisablehook = checkpoints.quiet_closed_loop_callbacks(sys.unraisablehook)
  _load_config_or_exit()
  from diffusion_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import paths  # pylint: disable=import-outside-toplevel
  from diffusion_jax.data import sources
  from diffusion_jax.training import workdir_lock
  user_errors = (config_lib.ConfigError, paths.StorageError, workdir_lock.WorkdirLockedError,
                 checkpoints.CheckpointSaveError, checkpoints.CheckpointConfigError,
                 checkpoints.NoCheckpointError, sources.DataError)
  if FLAGS.mode in ("convert", "evaluate", "compare", "sample", "prepare", "posthoc_ema"):
    # bad files, fields or checkpoints; an output that already exists
    user_errors += (ValueError, FileNotFoundError, FileExistsError)
  if FLAGS.mode == "sample":  # stop between batches, as Ctrl-C does, and say what is kept
    signal.signal(signal.SIGTERM, _interrupt)
  if FLAGS.mode == "train":  # outside the training loop, whose own watch saves first
    signal.signal(signal.SIGINT, _exit_now)
  try:
    _run_mode()
  except KeyboardInterrupt as e:  # also compare.TrainingStopped
    if FLAGS.mode not in ("evaluate", "compare", "sample"):
      raise
    kept = ("Finished batches are kept (samples/<sampler>_<steps>/partial_*)"
            if FLAGS.mode == "sample" else "Finished runs and evaluation pieces are kept "
            "(points.json beside evaluation.json)")
    print(f"\n{str(e) or 'Interrupted.'}\n{kept}; run the same command again to continue "
          "from them.", file=sys.stderr)
    sys.exit(130)
  except (OSError, *user_errors) as e:  # the problem and the fix, no traceback
    no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG,
                                                      errno.EDQUOT)
    if FLAGS["verbosity"].present or not (isinstance(e, user_errors) or no_space):
      raise
    message = (f"no space left on the device ({e}). Free some space, then rerun the same "
               "command." if no_space else str(e))
    print(f"error: {message} (--verbosity=1 shows the traceback)", file=sys.stderr,
          flush=True)
    if no_space or isinstance(e, checkpoints.CheckpointSaveError):
      sys.stdout.flush()
      os._exit(2)  # pylint: disable=protected-access  # Orbax's writer threads still fail
    sys.exit(2)


def _config_catalogue() -> str:
  """The config files beside this package with their docstrings' first lines, quickstart
  first, on one line (the installed project's own folder, never a user path, so plain
  os.path; the files are parsed, not run)."""
  import ast  # pylint: disable=import-outside-toplevel
  import glob  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  found = sorted(glob.glob(os.path.join(root, "configs", "[!_]*.py")),
                 key=lambda p: (os.path.basename(p) != "quickstart.py", p))
  entries = []
  for file in found:
    with open(file, encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
    entries.append(f"configs/{os.path.basename(file)} ({doc.split(chr(10))[0].rstrip('.')})")
  return "; ".join(entries)


def _exit_config_error(argv, text: str) -> None:
  """One line for an unusable --config (missing file, bad `:argument`, no get_config),
  then the configs that exist; exit code 2."""
  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if any("No such file" in l for l in lines):
    cause = "no such file"
  elif "get_config" in text and "has no attribute" in text:
    cause = "the file defines no get_config()"
  else:  # the config file's own exception, last in the traceback text
    cause = lines[-1] if lines else text
  print(f"error: --config={value}: {cause[:300]}\nConfigs: {_config_catalogue()}",
        file=sys.stderr)
  sys.exit(2)


def _load_config_or_exit() -> None:
  """Loads --config, which ml_collections defers when its file is missing."""
  try:
    FLAGS.config.keys()
  except Exception as e:  # pylint: disable=broad-except
    if FLAGS["verbosity"].present:
      raise
    _exit_config_error(sys.argv, str(e))


def _exit_now(signum, frame):
  """Ctrl-C while training sets up or finishes: exits at once with code 130.

  A KeyboardInterrupt here could land in XLA's compile or garbage-collection callbacks,
  which swallow it or crash at teardown; the training loop installs its own handler,
  which saves the current step first.
  """
  del signum, frame
  print("\nInterrupted (Ctrl-C). Committed checkpoints are kept; run the same command "
        "again to resume.", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(130)  # pylint: disable=protected-access


def _interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"Stopped by signal {signum}.")


def _run_mode():
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax import distributed  # pylint: disable=import-outside-toplevel
  config_lib.validate_eval_fields(FLAGS.config)  # the preset name, before it is applied
  explicit = {a[len("--config.eval."):].split("=")[0] for a in sys.argv
              if a.startswith("--config.eval.")}
  config = config_lib.with_eval_preset(FLAGS.config, keep=explicit)
  distributed.split_host_cpu(
      FLAGS.cpu_devices if FLAGS.cpu_devices != -1 else distributed.cpu_device_count(
          [config.data.batch_size, config.sample.batch_size]))
  distributed.initialize()
  if FLAGS.mode == "train":
    from diffusion_jax.training import train  # pylint: disable=import-outside-toplevel
    train.train_and_sample(config, FLAGS.workdir)
  elif FLAGS.mode == "sample":
    from diffusion_jax import run  # pylint: disable=import-outside-toplevel
    out = run.sample_from_workdir(config, FLAGS.workdir)
    if _is_primary():
      print(f"Wrote {len(out['images'])} samples:\n  " + "\n  ".join(out["files"]))
  elif FLAGS.mode == "evaluate":
    from diffusion_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
    report = evaluate.evaluate_workdir(config, FLAGS.workdir)
    if _is_primary():
      print("Wrote:\n  " + "\n  ".join(report["files"].values()))
  elif FLAGS.mode == "compare":
    from diffusion_jax.evaluation import compare  # pylint: disable=import-outside-toplevel
    report = compare.compare(config, FLAGS.workdir)
    if _is_primary():
      print(f"Wrote {report['files']['report']} (plots and report.json beside it)")
  elif FLAGS.mode == "prepare":
    from diffusion_jax.data import image_folder  # pylint: disable=import-outside-toplevel
    summary = image_folder.prepare(config)
    held = summary["splits"].get("test")
    print(f"Prepared {summary['num_records']} images at {config.data.image_size}px into "
          f"{config.data.data_dir}" + (f" and {held} held out as split 'test'" if held else "")
          + f"; skipped {summary['num_skipped']} unreadable file(s).")
  elif FLAGS.mode == "train_classifier":
    from diffusion_jax.training import classifier_train  # pylint: disable=import-outside-toplevel
    classifier_train.train_classifier(config, FLAGS.workdir)
  elif FLAGS.mode == "posthoc_ema":
    from diffusion_jax import run  # pylint: disable=import-outside-toplevel
    if not config.sample.posthoc_ema:
      raise app.UsageError("--mode=posthoc_ema needs --config.sample.posthoc_ema=SIGMA_REL "
                           "(e.g. 0.075): the EMA length to reconstruct.")
    out = run.reconstruct_posthoc_ema(FLAGS.workdir, config.sample.posthoc_ema)
    if _is_primary():
      print(f"Post-hoc EMA σ_rel={config.sample.posthoc_ema:g} at step {out['step']} from "
            f"{len(out['snapshots'])} snapshots (profile fit error {out['fit_error']:.2%}) "
            f"→ {out['path']}\n  sample it with --mode=sample "
            f"--config.sample.posthoc_ema={config.sample.posthoc_ema:g}")
  elif FLAGS.mode == "convert":
    if not FLAGS.checkpoint:
      raise app.UsageError("--mode=convert needs --checkpoint=PATH (.pt, .safetensors, .npz).")
    from diffusion_jax.tools import convert  # pylint: disable=import-outside-toplevel
    if FLAGS.convert_target == "classifier":
      step = convert.convert_classifier(FLAGS.checkpoint, config, FLAGS.workdir)
      print(f"Imported the classifier at step {step} into {FLAGS.workdir}/classifier/; "
            "sample with --config.sample.classifier_scale=S.")
    else:
      convert.convert_checkpoint(FLAGS.checkpoint, config, FLAGS.workdir)


def _is_primary() -> bool:
  """Whether this is process 0, the one that writes and reports, of a multi-host job."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0


def _unknown_config_field(argv) -> str | None:
  """A message naming the first --config.X.Y override that is not a config field and
  the closest field that is, or None."""
  import difflib  # pylint: disable=import-outside-toplevel

  from diffusion_jax.configs import defaults  # pylint: disable=import-outside-toplevel
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node, parts = defaults.get_config(), dotted.split(".")
    for i, part in enumerate(parts):
      options = list(node.keys()) if hasattr(node, "keys") else []
      if part not in options:
        prefix = "".join(p + "." for p in parts[:i])
        close = difflib.get_close_matches(part, options, n=1)
        hint = (f"did you mean config.{prefix}{close[0]}?" if close else
                f"config.{prefix.rstrip('.') or ''} has {options}")
        return (f"Unknown config field config.{dotted}: {hint} (every field is in "
                "diffusion_jax/configs/defaults.py)")
      node = node[part]
  return None


def _config_siblings_importable(argv) -> None:
  """Lets a config import the configs beside it (`from configs import quickstart`) from
  any working directory: the folder above the config's package goes first on sys.path.
  (The config is a local Python file, never a gs:// path, so plain os.path.)"""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      folder = os.path.dirname(os.path.abspath(arg[len("--config="):].split(":", 1)[0]))
      if os.path.isfile(os.path.join(folder, "__init__.py")):
        sys.path.insert(0, os.path.dirname(folder))


def _parse_flags(argv):
  """absl's flag parsing, with one line and exit code 2 for a bad flag or config field
  (the traceback only with --verbosity)."""
  _config_siblings_importable(argv)
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if any(a.startswith(("--verbosity", "-v=")) for a in argv):
      raise
    if "config_config" in str(e) or str(e).startswith("flag --config="):
      _exit_config_error(argv, str(e))
    unknown = _unknown_config_field(argv) if isinstance(e, (AttributeError, KeyError)) else None
    message = unknown or f"{e}".splitlines()[0]
    print(f"error: {message} (--helpshort lists the flags)", file=sys.stderr)
    sys.exit(2)


def run():
  """Console-script entry point (`diffusion-jax`); runs under tcmalloc where installed
  (`diffusion_jax.tools.allocator`)."""
  from diffusion_jax.tools import allocator  # pylint: disable=import-outside-toplevel
  allocator.use_tcmalloc()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
