"""A tiny, fast training config for tests: 32×32 digits, a 2-level 32-channel UNet."""
from diffusion_jax.configs import defaults


def get_config():
  c = defaults.get_config()
  c.model.update(image_size=32, in_channels=1, num_channels=32, channel_mult="1,2",
                 attention_resolutions="8", num_head_channels=32)
  c.data.update(dataset="digits", image_size=32, batch_size=8)
  c.optim.update(lr=1e-3, ema_rates=(0.99, 0.9))
  c.train.update(num_steps=6, log_every=2, checkpoint_every=3)
  c.sample.update(steps=3, num_samples=4, batch_size=4)
  return c
