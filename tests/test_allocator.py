"""The entry points' re-execution under tcmalloc: when, with what, and what children see."""
import os
import subprocess
import sys

import pytest

from diffusion_jax.tools import allocator

TCMALLOC = "libtcmalloc_minimal.so.4"


def test_reexecutes_with_tcmalloc_preloaded_and_the_command_line_kept():
  argv = ["python3", "-m", "diffusion_jax.main", "--workdir=w"]
  command = allocator.tcmalloc_command(argv, {"HOME": "/h"}, find=lambda: TCMALLOC)
  assert command == ([sys.executable, "-m", "diffusion_jax.main", "--workdir=w"],
                     {"HOME": "/h", "LD_PRELOAD": TCMALLOC, allocator.ENV: "tcmalloc"})
  _, env = allocator.tcmalloc_command(argv, {"LD_PRELOAD": "libmine.so"}, find=lambda: TCMALLOC)
  assert env["LD_PRELOAD"] == f"{TCMALLOC} libmine.so"


def test_no_reexecution_when_opted_out_already_preloaded_or_not_installed():
  argv = ["python3", "-m", "diffusion_jax.tools.bench"]
  found = lambda: TCMALLOC
  assert allocator.tcmalloc_command(argv, {allocator.ENV: "system"}, find=found) is None
  assert allocator.tcmalloc_command(argv, {allocator.ENV: "tcmalloc"}, find=found) is None
  assert allocator.tcmalloc_command(
      argv, {"LD_PRELOAD": "/opt/lib/libtcmalloc.so.4"}, find=found) is None
  assert allocator.tcmalloc_command(argv, {}, find=lambda: None) is None


def test_other_programs_get_the_environment_without_our_preload():
  ours = {"LD_PRELOAD": f"{TCMALLOC} libmine.so", allocator.ENV: "tcmalloc", "X": "1"}
  assert allocator.environment_for_other_programs(ours) == {"LD_PRELOAD": "libmine.so", "X": "1"}
  only_ours = {"LD_PRELOAD": TCMALLOC, allocator.ENV: "tcmalloc"}
  assert allocator.environment_for_other_programs(only_ours) == {}
  users_own = {"LD_PRELOAD": TCMALLOC}  # preloaded by the user, not by us: kept
  assert allocator.environment_for_other_programs(users_own) == users_own


def test_other_programs_can_be_given_tcmalloc_for_a_comparison_of_steps():
  ours = {"LD_PRELOAD": f"{TCMALLOC} libmine.so", allocator.ENV: "tcmalloc", "X": "1"}
  found = lambda: TCMALLOC
  assert allocator.environment_for_other_programs(ours, "tcmalloc", find=found) == {
      "LD_PRELOAD": f"{TCMALLOC} libmine.so", "X": "1"}
  assert allocator.environment_for_other_programs({}, "tcmalloc", find=found) == {
      "LD_PRELOAD": TCMALLOC}
  with pytest.raises(ValueError, match="libtcmalloc-minimal4"):
    allocator.environment_for_other_programs({}, "tcmalloc", find=lambda: None)
  with pytest.raises(ValueError, match="'jemalloc'"):
    allocator.environment_for_other_programs({}, "jemalloc", find=found)


def _child(env_extra):
  code = ("import os\nfrom diffusion_jax.tools import allocator\n"
          "allocator.use_tcmalloc()\n"
          f"print(allocator.in_use(), os.environ.get({allocator.ENV!r}))")
  env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, "LD_PRELOAD")}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(env, **env_extra), timeout=120, check=True)
  return done.stdout.split()


def test_a_process_runs_under_tcmalloc_exactly_when_it_is_installed():
  """The real re-execution (os.execve): CI installs libtcmalloc-minimal4 (.ci/run); on a
  machine without it the process must go on unchanged."""
  if allocator.find_tcmalloc():
    assert _child({}) == ["tcmalloc", "tcmalloc"]
  else:
    assert _child({}) == ["system", "None"]
  assert _child({allocator.ENV: "system"}) == ["system", "system"]
