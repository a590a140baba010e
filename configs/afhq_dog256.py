"""AFHQ-dog 256 px, the paper's unconditional ADM; weighting as argument.

Prepare the images once (a folder of PNG/JPEG, searched recursively), then train:
  python -m diffusion_jax.main --config=configs/afhq_dog256.py:debias --workdir=WD \
      --mode=prepare --config.data.image_dir=/path/to/images
  python -m diffusion_jax.main --config=configs/afhq_dog256.py:debias --workdir=WD --mode=train
`:constant`, `:p2`, `:min_snr`, `:snr` select the paper's baselines.
Paper: debias reaches a lower FID-10k than constant weighting at equal iterations (paper, Table 1).
"""
from diffusion_jax.configs import paper256


def get_config(weighting: str = "debias"):
  return paper256.paper_256("data/afhq_dog256", weighting or "debias")
