"""Analyses by name: what `config.eval.analyses` chooses, in its order.

An analysis is a class registered with `@register("name")`. The evaluation driver
(`evaluation.evaluate.evaluate_runs`) calls, for each name in config.eval.analyses:

  plan(ctx) -> {piece name: (network evaluations, Inception images)}   for the ETA;
  compute(ctx) -> section     the report's `name` entry (JSON-able); finished pieces are
                              cached through ctx.piece, and ctx.publish(section) shows a
                              partial section (its plot and evaluation.json) at once;
  plot(section, ctx) -> {file key: path}   the figures (process 0 only);
  report(section, ctx) -> [markdown lines]  its part of report.md.

`ctx` (evaluate.Context) holds the runs, config.eval, the output folder and the shared
resources (Inception, reference statistics, classifier, sampling). Every method but
compute has a default that does nothing.
"""
from __future__ import annotations

_ANALYSES: dict[str, type] = {}


class Analysis:
  """Base class: override compute, and whichever of plan, plot and report apply."""
  name = ""

  def plan(self, ctx) -> dict:  # pylint: disable=unused-argument
    return {}

  def compute(self, ctx):
    raise NotImplementedError

  def plot(self, section, ctx) -> dict:  # pylint: disable=unused-argument
    return {}

  def report(self, section, ctx) -> list[str]:  # pylint: disable=unused-argument
    return []


def register(name: str):
  """Class decorator: the analysis `name` (a config.eval.analyses entry)."""
  def add(cls):
    if name in _ANALYSES:
      raise ValueError(f"An analysis named {name!r} is already registered.")
    cls.name = name
    _ANALYSES[name] = cls
    return cls
  return add


def available() -> list[str]:
  return list(_ANALYSES)


def get(name: str) -> Analysis:
  """A new instance of analysis `name`; ValueError naming the registered ones."""
  if name not in _ANALYSES:
    raise ValueError(f"config.eval.analyses: unknown analysis {name!r}; choose from "
                     f"{available()}.")
  return _ANALYSES[name]()
