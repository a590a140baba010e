"""Quickstart: the paper's debias weighting on Fashion-MNIST 32 px, on a CPU.

  python -m diffusion_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

Trains a small ADM UNet (32×32, 32 channels, learned variance, hybrid loss) with
the debias weighting for 2,400 steps of batch 16, then writes into the workdir:
samples.png (100 DDPM-100 samples from the EMA params), loss_curve.png, metrics.jsonl,
TensorBoard events and the final checkpoint, and prints where they are with the
samples' recognisability: the fraction a small Fashion-MNIST classifier (trained once,
cached in the workdir) assigns one class with probability ≥ 0.8, against the same for
real test images, and the class histogram. Expect grainy but recognisable garments
(the README gives the measured numbers): this is minutes of CPU, not a converged
model. Rerunning the command resumes an unfinished run and leaves a finished one alone.

Why this recipe: at 1,200 steps (the first version) about half the samples were white
blobs or, with DDIM, static; 2,400 steps removed the blobs, and decaying the learning
rate (cosine) cut DDIM-20's static samples from 16% to 4% at equal DDPM quality. EMA
0.995 beat 0.998 and 0.999 at this length (measured; see docs/results.md).

`configs/quickstart.py:photo_patches` trains the same recipe on 32×32 colour crops of
the photographs packaged with scikit-image/scikit-learn (the colour dataset for the
paper's colour-shift analysis). The weighting comparison at this scale:

  python -m diffusion_jax.main --config=configs/quickstart.py:photo_patches \\
      --workdir=workdirs/compare_photo --mode=compare
"""
from diffusion_jax.configs import defaults

DATASETS = ("fashion_mnist", "photo_patches")


def get_config(dataset: str = "fashion_mnist"):
  if dataset not in DATASETS:
    raise ValueError(f"quickstart dataset {dataset!r}: choose one of {DATASETS} "
                     "(e.g. --config=configs/quickstart.py:photo_patches).")
  c = defaults.get_config()
  c.model.update(image_size=32, in_channels=1 if dataset == "fashion_mnist" else 3,
                 num_channels=32, channel_mult="1,2,2", attention_resolutions="8",
                 num_head_channels=32)
  c.data.update(dataset=dataset, image_size=32, batch_size=16, random_flip=True)
  c.diffusion.weighting = "debias"
  c.optim.update(lr=1e-3, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0,
                 ema_rates=(0.995,))
  c.train.update(num_steps=2400, log_every=50, checkpoint_every=800, sample_every=1200)
  # Ancestral sampling gives visibly cleaner grids than DDIM this early in training:
  # an undertrained network's errors leave some deterministic trajectories as static.
  c.sample.update(sampler="ddpm", steps=100, num_samples=100, batch_size=100)
  # Evaluation sized for a CPU: a few hundred samples per FID point.
  c.eval.update(num_samples=300, batch_size=100, num_reference=1000, colour_num_samples=64,
                x0_num_examples=256, classifier=dataset == "fashion_mnist")
  return c
