"""DiT-XL on ImageNet 256 px in pixel space (latent-free), class-conditional.

  python -m diffusion_jax.main --config=configs/dit_imagenet256.py:debias --workdir=gs://B/WD \
      --config.data.data_dir=gs://B/tensorflow_datasets

Latent-free here: the DiT paper trains on the 32×32×4 latents of a Stable-Diffusion VAE,
which this project does not ship. This config denoises pixels instead, with 16×16 patches
so the sequence is 256 tokens, as long as DiT-XL/2's on latents; the transformer is
DiT-XL's (hidden 1152, depth 28, 16 heads, 675M-class), with DiT's recipe otherwise:
AdamW lr 1e-4, weight decay 0, batch 256, EMA 0.9999, label dropout 0.1, learned sigma,
linear schedule, T=1000. Its FIDs are therefore not comparable with the DiT paper's
latent numbers. The weighting is the config argument (`:constant` for DiT's own loss).
"""
from diffusion_jax import models
from diffusion_jax.configs import defaults


def get_config(weighting: str = "debias"):
  c = defaults.get_config()
  c.model = models.config_fields("dit")
  c.model.update(image_size=256, in_channels=3, learn_sigma=True, class_cond=True,
                 num_classes=1000, patch_size=16, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1)
  c.diffusion.update(schedule="linear", num_timesteps=1000, weighting=weighting or "debias",
                     var_type="learned_range", loss_type="rescaled_mse")
  c.data.update(dataset="tfds:imagenet2012", image_size=256, batch_size=256)
  c.optim.update(lr=1e-4, weight_decay=0.0, ema_rates=(0.9999,))
  c.train.update(num_steps=400_000, checkpoint_every=10_000, keep_every=50_000,
                 sample_every=50_000)
  return c
