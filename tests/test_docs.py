"""Every fenced block of README.md and docs/*.md runs, as the tag before it says.

A block is preceded by `<!-- test: KIND [NAME] -->`:
- `quickstart`: the README's install-and-train block at reduced size (60 steps, a
  10-step sampler), `apt-get install -y PKGS` checked with `dpkg -s PKGS` (tests do not
  install system packages); its stdout is kept for `output-of quickstart`.
- `output-of quickstart`: an expected-output block; each of its lines must match a
  line of that run's stdout, in order, with numbers, durations and lists as wildcards.
- `cli-after quickstart`: `python -m diffusion_jax.main` commands run at reduced size
  (sample, evaluation and training counts shrunk) after the quickstart, in its workdir.
- `python`: run as written, in a fresh folder (slow).
- `python-after quickstart`: run as written in the reduced quickstart's folder (slow).
- `ci`: the README's test commands, which `.ci/run` runs verbatim.
- `form`: commands with placeholders (a bucket, a folder of your images, a checkpoint
  file) or that need a second code base: each `python -m diffusion_jax.main|bench`
  command's config and overrides are loaded and validated; the commands are not run.
- `text`: a diagram or other block without a language (not code).
"""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
KINDS = {"quickstart", "output-of", "cli-after", "python", "python-after", "ci", "form",
         "text"}
QUICKSTART_SHRINK = {"train.num_steps": "60", "train.checkpoint_every": "60",
                     "train.sample_every": "55", "sample.steps": "10"}
CLI_SHRINK = {"train.num_steps": "4", "train.checkpoint_every": "4", "train.log_every": "2",
              "train.sample_every": "0", "sample.num_samples": "8", "sample.batch_size": "8",
              "eval.num_samples": "8", "eval.num_reference": "16",
              "eval.colour_num_samples": "4", "eval.x0_num_examples": "8",
              "eval.batch_size": "8"}


