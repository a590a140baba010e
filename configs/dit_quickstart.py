"""The quickstart with a small class-conditional DiT instead of the UNet.

  python -m diffusion_jax.main --config=configs/dit_quickstart.py --workdir=workdirs/dit_quickstart

The same recipe as configs/quickstart.py (debias weighting, learned variance with the
hybrid loss, cosine-decayed lr, EMA 0.995, DDPM-100 sample grid, recognisability) with
the network swapped by name: `model.name="dit"`, a DiT with 4×4 patches (64 tokens at
32 px), width 128, 6 blocks of 4 heads, class-conditional with label dropout 0.1 (the
null class, for guidance). Every weighting, sampler, analysis and
`--mode=compare --config.compare.weightings=constant,debias` run on it unchanged.
Expect blurrier garments than the UNet quickstart at equal steps: transformers without
convolutions learn image structure more slowly at this scale.
"""
from configs import quickstart
from diffusion_jax import models


def get_config():
  c = quickstart.get_config("fashion_mnist")
  c.model = models.config_fields("dit")
  c.model.update(image_size=32, in_channels=1, learn_sigma=True, class_cond=True,
                 num_classes=10, patch_size=4, hidden_size=128, depth=6, num_heads=4,
                 mlp_ratio=4.0, class_dropout_prob=0.1)
  return c
