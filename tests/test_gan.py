"""Stage 2: the discrete relaxation, pmap equivalence, stage-1 restore, and the chain train_gan.py -> sample.py."""
import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from configs import gan as gan_configs
from configs import vqvae as vqvae_configs
from oasis_jax import checkpoints, parallel, sampling, stage1
from oasis_jax.data import input_pipeline, tfds_oasis
from oasis_jax.errors import UserError
from oasis_jax.models import dcgan, spectral_norm, vqvae
from oasis_jax.training import augment, gan_trainer


def test_gumbel_noise_has_the_gumbel_distribution_and_one_stream_per_row():
  """Gumbel(0, 1): mean Euler's gamma, variance pi^2 / 6, CDF exp(-exp(-x)); argmax(logits + noise) draws codes with
  probabilities softmax(logits) (the Gumbel-max trick); a row's noise depends on its index, not on the batch."""
  rows = jnp.arange(4, 12)
  noise = np.asarray(sampling.gumbel_noise(jax.random.key(0), rows, (32, 32, 64)), np.float64)
  assert noise.shape == (8, 32, 32, 64)
  assert abs(noise.mean() - np.euler_gamma) < 0.005                        # standard error 0.0014
  assert abs(noise.var() - np.pi ** 2 / 6) < 0.02
  for x in (-1.0, 0.0, 1.0, 3.0):
    assert abs((noise <= x).mean() - np.exp(-np.exp(-x))) < 0.003
  assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.01   # rows are not one stream
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
  codes = np.asarray(jnp.argmax(logits + sampling.gumbel_noise(jax.random.key(1), jnp.arange(64), (64, 64, 4)), -1))
  np.testing.assert_allclose(np.bincount(codes.ravel(), minlength=4) / codes.size, [0.5, 0.3, 0.15, 0.05], atol=0.004)
  alone = sampling.gumbel_noise(jax.random.key(0), jnp.arange(6, 8), (32, 32, 64))
  np.testing.assert_array_equal(alone, noise[2:4].astype(np.float32))
  assert not np.array_equal(sampling.gumbel_noise(jax.random.key(2), rows[:1], (32, 32, 64)), noise[:1])


def test_scaled_gumbel_noise_is_the_noise_times_its_scale_and_none_at_zero():
  rows, shape = jnp.arange(3, 7), (8, 8, 16)
  noise = np.asarray(sampling.gumbel_noise(jax.random.key(0), rows, shape))
  np.testing.assert_array_equal(sampling.scaled_gumbel_noise(jax.random.key(0), rows, shape, 1.0), noise)
  np.testing.assert_allclose(sampling.scaled_gumbel_noise(jax.random.key(0), rows, shape, 0.5), noise / 2, rtol=1e-7)
  np.testing.assert_array_equal(sampling.scaled_gumbel_noise(jax.random.key(0), rows, shape, 0.0),
                                np.zeros((4, *shape)))


def test_gumbel_straight_through_is_one_hot_forward_and_softmax_backward():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 5)), jnp.float32)
  noise = jax.random.gumbel(jax.random.key(1), logits.shape)
  one_hot, codes = dcgan.gumbel_straight_through(logits, noise, 0.7)
  np.testing.assert_allclose(one_hot, jax.nn.one_hot(codes, 5), atol=1e-6)
  assert codes.min() >= 0 and codes.max() < 5
  weights = jnp.arange(5.0)
  grad = jax.grad(lambda l: jnp.sum(dcgan.gumbel_straight_through(l, noise, 0.7)[0] * weights))(logits)
  expected = jax.grad(lambda l: jnp.sum(jax.nn.softmax((l + noise) / 0.7) * weights))(logits)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grad).max()) > 0  # gradients reach the generator despite the argmax


def test_latent_quantization_is_nearest_code_forward_and_identity_backward():
  codebook = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  latents = jnp.asarray([[[[0.9, 0.1], [0.1, 1.2]], [[-0.3, 0.2], [5.0, 5.0]]]])   # [1, 2, 2, 2]
  quantized, codes = dcgan.quantize_straight_through(latents, codebook)
  np.testing.assert_array_equal(codes, [[[1, 2], [0, 2]]])
  np.testing.assert_allclose(quantized, codebook[codes], atol=1e-6)
  grad = jax.grad(lambda l: jnp.sum(dcgan.quantize_straight_through(l, codebook)[0] * jnp.arange(2.0)))(latents)
  np.testing.assert_allclose(grad, jnp.broadcast_to(jnp.arange(2.0), latents.shape))


def test_minibatch_std_matches_hand_computation():
  x = np.random.default_rng(0).normal(size=(4, 2, 2, 3)).astype(np.float32)
  out = np.asarray(dcgan.minibatch_std(jnp.asarray(x), 2))
  assert out.shape == (4, 2, 2, 4)
  np.testing.assert_array_equal(out[..., :3], x)
  for group in range(2):
    expected = np.sqrt(x[2 * group:2 * group + 2].var(axis=0) + 1e-8).mean()
    np.testing.assert_allclose(out[2 * group:2 * group + 2, ..., 3], expected, rtol=1e-5)