def blocks():
  """(file, line, tag, language, code) of every fenced block."""
  found = []
  for name in DOCS:
    lines = open(os.path.join(REPO, name), encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
      fence = re.match(r"\s*```(\w*)\s*$", lines[i])
      if fence:
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        tag = re.match(r"\s*<!-- test: (.*?) -->\s*$", lines[i - 1]) if i else None
        indent = len(lines[i]) - len(lines[i].lstrip())
        code = "\n".join(l[indent:] for l in lines[i + 1:end])
        found.append((name, i + 1, tag.group(1).split() if tag else None, fence.group(1), code))
        i = end
      i += 1
  return found


def tagged(kind: str):
  return [pytest.param(b, id=f"{b[0]}:{b[1]}") for b in blocks() if b[2] and b[2][0] == kind]


def test_every_block_is_tagged_with_a_known_kind():
  untagged = [f"{f}:{n}" for f, n, tag, _, _ in blocks() if not tag or tag[0] not in KINDS]
  assert not untagged, f"blocks without a known <!-- test: KIND --> tag: {untagged}"
  for f, n, tag, language, _ in blocks():
    assert (tag[0] == "text") == (language == "" and tag[0] != "output-of"), f"{f}:{n}"


def test_readme_is_short_and_has_no_unfilled_figures():
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  assert len(text.splitlines()) < 350
  assert not re.findall(r"\b[A-Z]+_[A-Z_]+\b", text.replace("XLA_FLAGS", ""))


def _commands(code: str) -> list[str]:
  """The block's command lines (continuations joined, comments dropped)."""
  code = code.replace("\\\n", " ")
  return [l.split("  #")[0].strip() for l in code.splitlines()
          if l.strip() and not l.strip().startswith("#")]


def _shrunk(command: str, shrink: dict, tmp) -> list[str]:
  """A main command with `shrink` overriding (or adding) its config fields and its
  workdir moved under `tmp`."""
  args = shlex.split(command.replace("workdirs/", f"{tmp}/workdirs/"))
  for key, value in shrink.items():
    flag = f"--config.{key}="
    args = [a for a in args if not a.startswith(flag)] + [flag + value]
  return [sys.executable] + args[1:]


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
  """Runs the README's quickstart block at reduced size; (stdout, tmp folder)."""
  (block,) = [b for b in blocks() if b[2] == ["quickstart"]]
  tmp = tmp_path_factory.mktemp("quickstart")
  stdout = ""
  for command in _commands(block[4]):
    for part in command.split(" && "):
      if part.startswith("apt-get install"):
        packages = [a for a in shlex.split(part)[2:] if not a.startswith("-")]
        run = subprocess.run(["dpkg", "-s"] + packages, capture_output=True, text=True)
        assert run.returncode == 0, f"{packages} not installed: {run.stderr[-500:]}"
      elif part.startswith("pip install"):
        run = subprocess.run([sys.executable, "-m"] + shlex.split(part) + ["--no-deps", "-q"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
      else:
        assert part.startswith("python -m diffusion_jax.main"), part
        run = subprocess.run(_shrunk(part, QUICKSTART_SHRINK, tmp), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        stdout += run.stdout.replace(f"{tmp}/", "")
  return stdout, tmp


def _pattern(line: str) -> str:
  """`line` as a regex: durations, lists and numbers are wildcards."""
  wild = {"D": r"(?:\d+ h )?(?:\d+ min )?\d+(?:\.\d+)? s", "L": r"\[[\d, ]*\]",
          "N": r"\d[\d,.]*"}
  line = re.sub(r"(?:\d+ h )?(?:\d+ min )?\d+(?:\.\d+)? s\b", "\0D", line)
  line = re.sub(r"\[[\d, ]*\]", "\0L", line)
  line = re.sub(r"\d[\d,.]*\d|\d", "\0N", line)
  return "".join(wild[p[0]] + re.escape(p[1:]) if i else re.escape(p)
                 for i, p in enumerate(line.split("\0")))


@pytest.mark.parametrize("block", tagged("quickstart"))
def test_quickstart_block_runs(block, quickstart):
  stdout, tmp = quickstart
  assert "Finished at step 60 of 60" in stdout
  for name in ("samples.png", "loss_curve.png", "metrics.jsonl", "checkpoints/60"):
    assert (tmp / "workdirs" / "quickstart" / name).exists(), name


@pytest.mark.parametrize("block", tagged("output-of"))
def test_output_block_matches_the_run(block, quickstart):
  assert block[2] == ["output-of", "quickstart"]
  actual = quickstart[0].splitlines()
  position = 0
  for line in block[4].splitlines():
    pattern = re.compile(_pattern(line) + r"\s*$")
    hit = next((i for i in range(position, len(actual)) if pattern.match(actual[i])), None)
    assert hit is not None, f"README line {line!r} not in the run's output:\n" + "\n".join(
        actual)
    position = hit + 1


@pytest.mark.slow  # samples, evaluates and trains two tiny runs (~4 min)
@pytest.mark.parametrize("block", tagged("cli-after"))
def test_cli_blocks_run_at_reduced_size(block, quickstart):
  _, tmp = quickstart
  for command in _commands(block[4]):
    assert command.startswith("python -m diffusion_jax.main"), command
    run = subprocess.run(_shrunk(command, CLI_SHRINK, tmp), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"


@pytest.mark.slow  # the README's Python example as written (~2 min)
@pytest.mark.parametrize("block", tagged("python"))
def test_python_blocks_run_as_written(block, tmp_path):
  (tmp_path / "example.py").write_text(block[4])
  run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, run.stderr[-3000:]
  print(run.stdout)


@pytest.mark.parametrize("block", tagged("ci"))
def test_ci_runs_the_readme_test_commands(block):
  ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read().splitlines()
  for command in _commands(block[4]):
    assert command in ci, f".ci/run does not run {command!r}"


@pytest.mark.slow  # each runs at full size on the reduced quickstart model (~1 min)
@pytest.mark.parametrize("block", tagged("python-after"))
def test_python_blocks_run_after_the_quickstart(block, quickstart):
  (quickstart[1] / "example.py").write_text(block[4])
  run = subprocess.run([sys.executable, "example.py"], cwd=quickstart[1], env=_env(),
                       capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, run.stderr[-3000:]


def _config_of(args: list[str]):
  """The config a command's `--config=FILE[:ARG]` and `--config.a.b=V` flags make."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  file, _, argument = next(a for a in args if a.startswith("--config="))[9:].partition(":")
  spec = importlib.util.spec_from_file_location("docs_config", os.path.join(REPO, file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(argument) if argument else module.get_config()
  for arg in args:
    if arg.startswith("--config."):
      key, value = arg[9:].split("=", 1)
      *parents, leaf = key.split(".")
      node = config
      for part in parents:
        node = node[part]
      assert leaf in node, f"no config field {key}"
      old = node[leaf]
      node[leaf] = (value == "True" if isinstance(old, bool) else
                    type(old)(value) if isinstance(old, (int, float)) else value)
  return config


@pytest.mark.parametrize("block", tagged("form"))
def test_command_forms_have_valid_configs(block):
  from diffusion_jax import config_lib  # pylint: disable=import-outside-toplevel
  commands = [c[c.index("python -m diffusion_jax."):] for c in _commands(block[4])
              if "python -m diffusion_jax." in c]
  assert commands, "a form block without a diffusion_jax command"
  for command in commands:
    config_lib.validate_config(_config_of(shlex.split(command)))
