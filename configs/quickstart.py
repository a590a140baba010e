"""Quickstart: the paper's debias weighting on Fashion-MNIST, about 12 minutes on 2 CPU cores.

  python -m diffusion_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

Trains a small ADM UNet (32×32 grey, 32 channels, learned variance, hybrid loss) with
the debias weighting for 1,200 steps of batch 16, then writes into the workdir:
samples.png (DDPM-100 from the EMA params), loss_curve.png, metrics.jsonl, TensorBoard
events and the final checkpoint. Expect mostly recognisable garments (shirts,
trousers, shoes, bags), still grainy: this is minutes of CPU, not a converged model.
Rerunning the command resumes from the latest checkpoint.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.model.update(image_size=32, in_channels=1, num_channels=32, channel_mult="1,2,2",
                 attention_resolutions="8", num_head_channels=32)
  c.data.update(dataset="fashion_mnist", image_size=32, batch_size=16, random_flip=True)
  c.diffusion.weighting = "debias"
  c.optim.update(lr=1e-3, warmup_steps=100, grad_clip=1.0, ema_rates=(0.995,))
  c.train.update(num_steps=1200, log_every=50, checkpoint_every=400, sample_every=600)
  # Ancestral sampling gives visibly cleaner grids than DDIM this early in training.
  c.sample.update(sampler="ddpm", steps=100, num_samples=64, batch_size=64)
  return c
