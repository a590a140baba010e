"""CelebA-HQ 256 px, the paper's unconditional ADM; weighting as argument.

Prepare the images once (a folder of PNG/JPEG, searched recursively), then train:
  python -m diffusion_jax.main --config=configs/celebahq256.py:debias --workdir=WD \
      --mode=prepare --config.data.image_dir=/path/to/images
  python -m diffusion_jax.main --config=configs/celebahq256.py:debias --workdir=WD --mode=train
`:constant`, `:p2`, `:min_snr`, `:snr` select the paper's baselines.
Paper: FID-10k 7.3 (debias) vs 11.7 (constant) at 500k iterations.
"""
from diffusion_jax.configs import paper256


def get_config(weighting: str = "debias"):
  return paper256.paper_256("data/celebahq256", weighting or "debias")
