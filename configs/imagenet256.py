"""ImageNet 256 px, guided-diffusion's class-conditional ADM.

  python -m diffusion_jax.main --config=configs/imagenet256.py:debias --workdir=WD \
      --config.data.data_dir=/path/to/tensorflow_datasets
Reads TFDS `imagenet2012` prepared in ArrayRecord format, without TensorFlow.
"""
from diffusion_jax.configs import defaults


def get_config(weighting: str = "debias"):
  c = defaults.get_config()
  c.model.update(image_size=256, in_channels=3, num_channels=256, num_res_blocks=2,
                 channel_mult="", attention_resolutions="32,16,8", num_head_channels=64,
                 resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
                 class_cond=True, num_classes=1000)
  c.diffusion.update(weighting=weighting or "debias")
  c.data.update(dataset="tfds:imagenet2012", image_size=256, batch_size=256)
  c.optim.update(lr=1e-4, ema_rates=(0.9999,))
  c.train.update(num_steps=500_000, checkpoint_every=10_000, sample_every=50_000)
  return c
