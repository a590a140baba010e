"""Quickstart: the paper's debias weighting on Fashion-MNIST, about 10 minutes on 2 CPU cores.

  python -m diffusion_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

Trains a small ADM UNet (32×32 grey, 32 channels, learned variance, hybrid loss) with
the debias weighting, then writes into the workdir: samples.png (DDIM-50 from the EMA
params), loss_curve.png, metrics.jsonl, TensorBoard events and the final checkpoint.
Expect recognisable garments (shirts, trousers, shoes, bags) after ~3k steps. Rerunning the
command resumes from the latest checkpoint.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.model.update(image_size=32, in_channels=1, num_channels=32, channel_mult="1,2,2",
                 attention_resolutions="8", num_head_channels=32)
  c.data.update(dataset="fashion_mnist", image_size=32, batch_size=16, random_flip=True)
  c.diffusion.weighting = "debias"
  c.optim.update(lr=1e-3, warmup_steps=100, grad_clip=1.0, ema_rates=(0.995,))
  c.train.update(num_steps=1600, log_every=50, checkpoint_every=400, sample_every=800)
  c.sample.update(sampler="ddim", steps=50, num_samples=64, batch_size=64)
  return c
