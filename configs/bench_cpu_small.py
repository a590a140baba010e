"""The CPU benchmark configuration (equal to the reference's small configuration).

  python -m diffusion_jax.bench --config=configs/bench_cpu_small.py --json=bench.json
32 px, 64 channels, 1 res block, attention at 16 with 32-channel heads, resblock
up/down, scale-shift norm, learned sigma; hybrid loss with debias weighting; batch 16,
fp32, AdamW.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.model.update(image_size=32, in_channels=3, num_channels=64, num_res_blocks=1,
                 channel_mult="", attention_resolutions="16", num_head_channels=32,
                 resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True)
  c.diffusion.update(weighting="debias", loss_type="rescaled_mse", var_type="learned_range")
  c.data.update(dataset="digits", image_size=32, batch_size=16)
  c.train.compute_dtype = "float32"
  return c
