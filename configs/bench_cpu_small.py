"""CPU benchmark cases small32/paper64, equal to the official runner's.

  python -m diffusion_jax.tools.bench --config=configs/bench_cpu_small.py --baseline
  python -m diffusion_jax.tools.bench --config=configs/bench_cpu_small.py:paper64 \\
      --baseline --baseline_case=paper64

small32 (default): 32 px, 64 channels, 1 res block, attention at 16 with 32-channel
heads, resblock up/down, scale-shift norm, learned sigma; hybrid loss with debias
weighting; batch 16, fp32, AdamW. paper64: the paper's model width (128 channels,
64-channel heads, channel_mult 1,2,3,4) at 64 px, batch 4. These match
../shared/baseline/ref_step.py's cases of the same names, so `--baseline` compares the
same step.
"""
from diffusion_jax.configs import defaults

CASES = ("small32", "paper64")


def get_config(case: str = "small32"):
  if case not in CASES:
    raise ValueError(f"bench case {case!r}: choose one of {CASES} "
                     "(e.g. --config=configs/bench_cpu_small.py:paper64).")
  c = defaults.get_config()
  c.model.update(image_size=32, in_channels=3, num_channels=64, num_res_blocks=1,
                 channel_mult="", attention_resolutions="16", num_head_channels=32,
                 resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True)
  c.diffusion.update(weighting="debias", loss_type="rescaled_mse", var_type="learned_range")
  c.data.update(dataset="digits", image_size=32, batch_size=16)
  c.train.compute_dtype = "float32"
  if case == "paper64":
    c.model.update(image_size=64, num_channels=128, num_head_channels=64)
    c.data.update(image_size=64, batch_size=4)
  return c
