"""Sample-quality metrics on feature sets, following guided-diffusion's evaluator.

Features are (N, D) arrays (e.g. Inception pool features). Statistics and the Fréchet
distance run in float64 numpy (2048² matrices need it); nearest-neighbour work for
precision/recall runs in JAX, blockwise, so it uses an accelerator when there is one.
Every result carries the sample counts it was computed from.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import paths


def feature_statistics(features) -> dict:
  """{"mu": (D,), "sigma": (D, D), "n": N} in float64 (sigma with N−1, like np.cov)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"features must be (N≥2, D); got shape {f.shape}.")
  return {"mu": f.mean(axis=0), "sigma": np.cov(f, rowvar=False), "n": len(f)}


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """‖μ1−μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1Σ2)^½), for positive semi-definite Σ.

  tr((Σ1Σ2)^½) is computed as Σ√λ of the symmetric Σ1^½ Σ2 Σ1^½ (same eigenvalues),
  which avoids the complex round-off of a general matrix square root.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"Statistics differ in shape: {mu1.shape}/{s1.shape} vs "
                     f"{mu2.shape}/{s2.shape}.")
  root1 = _sqrtm_psd(s1)
  eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(features_a, features_b) -> dict:
  """FID between two feature sets: {"fid", "n_a", "n_b"}."""
  a, b = feature_statistics(features_a), feature_statistics(features_b)
  return {"fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]),
          "n_a": a["n"], "n_b": b["n"]}


@jax.jit
def _sq_dists(x, y):
  return jnp.maximum(jnp.sum(x * x, 1)[:, None] - 2 * x @ y.T + jnp.sum(y * y, 1)[None], 0.0)


def _kth_radii(features: np.ndarray, k: int, block: int) -> np.ndarray:
  """Squared distance of each point to its k-th nearest other point."""
  f = jnp.asarray(features, jnp.float32)
  out = []
  for i in range(0, len(f), block):
    d = _sq_dists(f[i:i + block], f)
    out.append(np.asarray(jnp.sort(d, axis=1)[:, k]))  # column 0 is the point itself
  return np.concatenate(out)


def _coverage(query: np.ndarray, ref: np.ndarray, radii: np.ndarray, block: int) -> float:
  """Fraction of `query` points inside some ball (ref_j, radius_j)."""
  q, r, rad = (jnp.asarray(a, jnp.float32) for a in (query, ref, radii))
  inside = []
  for i in range(0, len(q), block):
    inside.append(np.asarray(jnp.any(_sq_dists(q[i:i + block], r) <= rad[None], axis=1)))
  return float(np.mean(np.concatenate(inside)))


def precision_recall(real, fake, k: int = 3, block: int = 1000) -> dict:
  """Improved precision and recall (Kynkäänniemi et al.) with k-NN balls, k=3 by default.

  precision: share of fake samples inside the real manifold; recall: share of real
  samples inside the fake manifold.
  """
  real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set.")
  r_real, r_fake = _kth_radii(real, k, block), _kth_radii(fake, k, block)
  return {"precision": _coverage(fake, real, r_real, block),
          "recall": _coverage(real, fake, r_fake, block),
          "k": k, "n_real": len(real), "n_fake": len(fake)}


def inception_score(logits, splits: int = 10) -> dict:
  """exp(E_x KL(p(y|x) ‖ p(y))) over `splits` chunks: {"is", "is_std", "n"}."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for chunk in np.array_split(p, splits):
    py = chunk.mean(0, keepdims=True)
    kl = np.sum(chunk * (np.log(chunk + 1e-12) - np.log(py + 1e-12)), axis=1)
    scores.append(np.exp(kl.mean()))
  return {"is": float(np.mean(scores)), "is_std": float(np.std(scores)), "n": len(p)}


def reference_from_features(features: dict, source: str = "") -> dict:
  """Reference statistics from Inception features {"pool", "spatial"}: mu/sigma (pool),
  mu_s/sigma_s (spatial, for sFID), the pool features themselves (precision/recall), n."""
  pool, spatial = feature_statistics(features["pool"]), feature_statistics(features["spatial"])
  return {"mu": pool["mu"], "sigma": pool["sigma"], "mu_s": spatial["mu"],
          "sigma_s": spatial["sigma"], "pool": np.asarray(features["pool"], np.float32),
          "n": pool["n"], "source": source}


def save_reference(reference: dict, path: str) -> None:
  """Writes reference statistics as .npz (the keys guided-diffusion's evaluator uses)."""
  paths.save_npz(path, **reference)


def load_reference(path: str, inception=None) -> dict:
  """Reference statistics from an .npz: ours, or guided-diffusion's reference batches.

  guided-diffusion's VIRTUAL_*.npz files hold arr_0 (uint8 images) and mu/sigma/mu_s/
  sigma_s; their images are run through `inception` for precision/recall (and for the
  statistics, when a file has only images). Pickled objects are refused.
  """
  try:
    data = paths.load_npz(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"Cannot read reference statistics {path}: {e}. Pass an .npz with "
                     "mu/sigma (and mu_s/sigma_s) or arr_0 images.") from None
  if "pool" not in data and "arr_0" in data:
    if inception is None:
      raise ValueError(f"{path} holds images (arr_0); an Inception is needed to use it.")
    computed = reference_from_features(inception.features_uint8(data["arr_0"]), path)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
      data.setdefault(key, computed[key])
    data["pool"], data["n"] = computed["pool"], computed["n"]
  missing = [k for k in ("mu", "sigma") if k not in data]
  if missing:
    raise ValueError(f"{path} has no {missing}: not a reference-statistics file "
                     f"(keys: {sorted(data)}).")
  data.setdefault("n", len(data["pool"]) if "pool" in data else -1)
  data["n"] = int(data["n"])
  data["source"] = str(data.get("source", path))
  return data


def check_reference_dim(reference: dict, dim: int, path: str) -> None:
  """ValueError unless `reference` holds statistics of `dim`-wide features."""
  shapes = {"mu": (dim,), "sigma": (dim, dim)}
  wrong = [f"{k} {tuple(np.shape(reference[k]))} (expected {v})"
           for k, v in shapes.items() if tuple(np.shape(reference[k])) != v]
  if wrong:
    raise ValueError(f"{path} does not hold statistics of the {dim}-d FID Inception pool "
                     f"features: {', '.join(wrong)}. Pass guided-diffusion's VIRTUAL_*.npz, "
                     "or leave eval.reference_npz empty to compute them from the data.")


def sample_quality(features: dict, reference: dict) -> dict:
  """FID, sFID, precision/recall (k=3) and IS (with logits) of sample features against
  reference statistics, with the sample counts: guided-diffusion's evaluator's set."""
  stats = feature_statistics(features["pool"])
  out = {"fid": frechet_distance(stats["mu"], stats["sigma"], reference["mu"],
                                 reference["sigma"]),
         "n_samples": stats["n"], "n_reference": int(reference["n"])}
  if "mu_s" in reference and "spatial" in features:
    s = feature_statistics(features["spatial"])
    out["sfid"] = frechet_distance(s["mu"], s["sigma"], reference["mu_s"], reference["sigma_s"])
  if "pool" in reference:
    pr = precision_recall(reference["pool"], features["pool"])
    out.update(precision=pr["precision"], recall=pr["recall"])
  if "logits" in features:
    out["inception_score"] = inception_score(features["logits"])["is"]
  return out