def test_spectral_norm_matches_numpy():
  """One power iteration against NumPy's; iterated, sigma converges to the largest singular value of a kernel with
  a hand-made spectrum (3, 2, 1, ...), and the normalised kernel's is 1; a dense [in, 1] kernel's sigma is its norm
  after one iteration; biases are untouched."""
  rng = np.random.default_rng(0)
  left, _ = np.linalg.qr(rng.normal(size=(4 * 4 * 6, 8)))
  right, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  singular = np.asarray([3.0, 2.0, 1.0, 0.5, 0.5, 0.25, 0.1, 0.1])
  kernel = ((left * singular) @ right.T).reshape(4, 4, 6, 8).astype(np.float32)
  dense = rng.normal(size=(5, 1)).astype(np.float32)
  params = {'Conv_0': {'kernel': kernel, 'bias': np.ones(8, np.float32)}, 'Dense_0': {'kernel': dense,
                                                                                        'bias': np.ones(1, np.float32)}}
  vectors = spectral_norm.init_vectors(params, jax.random.key(0))
  assert sorted(vectors) == ['Conv_0/kernel', 'Dense_0/kernel'] and vectors['Conv_0/kernel'].shape == (8,)
  matrix, u = kernel.reshape(-1, 8).astype(np.float64), np.asarray(vectors['Conv_0/kernel'], np.float64)
  v = matrix @ u / np.linalg.norm(matrix @ u)
  u_next = matrix.T @ v / np.linalg.norm(matrix.T @ v)
  estimates = spectral_norm.power_iteration(params, vectors)
  np.testing.assert_allclose(estimates['Conv_0/kernel'][0], u_next, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(estimates['Conv_0/kernel'][1], v, rtol=1e-5, atol=1e-6)
  assert float(spectral_norm.sigmas(params, estimates)['Dense_0/kernel']) == pytest.approx(np.linalg.norm(dense),
                                                                                         rel=1e-5)
  for _ in range(30):   # the error shrinks as (2 / 3)^2 per iteration
    estimates = spectral_norm.power_iteration(params, {path: u for path, (u, _) in estimates.items()})
  assert float(spectral_norm.sigmas(params, estimates)['Conv_0/kernel']) == pytest.approx(3.0, rel=1e-4)
  normalised = spectral_norm.normalize(params, estimates)
  assert np.linalg.svd(np.asarray(normalised['Conv_0']['kernel']).reshape(-1, 8), compute_uv=False)[0] == \
      pytest.approx(1.0, rel=1e-4)
  np.testing.assert_array_equal(normalised['Conv_0']['bias'], params['Conv_0']['bias'])


def test_spectral_norm_gradient_holds_the_vectors_constant():
  """d(W / (v^T W u)) with u, v constants (Miyato et al.'s Algorithm 1), against the hand-derived gradient of
  sum(c * W / sigma): c / sigma - (sum(c * W) / sigma^2) v u^T."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(6, 3)).astype(np.float32)
  c = rng.normal(size=(6, 3)).astype(np.float32)
  params = {'Dense_0': {'kernel': w}}
  estimates = spectral_norm.power_iteration(params, spectral_norm.init_vectors(params, jax.random.key(1)))
  u, v = (np.asarray(x, np.float64) for x in estimates['Dense_0/kernel'])
  grad = jax.grad(lambda p: jnp.sum(c * spectral_norm.normalize(p, estimates)['Dense_0']['kernel']))(params)
  sigma = v @ w @ u
  expected = c / sigma - np.sum(c * w) / sigma ** 2 * np.outer(v, u)
  np.testing.assert_allclose(grad['Dense_0']['kernel'], expected, rtol=1e-4, atol=1e-6)


def test_translation_and_cutout_match_hand_computed_maps():
  x = jnp.arange(1.0, 17.0).reshape(4, 4, 1)
  moved = np.asarray(augment.translate(x, jnp.asarray([1, -2])))[..., 0]
  expected = np.zeros((4, 4))
  expected[1:, :2] = np.asarray(x)[:3, 2:, 0]                 # out[i, j] = x[i - 1, j + 2]
  np.testing.assert_array_equal(moved, expected)
  grad = jax.grad(lambda v: augment.translate(v, jnp.asarray([1, -2])).sum())(x)[..., 0]
  np.testing.assert_array_equal(grad, np.pad(np.ones((3, 2)), ((0, 1), (2, 0))))   # only what moved in counts
  cut = np.asarray(augment.cutout(x, jnp.asarray([3, 0]), 2))[..., 0]
  expected = np.asarray(x)[..., 0].copy()
  expected[2:4, 0:1] = 0                                       # rows 2-3, columns -1..0 clipped to 0
  np.testing.assert_array_equal(cut, expected)


def test_augmentation_draws_per_global_row():
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  draw = jax.jit(augment.augment, static_argnums=(3, 4))
  whole = draw(x, jax.random.key(1), jnp.arange(6), ('translation', 'cutout'), 0.25)
  halves = [draw(x[i:i + 3], jax.random.key(1), jnp.arange(i, i + 3), ('translation', 'cutout'), 0.25)
            for i in (0, 3)]
  np.testing.assert_array_equal(whole, jnp.concatenate(halves))
  assert not np.array_equal(whole, x)
  np.testing.assert_array_equal(augment.augment(x, jax.random.key(1), jnp.arange(6), ()), x)
  with pytest.raises(ValueError, match="unknown augmentation 'color'"):
    augment.check_policy('translation,color')


@pytest.mark.parametrize('head', ['logits', 'latent'])
def test_generator_codes_are_valid_indices_for_any_input(head):
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  config.head = head
  config.discriminator_input = 'one_hot' if head == 'logits' else 'embedding'
  generator, discriminator = sampling.make_models(config, stage1)
  g_vars = generator.init(jax.random.key(0), jnp.zeros((2, config.latent_dim)), train=False)
  z = 100.0 * jax.random.normal(jax.random.key(1), (4, config.latent_dim))   # far outside the training range
  outputs = generator.apply(g_vars, z, train=False)
  codebook = jax.random.normal(jax.random.key(2), (32, 8))
  noise = jax.random.gumbel(jax.random.key(3), outputs.shape)
  codes = dcgan.sample_codes(outputs, codebook, head, noise)
  assert outputs.shape == (4, 16, 16, 32 if head == 'logits' else 8) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < 32
  channels = gan_trainer.discriminator_channels(config, stage1)
  assert channels == (32 if head == 'logits' else 8)
  d_vars = discriminator.init(jax.random.key(2), jnp.zeros((1, 16, 16, channels)))
  assert discriminator.apply(d_vars, jnp.zeros((3, 16, 16, channels))).shape == (3,)


def test_generator_final_convs_are_conv_batchnorm_blocks_at_the_code_size():
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  z = jnp.zeros((2, config.latent_dim))
  counts, shapes = [], []
  for blocks in (0, 2):
    config.generator_final_convs = blocks
    generator = sampling.make_models(config, stage1)[0]
    variables = generator.init(jax.random.key(0), z, train=False)
    counts.append(sum(leaf.size for leaf in jax.tree.leaves(variables['params'])))
    shapes.append(generator.apply(variables, z, train=False).shape)
  width = config.generator_width   # the last level's width
  assert shapes[0] == shapes[1] == (2, 16, 16, 32)
  assert counts[1] - counts[0] == 2 * (9 * width * width + width + 2 * width)   # 3x3 conv + bias, BN scale + bias


def _with_sgd(states):
  """The (generator, discriminator) states with plain SGD at rate 1: a step moves the parameters by -gradient."""
  return tuple(state.replace(tx=optax.sgd(1.0), opt_state=optax.sgd(1.0).init(state.params)) for state in states)


@pytest.mark.parametrize('overrides', [
    {},
    {'head': 'latent', 'discriminator_input': 'embedding', 'loss': 'hinge', 'minibatch_std_group': 2, 'r1_gamma': 1.0,
     'generator_ema': 0.9, 'augment': 'translation,cutout', 'augment_translation': 0.25},
    {'discriminator_input': 'one_hot', 'augment': 'translation', 'r1_gamma': 1.0},
    {'spectral_norm': True, 'r1_gamma': 1.0},
    {'gumbel_scale': 0.0, 'r1_gamma': 1.0},
    {'code_histogram_weight': 3.0},
    {'code_histogram_weight': 3.0, 'code_histogram_scope': 'position'},
    {'generator_final_convs': 1},
])
def test_two_device_gan_step_equals_one_device_step(overrides):
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  config.update(overrides)
  # Plain SGD, so that the states compare gradients: Adam's first update g / (|g| + eps) magnifies the float
  # rounding of near-zero gradients (one element in 8192 moved 2e-5 in a run).
  states = _with_sgd(jax.device_get(gan_trainer.create_states(config, stage1, jax.random.key(0))))
  codebook = jax.random.normal(jax.random.key(1), (32, 8))
  real = np.asarray(jax.random.randint(jax.random.key(2), (8, 16, 16), 0, 32))
  generator, discriminator = sampling.make_models(config, stage1, axis_name=parallel.AXIS)
  step = functools.partial(gan_trainer.train_step, config=config, generator=generator, discriminator=discriminator)
  results = []
  for devices in (jax.local_devices()[:1], jax.local_devices()[:2]):
    n = len(devices)
    p_step = jax.pmap(step, axis_name=parallel.AXIS, in_axes=(0, 0, None, None), devices=devices)
    replicated = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + np.shape(x)), states)
    new_states, step_metrics = p_step(replicated, real.reshape(n, 8 // n, 16, 16), jax.random.key(3), codebook)
    new_states = jax.device_get(new_states)
    for leaf in jax.tree.leaves(new_states):
      np.testing.assert_array_equal(leaf[0], leaf[-1])   # replicas agree: gradients and BN statistics averaged
    results.append((jax.tree.map(lambda x: x[0], new_states), jax.device_get(step_metrics)))
  (one, one_metrics), (two, two_metrics) = results
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(one_metrics['g_loss'][0], two_metrics['g_loss'][0], rtol=1e-5)
  assert int(one_metrics['codes_used'][0]) == int(two_metrics['codes_used'][0])
  if overrides.get('code_histogram_weight'):
    np.testing.assert_allclose(one_metrics['histogram_kl'][0], two_metrics['histogram_kl'][0], rtol=1e-5)
    assert float(one_metrics['histogram_kl'][0]) > 0.01


@pytest.mark.parametrize('per_position', [False, True])
def test_code_histogram_term_has_the_gradient_of_the_kl_over_the_global_batch(per_position):
  """KL(p_real || mean softmax) over all rows (per_position: at each of the 3x3 positions, averaged over them), in
  float64 NumPy with a finite-difference gradient, against the term's gradient on 1 device and on 2 devices (the
  halves' gradients averaged, as pmean does); its logged value is that KL as metrics.code_histogram_kl smooths it
  (both normalised histograms + 1e-6, renormalised)."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 3, 3, 5)) * 2
  counts = rng.integers(0, 4, (3, 3, 5)).astype(float) if per_position else np.array([10., 0., 5., 20., 1.])
  counts.reshape(-1, 5)[:, 0] += 1   # no empty histogram

  def kl(x, epsilon=0.0):
    e = np.exp(x - x.max(-1, keepdims=True))
    q = (e / e.sum(-1, keepdims=True)).reshape(4, -1, 5).mean(0) if per_position else \
        (e / e.sum(-1, keepdims=True)).reshape(-1, 5).mean(0, keepdims=True)
    p = counts.reshape(-1, 5) / counts.reshape(-1, 5).sum(-1, keepdims=True)
    p, q = p + epsilon, q + epsilon
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    return np.mean(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0.0), axis=-1))
  expected = np.zeros_like(logits)
  for index in np.ndindex(logits.shape):
    step = np.zeros_like(logits)
    step[index] = 1e-6
    expected[index] = (kl(logits + step) - kl(logits - step)) / 2e-6
  assert np.abs(expected).max() > 1e-3
  for devices in (jax.local_devices()[:1], jax.local_devices()[:2]):
    n = len(devices)
    term = lambda x: gan_trainer.code_histogram_term(x, jnp.asarray(counts, jnp.float32), 2.0)
    grads, values = jax.pmap(lambda x: (jax.grad(lambda y: term(y)[0])(x), term(x)[1]), axis_name=parallel.AXIS,
                             devices=devices)(jnp.asarray(logits, jnp.float32).reshape(n, 4 // n, 3, 3, 5))
    np.testing.assert_allclose(values, kl(logits, 1e-6), rtol=1e-5)
    # pmean of the devices' gradients: each device's rows get its gradient / n
    np.testing.assert_allclose(np.asarray(grads).reshape(logits.shape) / n, 2.0 * expected, rtol=1e-3, atol=1e-6)


def test_lazy_r1_step_is_the_r1_step_with_gamma_times_the_interval():
  """r1_every=4: the step that applies R1 equals an every-step R1 step with gamma x 4 (hand-scaled)."""
  stage1 = vqvae_configs.get_config('tiny')
  results = []
  for gamma, every in ((1.0, 4), (4.0, 1)):
    config = gan_configs.get_config('tiny')
    config.r1_gamma, config.r1_every = gamma, every
    states = jax.device_get(gan_trainer.create_states(config, stage1, jax.random.key(0)))
    generator, discriminator = sampling.make_models(config, stage1, axis_name=parallel.AXIS)
    step = jax.pmap(functools.partial(gan_trainer.train_step, config=config, generator=generator,
                                      discriminator=discriminator, with_r1=True),
                    axis_name=parallel.AXIS, in_axes=(0, 0, None, None), devices=jax.local_devices()[:1])
    real = np.asarray(jax.random.randint(jax.random.key(2), (1, 8, 16, 16), 0, 32))
    new_states, step_metrics = step(jax.tree.map(lambda x: np.asarray(x)[None], states), real, jax.random.key(3),
                                    jax.random.normal(jax.random.key(1), (32, 8)))
    results.append((jax.device_get(new_states[1].params), float(step_metrics['r1'][0])))
  (lazy, lazy_r1), (every, every_r1) = results
  for a, b in zip(jax.tree.leaves(lazy), jax.tree.leaves(every)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert lazy_r1 == pytest.approx(4 * every_r1, rel=1e-5) and every_r1 > 0   # the metric is the scaled penalty


def test_generator_ema_follows_the_warmed_up_recursion():
  """ema_t = d_t ema_(t-1) + (1 - d_t) params_t, d_t = min(decay, (1 + t) / (10 + t)), ema_0 = the initial weights
  (hand-computed over three steps); decay 0 keeps the live weights."""
  assert float(gan_trainer.generator_ema_decay(0.5, 1)) == pytest.approx(2 / 11)
  assert float(gan_trainer.generator_ema_decay(0.5, 100)) == 0.5
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  config.generator_ema = 0.5
  states = jax.tree.map(lambda x: np.asarray(x)[None],
                        jax.device_get(gan_trainer.create_states(config, stage1, jax.random.key(0))))
  generator, discriminator = sampling.make_models(config, stage1, axis_name=parallel.AXIS)
  make_step = lambda config: jax.pmap(
      functools.partial(gan_trainer.train_step, config=config, generator=generator, discriminator=discriminator),
      axis_name=parallel.AXIS, in_axes=(0, 0, None, None), devices=jax.local_devices()[:1])
  step = make_step(config)
  codebook = jax.random.normal(jax.random.key(1), (32, 8))
  expected = jax.device_get(states[0].params)
  for t in (1, 2, 3):
    real = np.asarray(jax.random.randint(jax.random.key(10 + t), (1, 8, 16, 16), 0, 32))
    states, _ = step(states, real, jax.random.key(t), codebook)
    d = min(0.5, (1 + t) / (10 + t))
    expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, jax.device_get(states[0].params))
  for a, b in zip(jax.tree.leaves(jax.device_get(states[0].ema_params)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(jax.device_get(states[0].ema_params)),
                                                jax.tree.leaves(jax.device_get(states[0].params)))]
  assert max(moved) > 1e-4   # the average lags the live weights
  config.generator_ema = 0.0
  states, _ = make_step(config)(states, real, jax.random.key(4), codebook)
  live = jax.device_get(states[0])
  for a, b in zip(jax.tree.leaves(live.ema_params), jax.tree.leaves(live.params)):
    np.testing.assert_array_equal(a, b)


def test_steps_per_call_equal_single_steps():
  """A call of several steps (train_calls' pmapped train_steps, lazy R1 on the steps r1_pattern names) gives the
  states and per-step metrics of as many single-step calls, up to float rounding."""
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  config.r1_gamma, config.r1_every = 1.0, 2
  pattern = gan_trainer.r1_pattern(config, 3, 6)
  assert pattern == (False, True, False, True)
  states = jax.tree.map(lambda x: np.asarray(x)[None],
                        jax.device_get(gan_trainer.create_states(config, stage1, jax.random.key(0))))
  codebook = jax.random.normal(jax.random.key(1), (32, 8))
  real = np.asarray(jax.random.randint(jax.random.key(2), (4, 1, 8, 16, 16), 0, 32))
  keys = jnp.stack([jax.random.key(i) for i in range(4)])
  generator, discriminator = sampling.make_models(config, stage1, axis_name=parallel.AXIS)
  models = dict(config=config, generator=generator, discriminator=discriminator)
  pmap = lambda f: jax.pmap(f, axis_name=parallel.AXIS, in_axes=(0, 0, None, None), devices=jax.local_devices()[:1])
  one = {r1: pmap(functools.partial(gan_trainer.train_step, with_r1=r1, **models)) for r1 in (False, True)}
  single, losses, r1s = states, [], []
  for i, with_r1 in enumerate(pattern):
    single, step_metrics = one[with_r1](single, real[i], keys[i], codebook)
    losses.append(float(step_metrics['d_loss'][0]))
    r1s.append(float(step_metrics['r1'][0]))
  many, stacked = gan_trainer.train_calls(**models)(pattern)(states, real.swapaxes(0, 1), keys, codebook)
  assert stacked['d_loss'].shape == (1, 4) and int(many[0].step[0]) == 4
  assert r1s[0] == 0 and r1s[1] > 0
  np.testing.assert_allclose(stacked['d_loss'][0], losses, rtol=1e-5)
  np.testing.assert_allclose(stacked['r1'][0], r1s, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(many)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _one_step(config, stage1):
  """One train step on one device from fresh SGD states: (states before, (g, d) states after, codebook, real code
  maps [1, 8, 16, 16], and the step's noise for rows 0..7: z and the Gumbel key)."""
  states = _with_sgd(jax.device_get(gan_trainer.create_states(config, stage1, jax.random.key(0))))
  codebook = np.asarray(jax.random.normal(jax.random.key(1), (32, 8)))
  real = np.asarray(jax.random.randint(jax.random.key(2), (1, 8, 16, 16), 0, 32))
  generator, discriminator = sampling.make_models(config, stage1, axis_name=parallel.AXIS)
  step = jax.pmap(functools.partial(gan_trainer.train_step, config=config, generator=generator,
                                    discriminator=discriminator),
                  axis_name=parallel.AXIS, in_axes=(0, 0, None, None), devices=jax.local_devices()[:1])
  key = jax.random.key(3)
  after, _ = jax.device_get(step(jax.tree.map(lambda x: np.asarray(x)[None], states), real, key, codebook))
  z_key, gumbel_key = jax.random.split(jax.random.split(key)[0])
  z = sampling.per_row_noise(z_key, jnp.arange(8), lambda k: jax.random.normal(k, (config.latent_dim,)))
  return states, after, codebook, real, z, gumbel_key


@pytest.mark.parametrize('discriminator_input, spectral, gumbel_scale', [
    ('embedding', False, 1.0), ('one_hot', False, 1.0), ('embedding', True, 1.0), ('embedding', False, 0.0),
    ('embedding', False, 0.5)])
def test_discriminator_update_is_the_gradient_on_real_and_generated_codes(discriminator_input, spectral,
                                                                          gumbel_scale):
  """The step's discriminator gradient equals one computed here: real code maps as one-hot rows of the identity
  (NumPy) or as codebook rows, generated ones through a fresh generator pass with the step's noise; with spectral
  normalisation, through the weights divided by their sigma after one power iteration, whose vectors the step
  keeps. gumbel_scale 0: the generated codes are argmax(logits)."""
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  config.discriminator_input, config.r1_gamma, config.spectral_norm = discriminator_input, 0.0, spectral
  config.gumbel_scale = gumbel_scale
  states, (_, d_after), codebook, real, z, gumbel_key = _one_step(config, stage1)
  g_model, d_model = sampling.make_models(config, stage1)
  outputs = g_model.apply({'params': states[0].params, 'batch_stats': states[0].batch_stats}, z, train=True,
                          mutable=['batch_stats'])[0]
  noise = sampling.gumbel_noise(gumbel_key, jnp.arange(8), outputs.shape[1:])
  codes = np.asarray(jnp.argmax(outputs + gumbel_scale * noise if gumbel_scale else outputs, axis=-1))
  seen = (lambda c: np.eye(32, dtype=np.float32)[c]) if discriminator_input == 'one_hot' else (lambda c: codebook[c])
  assert seen(real[0]).shape[-1] == (32 if discriminator_input == 'one_hot' else 8)

  assert hasattr(states[1], 'spectral') == spectral   # without it, the state saved before the option
  estimates = spectral_norm.power_iteration(states[1].params, states[1].spectral) if spectral else {}
  for path, (u, _) in estimates.items():
    np.testing.assert_allclose(d_after.spectral[path][0], u, rtol=1e-5, atol=1e-6)

  def loss(d_params):
    weights = spectral_norm.normalize(d_params, estimates) if spectral else d_params
    apply = lambda x: d_model.apply({'params': weights}, x)
    return gan_trainer.discriminator_loss(apply(seen(real[0])), apply(seen(codes)), config.loss)
  expected = jax.grad(loss)(states[1].params)
  step_gradient = jax.tree.map(lambda before, after: before - after[0], states[1].params, d_after.params)
  for a, b in zip(jax.tree.leaves(step_gradient), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  assert max(np.abs(leaf).max() for leaf in jax.tree.leaves(expected)) > 1e-3


@pytest.mark.parametrize('head, discriminator_input, spectral, gumbel_scale', [
    ('logits', 'embedding', False, 1.0), ('latent', 'embedding', False, 1.0), ('logits', 'one_hot', False, 1.0),
    ('logits', 'embedding', True, 1.0), ('logits', 'embedding', False, 0.0)])
def test_one_generator_pass_gives_the_generator_gradient_under_the_updated_discriminator(head, discriminator_input,
                                                                                          spectral, gumbel_scale):
  """The step's generator gradient equals a directly computed one: G's loss (plus the latent head's commitment)
  through a fresh forward pass with the step's noise, scored by the discriminator after its update. Plain SGD with
  rate 1 makes the parameter change the gradient itself (Adam's first update would be only its sign). With
  spectral normalisation the updated discriminator's weights are divided by their sigma from the step's power
  iteration (on the weights before the update). gumbel_scale 0: straight-through argmax, softmax(logits / tau)
  backward."""
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  config.head, config.r1_gamma, config.discriminator_input = head, 1.0, discriminator_input
  config.spectral_norm, config.gumbel_scale = spectral, gumbel_scale
  states, (g_after, d_after), codebook, real, z, gumbel_key = _one_step(config, stage1)
  d_params = jax.tree.map(lambda x: x[0], d_after.params)
  if spectral:
    d_params = spectral_norm.normalize(d_params, spectral_norm.power_iteration(states[1].params, states[1].spectral))
  rows = jnp.arange(8)
  g_model, d_model = sampling.make_models(config, stage1)

  def loss(g_params):
    outputs = g_model.apply({'params': g_params, 'batch_stats': states[0].batch_stats}, z, train=True,
                            mutable=['batch_stats'])[0]
    gumbel = gumbel_scale * sampling.gumbel_noise(gumbel_key, rows, outputs.shape[1:])
    fake, _, penalty = gan_trainer.generated_codes(outputs, codebook, config, gumbel)
    return gan_trainer.generator_loss(d_model.apply({'params': d_params}, fake), config.loss) + penalty
  expected = jax.grad(loss)(states[0].params)
  step_gradient = jax.tree.map(lambda before, after: before - after[0], states[0].params, g_after.params)
  for a, b in zip(jax.tree.leaves(step_gradient), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  assert max(np.abs(leaf).max() for leaf in jax.tree.leaves(expected)) > 1e-3


def test_two_time_scale_rates_move_each_network_by_its_own_rate():
  """discriminator_learning_rate: Adam's first update is rate x g / (|g| + eps), so every parameter with a gradient
  far above eps moves by its network's rate exactly: the generator's learning_rate, the discriminator's own."""
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  config.learning_rate, config.discriminator_learning_rate = 1e-3, 4e-3
  states = jax.device_get(gan_trainer.create_states(config, stage1, jax.random.key(0)))
  generator, discriminator = sampling.make_models(config, stage1, axis_name=parallel.AXIS)
  step = jax.pmap(functools.partial(gan_trainer.train_step, config=config, generator=generator,
                                    discriminator=discriminator),
                  axis_name=parallel.AXIS, in_axes=(0, 0, None, None), devices=jax.local_devices()[:1])
  real = np.asarray(jax.random.randint(jax.random.key(2), (1, 8, 16, 16), 0, 32))
  after, _ = jax.device_get(step(jax.tree.map(lambda x: np.asarray(x)[None], states), real, jax.random.key(3),
                                 jax.random.normal(jax.random.key(1), (32, 8))))
  for before, moved, rate in ((states[0], after[0], 1e-3), (states[1], after[1], 4e-3)):
    steps = np.concatenate([np.abs(np.asarray(a[0]) - np.asarray(b)).ravel()
                            for a, b in zip(jax.tree.leaves(moved.params), jax.tree.leaves(before.params))])
    assert steps.max() == pytest.approx(rate, rel=1e-4)
    assert np.median(steps) == pytest.approx(rate, rel=1e-2)   # most parameters, not one


def test_gan_config_errors_name_the_field():
  stage1 = vqvae_configs.get_config('tiny')
  config = gan_configs.get_config('tiny')
  config.discriminator_learning_rate = -1e-4
  with pytest.raises(UserError, match=r'^config.discriminator_learning_rate=-0.0001: expected a positive rate, or '
                                      r'0 for config.learning_rate$'):
    gan_trainer.check_config(config, stage1)
  config.discriminator_learning_rate, config.learning_rate = 0.0, 0.0
  with pytest.raises(UserError, match=r'^config.learning_rate=0.0: expected a positive rate$'):
    gan_trainer.check_config(config, stage1)
  config.learning_rate, config.upsample = 1e-3, 'bilinear'
  with pytest.raises(UserError, match=r"^config.upsample='bilinear': expected one of subpixel, transpose, resize$"):
    gan_trainer.check_config(config, stage1)
  config.upsample, config.loss = 'subpixel', 'wasserstein'
  with pytest.raises(UserError, match=r"^config.loss='wasserstein': expected nonsaturating or hinge$"):
    gan_trainer.check_config(config, stage1)
  config.loss, config.discriminator_input = 'hinge', 'pixels'
  with pytest.raises(UserError, match=r"^config.discriminator_input='pixels': expected embedding or one_hot$"):
    gan_trainer.check_config(config, stage1)
  config.discriminator_input, config.gumbel_scale = 'embedding', -1.0
  with pytest.raises(UserError, match=r'^config.gumbel_scale=-1.0: expected a number >= 0 \(1 draws codes from '
                                      r'softmax\(logits\), 0 takes their argmax\)$'):
    gan_trainer.check_config(config, stage1)
  config.gumbel_scale, config.generator_final_convs = 1.0, -1
  with pytest.raises(UserError, match=r'^config.generator_final_convs=-1: expected a number >= 0$'):
    gan_trainer.check_config(config, stage1)
  config.generator_final_convs, config.code_histogram_weight = 0, -1.0
  with pytest.raises(UserError, match=r'^config.code_histogram_weight=-1.0: expected a number >= 0$'):
    gan_trainer.check_config(config, stage1)
  config.code_histogram_weight, config.head = 1.0, 'latent'
  with pytest.raises(UserError, match=r"^config.code_histogram_weight=1.0: needs config.head=logits \(head 'latent' "
                                      r"has no code probabilities to match\)$"):
    gan_trainer.check_config(config, stage1)
  config.head, config.code_histogram_scope = 'logits', 'row'
  with pytest.raises(UserError, match=r"^config.code_histogram_scope='row': expected global or position$"):
    gan_trainer.check_config(config, stage1)
  config.code_histogram_weight, config.code_histogram_scope, config.conv_impl = 0.0, 'global', 'fft'
  with pytest.raises(UserError, match=r"^config.conv_impl='fft': expected one of xla, im2col, winograd, taps, auto$"):
    gan_trainer.check_config(config, stage1)


def test_train_gan_logs_and_checkpoints(tiny_chain):
  assert 'step 20/20' in tiny_chain['gan_log'] and 'code_kl' in tiny_chain['gan_log']
  assert sorted(os.listdir(os.path.join(tiny_chain['gan'], 'checkpoints'))) == ['10', '20']
  assert len(os.listdir(os.path.join(tiny_chain['gan'], 'best'))) == 1   # the lower validation SWD of the two
  assert os.path.exists(os.path.join(tiny_chain['gan'], 'images', 'samples_000020.png'))
  assert 'validate: swd' in tiny_chain['gan_log']


def test_decoding_a_splits_codes_gives_its_reconstructions(tiny_chain):
  """stage1.decode of the codes encode_split makes (how evaluate --stage=gan gets its reference reconstructions)
  equals stage1.reconstruct of the slices, in batches that leave a padded remainder."""
  model, variables, config = stage1.load(tiny_chain['stage1'])
  source = tfds_oasis.prepare(config.dataset, config.data_dir, config.cache_dir).as_data_source('validate')
  images = input_pipeline.load_images(source, config.image_size)
  codes = stage1.encode_split(model, variables, source, config.image_size)
  assert len(images) % 4 and codes.shape == (len(images), 16, 16)
  decoded = stage1.decode(model, variables, codes, batch_size=4)
  np.testing.assert_allclose(decoded, stage1.reconstruct(model, variables, images, batch_size=4), atol=1e-5)
  assert np.abs(decoded - stage1.decode(model, variables, codes[::-1], batch_size=4)).max() > 0.1


def test_sample_cli_writes_pngs_deterministically(tiny_chain, tmp_path, run_cli):
  for name in ('a', 'b'):   # two processes, one seed
    result = run_cli('sample.py', '--num=3', f'--workdir={tiny_chain["gan"]}', f'--outdir={tmp_path / name}',
                     '--seed=5')
    assert 'wrote 3 samples' in result.stdout
  sampling.write_samples(tiny_chain['gan'], str(tmp_path / 'c'), 3, seed=6, say=lambda line: None)
  files = sorted(os.listdir(tmp_path / 'a'))
  assert files == ['grid.png', 'sample_0000.png', 'sample_0001.png', 'sample_0002.png']
  read = lambda name, file: np.asarray(Image.open(tmp_path / name / file))
  image = Image.open(tmp_path / 'a' / 'sample_0001.png')
  assert image.mode == 'L' and image.size == (64, 64)
  np.testing.assert_array_equal(read('a', 'sample_0002.png'), read('b', 'sample_0002.png'))
  assert not np.array_equal(read('a', 'sample_0002.png'), read('c', 'sample_0002.png'))


def test_samples_replace_an_earlier_runs_and_the_grid_shows_the_first_64(tiny_chain, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('not ours')
  said = []
  sampling.write_samples(tiny_chain['gan'], str(out), 70, seed=1, say=said.append)
  assert said == [] and len(list(out.glob('sample_*.png'))) == 70
  grid = np.asarray(Image.open(out / 'grid.png'))
  assert grid.shape == (8 * 66 - 2, 8 * 66 - 2)               # 64 tiles of 64x64, 2 pixels apart
  np.testing.assert_array_equal(grid[66 * 7:66 * 7 + 64, 66 * 7:66 * 7 + 64],
                                np.asarray(Image.open(out / 'sample_0063.png')))
  sampling.write_samples(tiny_chain['gan'], str(out), 3, seed=2, say=said.append)
  assert said == [f'removed 71 earlier sample files from {out}']
  assert sorted(os.listdir(out)) == ['grid.png', 'notes.txt', 'sample_0000.png', 'sample_0001.png', 'sample_0002.png']


def test_stage1_path_is_stored_absolute_and_an_old_relative_one_can_be_overridden(tiny_chain, tmp_path, monkeypatch,
                                                                                   edit_saved_config):
  _, config = checkpoints.read_config(tiny_chain['gan'])
  assert os.path.isabs(config.vqvae_workdir)
  shutil.copytree(tiny_chain['gan'], tmp_path / 'gan')
  shutil.copytree(tiny_chain['stage1'], tmp_path / 'stage1')
  edit_saved_config(tmp_path / 'gan', vqvae_workdir='stage1')   # as runs stored it before: relative
  shutil.rmtree(tmp_path / 'gan' / 'stage1')          # and before they kept a copy of their stage 1
  monkeypatch.chdir(tmp_path / 'gan')                 # another directory
  with pytest.raises(UserError, match=r'^stage1: the stage-1 workdir this stage-2 run was trained on does not exist '
                                      r'\(a relative path is read from the current directory\): pass '
                                      r'--vqvae_workdir=DIR$'):
    sampling.load(str(tmp_path / 'gan'))
  loaded = sampling.load(str(tmp_path / 'gan'), vqvae_workdir=str(tmp_path / 'stage1'))
  assert loaded.stage1_config.num_embeddings == 32


def test_stage2_keeps_decoding_with_the_stage1_it_was_trained_on(tiny_chain, tmp_path, edit_saved_config):
  """Stage 1 retrained in its workdir after stage 2 (here: its config now says K=16) changes nothing for stage 2,
  which decodes with its copy in WORKDIR/stage1."""
  shutil.copytree(tiny_chain['gan'], tmp_path / 'gan')
  shutil.copytree(tiny_chain['stage1'], tmp_path / 'stage1')
  edit_saved_config(tmp_path / 'gan', vqvae_workdir=str(tmp_path / 'stage1'))
  edit_saved_config(tmp_path / 'stage1', num_embeddings=16)
  np.testing.assert_array_equal(_draw(sampling.load(tiny_chain['gan'])), _draw(sampling.load(str(tmp_path / 'gan'))))
  pinned, _ = checkpoints.restore_raw(os.path.join(tiny_chain['gan'], 'stage1', 'checkpoints'), 'pinned')
  best, _ = checkpoints.restore_raw(os.path.join(tiny_chain['stage1'], 'best'), 'stage-1')
  for a, b in zip(jax.tree.leaves(pinned), jax.tree.leaves({'params': best['params'], 'vq': best['vq']})):
    np.testing.assert_array_equal(a, b)   # the copy is the checkpoint stage 2 was trained on


def _draw(loaded, num: int = 3, seed: int = 7):
  return sampling.generate(loaded.sample, loaded.g_variables, loaded.stage1_variables, num, loaded.config.latent_dim,
                           seed)[0]


def test_samples_are_decoded_by_the_restored_stage1(tiny_chain):
  loaded = sampling.load(tiny_chain['gan'])
  z = jax.random.normal(jax.random.key(0), (2, loaded.config.latent_dim))
  images, codes = loaded.sample(loaded.g_variables, loaded.stage1_variables, z, np.arange(2), jax.random.key(1))
  model, variables, _ = stage1.load(tiny_chain['stage1'])
  best, _ = checkpoints.restore_raw(os.path.join(tiny_chain['stage1'], 'best'), 'stage-1')
  direct = model.apply({'params': best['params'], 'vq': best['vq']}, codes, method=vqvae.VQVAE.decode_codes)
  np.testing.assert_allclose(images, np.clip(direct, 0, 1), atol=1e-6)
  assert int(codes.max()) < 32 and int(codes.min()) >= 0


@pytest.mark.parametrize('scale', [0.0, 0.5])
def test_samples_draw_codes_with_the_saved_sample_gumbel_scale(tiny_chain, tmp_path, edit_saved_config, scale):
  """A run saved with sample_gumbel_scale draws argmax(logits + scale x the Gumbel noise of its rows): at 0 the
  argmax of the generator's logits (hand-computed from its outputs); the run as trained (scale 1) draws
  argmax(logits + noise)."""
  shutil.copytree(tiny_chain['gan'], tmp_path / 'gan')
  edit_saved_config(tmp_path / 'gan', sample_gumbel_scale=scale)
  loaded = sampling.load(str(tmp_path / 'gan'))
  generator, _ = sampling.make_models(loaded.config, loaded.stage1_config)
  z, rows, key = jax.random.normal(jax.random.key(0), (4, loaded.config.latent_dim)), np.arange(4), jax.random.key(1)
  logits = np.asarray(generator.apply(loaded.g_variables, z, train=False))
  noise = np.asarray(sampling.gumbel_noise(key, rows, logits.shape[1:]))
  _, codes = loaded.sample(loaded.g_variables, loaded.stage1_variables, z, rows, key)
  np.testing.assert_array_equal(codes, np.argmax(logits + scale * noise, axis=-1))
  _, default_codes = sampling.load(tiny_chain['gan']).sample(loaded.g_variables, loaded.stage1_variables, z, rows, key)
  np.testing.assert_array_equal(default_codes, np.argmax(logits + noise, axis=-1))
  assert not np.array_equal(codes, default_codes)


def test_a_sample_does_not_depend_on_the_batch_it_is_drawn_in(tiny_chain):
  loaded = sampling.load(tiny_chain['gan'])
  draw = functools.partial(sampling.generate, loaded.sample, loaded.g_variables, loaded.stage1_variables, 5,
                           loaded.config.latent_dim, 3)
  small, small_codes = draw(batch=2)
  large, large_codes = draw(batch=8)
  np.testing.assert_array_equal(small_codes, large_codes)
  np.testing.assert_allclose(small, large, atol=1e-6)
  assert len({codes.tobytes() for codes in small_codes}) == 5   # different z and noise: different code maps


def test_evaluate_gan_prints_generation_metrics(tiny_chain, tmp_path, run_cli):
  workdir = tmp_path / 'gan'   # evaluate writes into the workdir
  shutil.copytree(tiny_chain['gan'], workdir)
  result = run_cli('-m', 'oasis_jax.evaluate', '--stage=gan', f'--workdir={workdir}', '--split=test',
                   '--c2st_images=100')
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line['split'] == 'test' and line['stage'] == 'gan' and line['images'] > 0
  assert line['sample_gumbel_scale'] == 1.0   # the tiny recipe's, as saved in the run's config
  for group in ('samples', 'reconstructions'):
    assert set(line[group]) == {'swd', 'ms_ssim', 'code_kl', 'nn_ssim', 'code_repeats'} and line[group]['swd'] > 0
    assert 0 <= line[group]['code_repeats'] <= 1
  assert 0 < line['real']['nn_ssim'] <= 1 and 0 < line['real']['ms_ssim'] < 1
  assert 'goals' not in line   # figures only: targets belong to the issue tracker, not the output
  assert line['c2st']['images_per_set'] == 100 and set(line['c2st']) == {
      'images_per_set', 'real_vs_real', 'reconstructions_vs_real', 'samples_vs_reconstructions', 'samples_vs_real',
      'std_error'}
  assert all(0 <= value <= 1 for key, value in line['c2st'].items() if key.endswith('real') or 'vs' in key)
  with open(workdir / 'eval_test.json') as f:
    assert json.load(f) == line
  wrong = run_cli('-m', 'oasis_jax.evaluate', '--stage=vqvae', f'--workdir={workdir}', check=False)
  assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1].endswith('not a vqvae run (--stage)')


@pytest.mark.parametrize('num, workdir, outdir, message', [
    (0, None, None, '--num=0: expected a positive number of samples'),
    (-3, None, None, '--num=-3: expected a positive number of samples'),
    (2, '/nonexistent/gan', None, '/nonexistent/gan: stage-2 workdir does not exist'),
    (2, None, '/proc/oasis_samples', '/proc/oasis_samples: cannot write samples there'),
])
def test_sample_bad_input_is_one_line(tiny_chain, tmp_path, num, workdir, outdir, message):
  with pytest.raises(UserError) as info:
    sampling.write_samples(workdir or tiny_chain['gan'], outdir or str(tmp_path / 'out'), num, seed=0)
  assert str(info.value).startswith(message) and '\n' not in str(info.value)


def test_cli_errors_are_one_line_without_a_traceback(tmp_path, tiny_chain, run_cli):
  sample = run_cli('sample.py', f'--workdir={tiny_chain["gan"]}', '--num=0', check=False)
  assert sample.returncode == 1 and 'Traceback' not in sample.stderr
  assert sample.stderr.strip().splitlines()[-1] == 'error: --num=0: expected a positive number of samples'
  missing = run_cli('train_gan.py', '--config=configs/gan.py:tiny', f'--workdir={tmp_path}/g',
                    '--config.vqvae_workdir=/nonexistent/stage1', check=False)
  assert missing.returncode == 1 and 'Traceback' not in missing.stderr
  assert missing.stderr.strip().splitlines()[-1] == \
      'error: /nonexistent/stage1: stage-1 workdir does not exist (config.vqvae_workdir)'


def test_train_gan_refuses_a_stage2_workdir_as_its_stage1(tmp_path, tiny_chain):
  config = gan_configs.get_config('tiny')
  config.vqvae_workdir = tiny_chain['gan']
  with pytest.raises(UserError, match='holds a gan run, expected a stage-1 \\(vqvae\\) workdir$'):
    gan_trainer.train_and_evaluate(config, str(tmp_path / 'g'))


def test_cpu_devices_trains_on_that_many_xla_cpu_devices_as_the_xla_flag_does(tiny_chain, tmp_path, run_cli):
  """config.cpu_devices=2 in a process started without XLA_FLAGS trains on 2 CPU devices, the very run the tiny
  chain made with --xla_force_host_platform_device_count=2 (the same losses, to the last printed digit)."""
  result = run_cli('train_gan.py', '--config=configs/gan.py:tiny', f'--workdir={tmp_path}/g',
                   f'--config.vqvae_workdir={tiny_chain["stage1"]}', '--config.cpu_devices=2',
                   env={name: value for name, value in os.environ.items() if name != 'XLA_FLAGS'})
  assert 'global batch 8 on 2 device(s)' in result.stdout, result.stdout
  losses = lambda log: [re.sub(r'\s+[\d.]+ steps/s.*', '', line) for line in log.splitlines() if ' train: ' in line]
  assert losses(result.stdout) == losses(tiny_chain['gan_log']) and losses(result.stdout)
