"""The paper's 256px unconditional setting, shared by its four face/animal datasets.

guided-diffusion's ADM: 128 channels, 1 res block, attention at 16 px with 64-channel
heads, resblock up/down, scale-shift norm, learned sigma (hybrid loss); linear schedule
with T=1000; AdamW lr 2e-5, weight decay 0; batch 8; EMA 0.9999; 500k steps.
"""
import ml_collections

from diffusion_jax.configs import defaults


def paper_256(dataset_dir: str, weighting: str) -> "ml_collections.ConfigDict":
  c = defaults.get_config()
  c.model.update(image_size=256, in_channels=3, num_channels=128, num_res_blocks=1,
                 channel_mult="", attention_resolutions="16", num_head_channels=64,
                 resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
                 class_cond=False)
  c.diffusion.update(schedule="linear", num_timesteps=1000, target="eps",
                     var_type="learned_range", loss_type="rescaled_mse", weighting=weighting)
  c.data.update(dataset="folder", data_dir=dataset_dir, image_size=256, batch_size=8,
                random_flip=True)
  c.optim.update(lr=2e-5, weight_decay=0.0, ema_rates=(0.9999,))
  c.train.update(num_steps=500_000, log_every=100, checkpoint_every=10_000, keep_every=50_000,
                 sample_every=50_000)
  c.sample.update(sampler="ddim", steps=100, num_samples=16, batch_size=16)
  return c
