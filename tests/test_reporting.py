"""The console side of reporting: the elapsed-time line for work with no steps."""
import io
import re
import time

import pytest

from diffusion_jax import reporting


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_spinner_turns_on_a_terminal_and_ends_with_the_time():
  stream = _Terminal()
  with reporting.Spinner("compiling the sampler", stream=stream):
    time.sleep(1.3)
  text = stream.getvalue()
  turns = re.findall(r"\r[|/\\-] compiling the sampler… (\d+) s", text)
  assert len(turns) >= 2 and turns[-1] == "1", text
  final = text.rsplit("\033[K", 1)[1]
  assert re.fullmatch(r"compiling the sampler: 1\.\d s\n", final), text


def test_spinner_writes_one_line_into_a_log_and_says_when_work_stopped():
  stream = io.StringIO()
  with reporting.Spinner("compiling the train step", stream=stream):
    time.sleep(0.6)
  assert re.fullmatch(r"compiling the train step: 0\.\d s\n", stream.getvalue())
  stream = io.StringIO()
  with pytest.raises(KeyboardInterrupt):
    with reporting.Spinner("compiling", stream=stream):
      raise KeyboardInterrupt
  assert stream.getvalue().endswith("(stopped)\n")
  with reporting.Spinner("hidden", enabled=False, stream=stream):
    pass
  assert "hidden" not in stream.getvalue()


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (42, "42 s"), (425, "7 min 05 s"),
                                           (3725, "1 h 02 min")])
def test_duration(seconds, text):
  assert reporting.duration(seconds) == text
