"""API tour: the README's Python example, the quickstart's UNet for 300 steps.

  python -m diffusion_jax.main --config=configs/api_tour.py --workdir=workdirs/api_tour

Used by the README's programmatic example (`from configs import api_tour`): a model
small and short enough to train, sample and score from Python in a couple of minutes
on a CPU. It trains no classifier and runs no evaluation of its own; the example scores
its samples explicitly. Its samples are still static, not garments: 300 steps show
the API, not the method (the quickstart's 2,400 steps are where garments appear).
"""
from configs import quickstart


def get_config():
  c = quickstart.get_config()
  c.train.update(num_steps=300, log_every=50, checkpoint_every=300, sample_every=0)
  c.optim.warmup_steps = 50
  c.sample.update(sampler="ddim", steps=20, num_samples=16, batch_size=16)
  c.eval.classifier = False
  return c
