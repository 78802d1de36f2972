"""Spectral normalisation (Miyato et al. 2018) of a network's weights, as a transform of its parameters.

Every weight (a parameter with two or more axes, read as a matrix [-1, out]: a conv kernel [kh, kw, in, out] or a
dense kernel [in, out]) is divided by sigma, an estimate of its largest singular value. Sigma comes from one power
iteration per train step started from the previous step's vector u (kept in the train state, one [out] unit vector
per weight): v = normalize(W u), u' = normalize(W^T v), sigma = v^T W u'. u' and v are constants to the gradient,
which flows through W (the paper's Algorithm 1). Biases are left as they are.

The vectors are a flat dict keyed by the weight's path ('Conv_0/kernel'), so that checkpoints hold plain arrays.
"""
import jax
import jax.numpy as jnp
from flax import traverse_util


def _weights(params) -> dict:
  return {path: w for path, w in traverse_util.flatten_dict(params, sep='/').items() if w.ndim >= 2}


def _normalize(x):
  return x / (jnp.linalg.norm(x) + 1e-12)


def init_vectors(params, key) -> dict:
  """One random unit vector u [out] per weight of params."""
  weights = _weights(params)
  keys = jax.random.split(key, max(len(weights), 1))
  return {path: _normalize(jax.random.normal(k, (w.shape[-1],), w.dtype))
          for k, (path, w) in zip(keys, weights.items())}


def power_iteration(params, vectors: dict) -> dict:
  """path -> (u', v) for each weight after one power iteration from vectors[path], without gradient; u' is the
  vector to keep for the next step."""
  estimates = {}
  for path, w in _weights(jax.lax.stop_gradient(params)).items():
    matrix = w.reshape(-1, w.shape[-1])
    v = _normalize(matrix @ vectors[path])
    estimates[path] = (_normalize(matrix.T @ v), v)
  return estimates


def sigmas(params, estimates: dict) -> dict:
  """path -> the estimated largest singular value of each weight, v^T W u (u, v from power_iteration)."""
  weights = _weights(params)
  return {path: v @ weights[path].reshape(-1, weights[path].shape[-1]) @ u for path, (u, v) in estimates.items()}


def normalize(params, estimates: dict):
  """params with each weight W divided by its sigma (the gradient flows through W only: u, v are constants)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  for path, sigma in sigmas(params, estimates).items():
    flat[path] = flat[path] / sigma
  return traverse_util.unflatten_dict(flat, sep='/')
