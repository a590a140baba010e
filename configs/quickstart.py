"""Quickstart: the paper's debias weighting on Fashion-MNIST, about 12 minutes on 2 CPU cores.

  python -m diffusion_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

Trains a small ADM UNet (32×32, 32 channels, learned variance, hybrid loss) with
the debias weighting for 1,200 steps of batch 16, then writes into the workdir:
samples.png (DDPM-100 from the EMA params), loss_curve.png, metrics.jsonl, TensorBoard
events and the final checkpoint. Expect mostly recognisable garments (shirts,
trousers, shoes, bags), still grainy: this is minutes of CPU, not a converged model.
Rerunning the command resumes from the latest checkpoint.

`configs/quickstart.py:photo_patches` trains the same recipe on 32×32 colour crops of
the photographs packaged with scikit-image/scikit-learn (the colour dataset for the
paper's colour-shift analysis). The weighting comparison at this scale:

  python -m diffusion_jax.main --config=configs/quickstart.py:photo_patches \\
      --workdir=workdirs/compare_photo --mode=compare
"""
from configs import default

DATASETS = ("fashion_mnist", "photo_patches")


def get_config(dataset: str = "fashion_mnist"):
  if dataset not in DATASETS:
    raise ValueError(f"quickstart dataset {dataset!r}: choose one of {DATASETS} "
                     "(e.g. --config=configs/quickstart.py:photo_patches).")
  c = default.get_config()
  c.model.update(image_size=32, in_channels=1 if dataset == "fashion_mnist" else 3,
                 num_channels=32, channel_mult="1,2,2", attention_resolutions="8",
                 num_head_channels=32)
  c.data.update(dataset=dataset, image_size=32, batch_size=16, random_flip=True)
  c.diffusion.weighting = "debias"
  c.optim.update(lr=1e-3, warmup_steps=100, grad_clip=1.0, ema_rates=(0.995,))
  c.train.update(num_steps=1200, log_every=50, checkpoint_every=400, sample_every=600)
  # Ancestral sampling gives visibly cleaner grids than DDIM this early in training.
  c.sample.update(sampler="ddpm", steps=100, num_samples=64, batch_size=64)
  # Evaluation sized for a CPU: a few hundred samples per FID point.
  c.eval.update(num_samples=300, batch_size=100, num_reference=1000, colour_num_samples=64,
                x0_num_examples=256)
  return c
