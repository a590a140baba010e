"""Installs diffusion_jax: `pip install -e .` (add `[test]` for the test suite)."""
import pathlib

from setuptools import find_packages
from setuptools import setup

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setup(
    name="diffusion_jax",
    version="0.1.0",
    description=("JAX/Flax diffusion training and sampling; reimplements "
                 "'Unmasking Bias in Diffusion Model Training' (Yu et al., ECCV 2024)."),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "test": _requirements("requirements-test.txt"),
    },
    entry_points={"console_scripts": ["diffusion-jax=diffusion_jax.main:run"]},
)
