"""CIFAR-10 32 px, class-conditional, batch 32, from TFDS without TensorFlow.

  python -m diffusion_jax.main --config=configs/cifar10.py:debias --workdir=WD \
      --config.data.data_dir=/path/to/tensorflow_datasets
The TFDS dataset must be prepared in ArrayRecord format (see docs/guide.md, Datasets).
"""
from diffusion_jax.configs import defaults


def get_config(weighting: str = "debias"):
  c = defaults.get_config()
  c.model.update(image_size=32, in_channels=3, num_channels=128, num_res_blocks=2,
                 channel_mult="1,2,2,2", attention_resolutions="16", num_head_channels=64,
                 resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
                 class_cond=True, num_classes=10, dropout=0.1)
  c.diffusion.update(weighting=weighting or "debias")
  c.data.update(dataset="tfds:cifar10", image_size=32, batch_size=32)
  c.optim.update(lr=1e-4, ema_rates=(0.9999,))
  c.train.update(num_steps=500_000, checkpoint_every=10_000, sample_every=50_000)
  return c
