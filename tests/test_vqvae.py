"""Stage 1: the EMA quantiser against NumPy, straight-through gradients, pmap equivalence, checkpoints, the CLI."""
import functools
import json
import os
import shutil
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vqvae as vqvae_configs
from oasis_jax import checkpoints, metrics, parallel, stage1, timing
from oasis_jax.data import input_pipeline, tfds_oasis
from oasis_jax.errors import UserError
from oasis_jax.models import vqvae
from oasis_jax.training import loop, progress, vqvae_trainer


def numpy_ema_update(state, counts, sums, decay, epsilon):
  """Sonnet's VectorQuantizerEMA update, written out in float64."""
  steps = state['ema_steps'] + 1
  hidden_counts = decay * state['ema_counts'] + (1 - decay) * counts
  hidden_sums = decay * state['ema_sums'] + (1 - decay) * sums
  n = hidden_counts / (1 - decay ** steps)
  m = hidden_sums / (1 - decay ** steps)
  smoothed = (n + epsilon) / (n.sum() + len(n) * epsilon) * n.sum()
  return m / smoothed[:, None], hidden_counts, hidden_sums


def test_ema_update_equals_its_formula():
  rng = np.random.default_rng(0)
  k, d = 16, 4
  state = {'codebook': rng.normal(size=(k, d)), 'ema_counts': rng.uniform(0, 5, k), 'ema_sums': rng.normal(size=(k, d)),
           'ema_steps': np.int32(3)}
  counts = rng.integers(0, 6, k).astype(np.float64)
  counts[2] = 0
  sums = rng.normal(size=(k, d))
  new = vqvae.ema_update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state), jnp.asarray(counts, jnp.float32),
                         jnp.asarray(sums, jnp.float32), 0.99, 1e-5)
  codebook, hidden_counts, hidden_sums = numpy_ema_update(state, counts, sums, 0.99, 1e-5)
  np.testing.assert_allclose(new['codebook'], codebook, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(new['ema_counts'], hidden_counts, rtol=1e-5)
  np.testing.assert_allclose(new['ema_sums'], hidden_sums, rtol=1e-5, atol=1e-6)
  assert int(new['ema_steps']) == 4


def test_first_ema_step_is_debiased_to_the_batch_means():
  k, d = 4, 2
  state = {'codebook': jnp.zeros((k, d)), 'ema_counts': jnp.zeros(k), 'ema_sums': jnp.zeros((k, d)),
           'ema_steps': jnp.int32(0)}
  vectors = jnp.array([[1., 2.], [3., 4.], [10., 10.]])
  counts, sums = vqvae.code_statistics(jnp.array([0, 0, 3]), vectors, k)
  new = vqvae.ema_update(state, counts, sums, 0.99, 1e-8)
  np.testing.assert_allclose(new['codebook'][0], [2., 3.], rtol=1e-4)   # mean of the vectors given to code 0
  np.testing.assert_allclose(new['codebook'][3], [10., 10.], rtol=1e-4)
  np.testing.assert_allclose(vqvae.usage_counts(new, 0.99), [2, 0, 0, 1], atol=1e-4)


def test_nearest_codes_is_the_argmin_of_squared_distance():
  rng = np.random.default_rng(1)
  vectors, codebook = rng.normal(size=(200, 8)), rng.normal(size=(32, 8))
  expected = np.argmin(((vectors[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(vqvae.nearest_codes(jnp.asarray(vectors, jnp.float32), jnp.asarray(codebook, jnp.float32)),
                                expected)


def test_code_statistics_are_per_code_counts_and_sums():
  rng = np.random.default_rng(2)
  codes, vectors = rng.integers(0, 6, size=300), rng.normal(size=(300, 3)).astype(np.float32)
  counts, sums = vqvae.code_statistics(jnp.asarray(codes), jnp.asarray(vectors), 8)
  np.testing.assert_array_equal(counts, np.bincount(codes, minlength=8))
  np.testing.assert_allclose(sums, [vectors[codes == k].sum(0) if k < 6 else np.zeros(3) for k in range(8)],
                             rtol=1e-5, atol=1e-5)


def test_straight_through_passes_the_decoder_gradient_to_the_encoder():
  rng = np.random.default_rng(2)
  z, q = jnp.asarray(rng.normal(size=(3, 5))), jnp.asarray(rng.normal(size=(3, 5)))
  loss = lambda x: jnp.sum(jnp.sin(x) * x)
  value, grad_z = jax.value_and_grad(lambda z: loss(vqvae.straight_through(z, q)))(z)
  np.testing.assert_allclose(value, loss(q), rtol=1e-6)                      # forward: the codes
  np.testing.assert_allclose(grad_z, jax.grad(loss)(q), rtol=1e-6)           # backward: d loss / d q, copied to z


def test_dead_codes_take_candidates_and_the_uniform_share():
  state = {'codebook': jnp.ones((4, 2)), 'ema_counts': jnp.array([10., 10., 0.01, 10.]), 'ema_sums': jnp.ones((4, 2)),
           'ema_steps': jnp.int32(1000)}
  candidates = jnp.arange(8.).reshape(4, 2)
  new, restarted = vqvae.restart_dead_codes(state, candidates, 0.99, 0.03)
  assert int(restarted) == 1
  np.testing.assert_allclose(new['codebook'][2], [4., 5.])
  np.testing.assert_allclose(new['codebook'][0], [1., 1.])
  share = (30.01 / 4) / (1 - 0.99 ** 1000) * (1 - 0.99 ** 1000)
  np.testing.assert_allclose(new['ema_counts'][2], share, rtol=1e-5)
  np.testing.assert_allclose(new['ema_sums'][2] / new['ema_counts'][2], [4., 5.], rtol=1e-5)


def test_model_shapes_and_upsample_kinds():
  config = vqvae_configs.get_config('tiny')
  for kind in vqvae.UPSAMPLE_KINDS:
    config.upsample = kind
    model = stage1.model_from_config(config)
    x = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)    # shapes and dtypes only: nothing to compute
    reconstruction, z, quantized, codes = jax.eval_shape(model.apply, variables, x)
    assert reconstruction.shape == x.shape and z.shape == (2, 16, 16, 8) == quantized.shape
    assert codes.shape == (2, 16, 16) and codes.dtype == jnp.int32
  depth = vqvae.depth_to_space(jnp.arange(16.).reshape(1, 1, 1, 16))
  np.testing.assert_array_equal(depth[0, :, :, 0], [[0, 4], [8, 12]])  # channels (dy, dx, c) -> pixel (dy, dx)


def test_resize_upsample_against_numpy():
  """'resize': each pixel repeated 2x2, then a 3x3 convolution with zero padding, as loops over the taps in NumPy."""
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
  layer = vqvae.Upsample(6, 'resize')
  variables = layer.init(jax.random.key(0), x)
  kernel, bias = (np.asarray(variables['params']['Conv_0'][name]) for name in ('kernel', 'bias'))
  up = np.pad(x.repeat(2, axis=1).repeat(2, axis=2), ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros((2, 6, 8, 6)) + bias
  for dy in range(3):
    for dx in range(3):
      expected += np.einsum('nhwc,cf->nhwf', up[:, dy:dy + 6, dx:dx + 8].astype(np.float64), kernel[dy, dx])
  np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_convolution_forms_give_the_same_model(tiny_batch):
  """One set of parameters, three ways of computing the convolutions: same reconstructions and codes."""
  config = vqvae_configs.get_config('tiny')
  config.num_hiddens, config.num_residual_hiddens = 32, 16    # wide enough that 'auto' takes Winograd layers
  x = jnp.asarray(tiny_batch).reshape(-1, 64, 64, 1)[:4]
  outputs = {}
  for impl in ('xla', 'im2col', 'winograd', 'auto'):
    config.conv_impl = impl
    model = stage1.model_from_config(config)
    variables = model.init(jax.random.key(0), x) if impl == 'xla' else variables
    outputs[impl] = model.apply(variables, x)
  for impl in ('im2col', 'winograd', 'auto'):
    np.testing.assert_allclose(outputs[impl][0], outputs['xla'][0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(outputs[impl][1], outputs['xla'][1], rtol=0, atol=1e-4)
    assert np.mean(np.asarray(outputs[impl][3]) == np.asarray(outputs['xla'][3])) > 0.99


@pytest.fixture(scope='module')
def tiny_batch(cache_dir):
  source = tfds_oasis.prepare('demo', cache_dir=cache_dir).as_data_source('train')
  return input_pipeline.train_dataset(source, input_pipeline.Sharding(8, local_devices=1, image_size=64), seed=0)[0][0]


@pytest.mark.parametrize('conv_impl, clip_margin, ssim_weight', [('xla', 0.0, 0.0), ('winograd', 0.0, 0.0),
                                                                 ('xla', 0.05, 0.5)])
def test_two_device_step_equals_one_device_step(tiny_batch, conv_impl, clip_margin, ssim_weight):
  assert jax.local_device_count() == 2
  config = vqvae_configs.get_config('tiny')
  config.conv_impl, config.clip_margin, config.ssim_weight = conv_impl, clip_margin, ssim_weight
  state = jax.device_get(vqvae_trainer.create_state(config, jax.random.key(0)))
  if clip_margin:   # the output's bias at -0.52: black pixels come out near -0.02, inside the margin
    params = jax.tree.map(np.array, state.params)
    params['decoder']['Upsample_1']['Conv_0']['bias'][:] = -0.52
    state = state.replace(params=params)
  step = functools.partial(vqvae_trainer.train_step, config=config, data_variance=0.08)
  key = jax.random.key(7)
  results = []
  for devices in (jax.local_devices()[:1], jax.local_devices()[:2]):
    p_step = jax.pmap(step, axis_name=parallel.AXIS, in_axes=(0, 0, None), devices=devices)
    replicated = jax.tree.map(lambda x: np.broadcast_to(x, (len(devices),) + np.shape(x)), state)
    new_state, step_metrics = p_step(replicated, tiny_batch.reshape((len(devices), -1) + tiny_batch.shape[1:]), key)
    new_state = jax.device_get(new_state)
    if len(devices) == 2:  # every replica holds the same parameters and codebook
      for leaf in jax.tree.leaves((new_state.params, new_state.vq)):
        np.testing.assert_array_equal(leaf[0], leaf[1])
    results.append((jax.tree.map(lambda x: x[0], (new_state.params, new_state.vq)), jax.device_get(step_metrics)))
  (one, one_metrics), (two, two_metrics) = results
  assert int(one_metrics['restarted'][0]) > 0  # the dead-code restart is part of what is compared
  # Winograd's rounding (~1e-6 relative, and it depends on the per-device batch through GEMM blocking) is magnified
  # by Adam's first step, g / (|g| + eps), on near-zero gradients: a few of 4608 weights moved 1e-4 apart.
  tolerance = 1e-5 if conv_impl == 'xla' else 3e-4
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, atol=tolerance, rtol=1e-5)
  np.testing.assert_allclose(one_metrics['loss'][0], two_metrics['loss'][0], rtol=1e-5)
  if clip_margin:   # the margin is in play: it forgives black pixels of this state's reconstructions
    reconstruction = state.apply_fn({'params': state.params, vqvae.VQ: state.vq}, tiny_batch)[0]
    forgiven = vqvae_trainer.reconstruction_error(reconstruction, tiny_batch, clip_margin) == 0
    assert 0.1 < float(jnp.mean(forgiven & (tiny_batch == 0)))


@pytest.mark.parametrize('devices', [1, 2])
def test_decoder_step_moves_the_decoder_as_the_joint_step_and_nothing_else(tiny_batch, devices):
  """A decoder-phase step (config.decoder_steps) differentiates the same loss for the decoder alone: from the same
  state its decoder update is the joint step's (Adam is per parameter), on one device or two; the encoder's
  parameters and the codebook state stay as they were, to the bit."""
  config = vqvae_configs.get_config('tiny')
  config.decoder_steps = 5
  state = jax.device_get(vqvae_trainer.create_state(config, jax.random.key(0)))
  key = jax.random.key(7)

  def run(decoder_only, count):
    p_step = jax.pmap(functools.partial(vqvae_trainer.train_step, config=config, data_variance=0.08,
                                        decoder_only=decoder_only),
                      axis_name=parallel.AXIS, in_axes=(0, 0, None), devices=jax.local_devices()[:count])
    replicated = jax.tree.map(lambda x: np.broadcast_to(x, (count,) + np.shape(x)), state)
    new_state, step_metrics = p_step(replicated, tiny_batch.reshape((count, -1) + tiny_batch.shape[1:]), key)
    return jax.tree.map(lambda x: x[0], jax.device_get(new_state)), jax.device_get(step_metrics)

  joint, joint_metrics = run(False, 1)
  decoder, decoder_metrics = run(True, devices)
  assert int(joint_metrics['restarted'][0]) > 0   # the joint step changed the codebook; the decoder step must not
  for a, b in zip(jax.tree.leaves((state.vq, state.params['encoder'])),
                  jax.tree.leaves((decoder.vq, decoder.params['encoder']))):
    np.testing.assert_array_equal(a, b)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(state.params['decoder']),
                                                jax.tree.leaves(decoder.params['decoder']))]
  assert min(moved) > 0
  for a, b in zip(jax.tree.leaves(joint.params['decoder']), jax.tree.leaves(decoder.params['decoder'])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(decoder_metrics['loss'][0], joint_metrics['loss'][0], rtol=1e-5)
  assert int(decoder.step) == int(joint.step) == 1


def test_decoder_phase_has_its_own_schedule():
  """The rate: the joint steps' schedule, then the decoder phase's own warm-up and cosine at
  config.decoder_learning_rate (values by hand: warm-up over 2 % of each phase's steps), after a constant rate too."""
  config = vqvae_configs.get_config('tiny')
  config.update(lr_schedule='cosine', learning_rate=1e-3, decoder_steps=100, decoder_learning_rate=4e-3)
  rates = vqvae_trainer.schedule(config, joint_steps=200)
  np.testing.assert_allclose([rates(0), rates(2), rates(4), rates(200), rates(201), rates(202), rates(251)],
                             [0.0, 0.5e-3, 1e-3, 0.0, 2e-3, 4e-3, 4e-3 * (0.01 + 0.99 * 0.5)], rtol=1e-5, atol=1e-9)
  config.lr_schedule = 'constant'
  rates = vqvae_trainer.schedule(config, joint_steps=200)
  np.testing.assert_allclose([rates(0), rates(199), rates(200), rates(202), rates(300)], [1e-3, 1e-3, 0.0, 4e-3, 4e-5],
                             rtol=1e-4, atol=1e-9)
  config.decoder_steps = 0
  assert vqvae_trainer.schedule(config, joint_steps=200) == 1e-3


def test_decoder_phase_hands_stage_2_the_codes_of_the_run_without_it(tmp_path, cache_dir):
  """A run with config.decoder_steps ends with the encoder and codebook of the same run without the phase (its best
  checkpoint, what stage 2 would take), to the bit, so stage 2 learns the same code maps; the reconstructions improve.
  The joint steps end at step 12, inside a call of 5 steps and between evaluations (calls end where the phase begins,
  and the loop evaluates there, as the run without the phase does at its last step)."""
  config = vqvae_configs.get_config('tiny')
  config.update(cache_dir=cache_dir, num_train_steps=12, eval_every_steps=5, checkpoint_every_steps=10,
                log_every_steps=10)
  without = vqvae_trainer.train_and_evaluate(config, str(tmp_path / 'without'))
  config.decoder_steps = 12
  with_phase = vqvae_trainer.train_and_evaluate(config, str(tmp_path / 'with'))
  _, joint, _ = stage1.load(str(tmp_path / 'without'))
  _, end, _ = stage1.load(str(tmp_path / 'with'))
  for a, b in zip(jax.tree.leaves((joint['vq'], joint['params']['encoder'])),
                  jax.tree.leaves((end['vq'], end['params']['encoder']))):
    np.testing.assert_array_equal(a, b)
  assert with_phase['psnr'] > without['psnr'] + 0.5, (with_phase, without)
  validated = [json.loads(line)['step'] for line in open(tmp_path / 'with' / 'metrics.jsonl') if '"validate"' in line]
  assert validated == [5, 10, 12, 15, 20, 24]


def test_decoder_phase_starts_from_the_best_checkpoints_codes_with_fresh_moments(tmp_path):
  """decoder_phase_start: the encoder and codebook of WORKDIR/best/, the live decoder and step count, Adam's moments
  and bias-correction count afresh while the learning-rate schedule's count goes on; without a best checkpoint, the
  live state with fresh moments."""
  config = vqvae_configs.get_config('tiny')
  config.update(lr_schedule='cosine', decoder_steps=10)
  live = jax.device_get(vqvae_trainer.create_state(config, jax.random.key(0)))
  grads = jax.tree.map(lambda x: np.full_like(x, 0.01), live.params)
  for _ in range(3):   # Adam moments and counts that are not fresh
    live = live.apply_gradients(grads=grads)
  live = jax.device_get(live)
  best = jax.device_get(vqvae_trainer.create_state(config, jax.random.key(1)))
  workdir = str(tmp_path)
  store = checkpoints.Checkpoints(workdir, best_metric='psnr')
  store.save(2, best.replace(step=2), {'position': 0}, {'psnr': 20.0})
  store.close()
  started = parallel.unreplicate(vqvae_trainer.decoder_phase_start(parallel.replicate(live), workdir))
  assert int(started.step) == 3
  for expected, got in [((best.params['encoder'], best.vq), (started.params['encoder'], started.vq)),
                        (live.params['decoder'], started.params['decoder'])]:
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(live.params['encoder']['Conv_0']['kernel'], best.params['encoder']['Conv_0']['kernel'])
  adam, scheduled = started.opt_state
  assert int(adam.count) == 0 and int(scheduled.count) == 3 == int(live.opt_state[1].count)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves((adam.mu, adam.nu)))
  assert any(np.any(leaf) for leaf in jax.tree.leaves(live.opt_state[0].mu))
  alone = parallel.unreplicate(vqvae_trainer.decoder_phase_start(parallel.replicate(live), str(tmp_path / 'none')))
  np.testing.assert_array_equal(alone.params['encoder']['Conv_0']['kernel'],
                                live.params['encoder']['Conv_0']['kernel'])
  assert int(alone.opt_state[0].count) == 0


def test_steps_per_call_equal_single_steps(tiny_batch):
  """train_steps (several steps unrolled in one call) gives the state and per-step metrics of as many train_step
  calls, up to float rounding (XLA fuses the unrolled steps differently)."""
  config = vqvae_configs.get_config('tiny')
  state = jax.tree.map(lambda x: np.asarray(x)[None], jax.device_get(vqvae_trainer.create_state(config,
                                                                                               jax.random.key(0))))
  keys = jnp.stack([jax.random.key(i) for i in range(3)])
  batches = np.stack([tiny_batch, tiny_batch[::-1], tiny_batch ** 2])
  one = jax.pmap(functools.partial(vqvae_trainer.train_step, config=config, data_variance=0.08),
                 axis_name=parallel.AXIS, in_axes=(0, 0, None), devices=jax.local_devices()[:1])
  many = jax.pmap(functools.partial(vqvae_trainer.train_steps, config=config, data_variance=0.08),
                  axis_name=parallel.AXIS, in_axes=(0, 0, None), devices=jax.local_devices()[:1])
  single, losses = state, []
  for batch, key in zip(batches, keys):
    single, step_metrics = one(single, batch[None], key)
    losses.append(float(step_metrics['loss'][0]))
  unrolled, stacked = many(state, batches[None], keys)
  assert int(unrolled.step[0]) == 3 and stacked['loss'].shape == (1, 3)
  np.testing.assert_allclose(stacked['loss'][0], losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((single.params, single.vq, single.opt_state)),
                  jax.tree.leaves((unrolled.params, unrolled.vq, unrolled.opt_state))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_train_steps_trace_the_step_once_for_all_steps_of_a_call():
  """The unrolled steps of a call share one traced train_step (a nested jit): tracing and lowering the seed's 5-step
  call took 10.8 s when each step was traced anew, 2.9 s now."""
  config = vqvae_configs.get_config('tiny')
  state = vqvae_trainer.create_state(config, jax.random.key(0))
  keys = jnp.stack([jax.random.key(i) for i in range(3)])
  batches = np.zeros((3, 4, config.image_size, config.image_size, 1), np.float32)
  jaxpr = jax.make_jaxpr(functools.partial(vqvae_trainer.train_steps, config=config, data_variance=0.08),
                         axis_env=[(parallel.AXIS, 1)])(state, batches, keys)
  calls = [eqn for eqn in jaxpr.eqns if 'jaxpr' in eqn.params]
  assert [eqn.params['name'] for eqn in calls] == ['train_step'] * 3
  assert all(eqn.params['jaxpr'] is calls[0].params['jaxpr'] for eqn in calls)


def test_replicated_trees_feed_a_pmapped_step_that_compiles_once():
  """parallel.replicate places arrays as pmap places its outputs, so feeding a step's output back in (as the
  training loops do) reuses the first call's program; numpy replicas made the second call trace and compile again."""
  traces = []

  def step(tree):
    traces.append(1)
    return jax.tree.map(lambda x: x + 1, tree)
  p_step = jax.pmap(step, axis_name=parallel.AXIS, donate_argnums=(0,))
  tree = parallel.replicate({'w': np.zeros((3, 2), np.float32), 'step': np.int32(0)})
  for _ in range(3):
    tree = p_step(tree)
  assert len(traces) == 1
  np.testing.assert_array_equal(tree['step'], [3] * jax.local_device_count())
  np.testing.assert_array_equal(parallel.unreplicate(tree)['w'], np.full((3, 2), 3.0))


def test_steps_in_call_end_at_logs_evaluations_checkpoints_and_the_last_step():
  config = vqvae_configs.get_config('tiny')
  config.steps_per_call, config.log_every_steps = 4, 6
  config.eval_every_steps, config.checkpoint_every_steps = 100, 9
  cadence = loop.Cadence(config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps,
                         config.steps_per_call)
  calls, step = [], 0
  while step < 14:
    count = cadence.steps_in_call(step + 1, 14)
    calls.append(count)
    step += count
  assert calls == [4, 2, 3, 3, 2]   # steps 1-4, 5-6 (log), 7-9 (save), 10-12 (log), 13-14 (end)
  assert loop.Cadence(6, 100, 9, 1).steps_in_call(1, 14) == 1
  assert loop.Cadence(6, 100, 9, 4, ends=(11,)).steps_in_call(10, 14) == 2   # steps 10-11: a phase ends at 11


def test_bfloat16_compute_keeps_float32_state_and_tracks_the_float32_step(tiny_batch):
  """config.dtype=bfloat16: convolutions run in bf16, parameters/optimiser/codebook stay fp32, and a few steps
  follow the fp32 run closely (same initial state, same batches)."""
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = vqvae_configs.get_config('tiny')
    config.dtype = dtype
    state = parallel.replicate(vqvae_trainer.create_state(config, jax.random.key(0)))
    step = jax.pmap(functools.partial(vqvae_trainer.train_step, config=config, data_variance=0.08),
                    axis_name=parallel.AXIS, in_axes=(0, 0, None), devices=jax.local_devices()[:1])
    state = jax.tree.map(lambda x: x[:1], state)
    curve = []
    for i in range(5):
      state, step_metrics = step(state, tiny_batch[None], jax.random.key(i))
      curve.append(float(step_metrics['loss'][0]))
    losses[dtype] = np.asarray(curve)
    floats = [leaf for leaf in jax.tree.leaves((state.params, state.opt_state, state.vq))
              if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert len(floats) > 10 and all(leaf.dtype == jnp.float32 for leaf in floats)
    if dtype == 'bfloat16':
      model = stage1.model_from_config(config)
      reconstruction, z, _, _ = model.apply({'params': jax.tree.map(lambda x: x[0], state.params),
                                             'vq': jax.tree.map(lambda x: x[0], state.vq)}, tiny_batch)
      assert z.dtype == jnp.float32 and reconstruction.dtype == jnp.float32   # cast back at the boundaries
  assert np.all(np.isfinite(losses['bfloat16'])) and losses['bfloat16'][-1] < losses['bfloat16'][0]
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=0.05)


def test_clip_margin_forgives_only_what_clipping_renders_exactly():
  batch = jnp.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0])
  reconstruction = jnp.array([-0.03, -0.2, 0.1, 0.0, -0.1, 0.7, 1.04, 1.3, 0.9])
  np.testing.assert_allclose(vqvae_trainer.reconstruction_error(reconstruction, batch),
                             [-0.03, -0.2, 0.1, 0.0, -0.6, 0.2, 0.04, 0.3, -0.1], atol=1e-6)
  # Black: free down to -0.05, then the excess; grey pixels keep their whole error, even below 0; white: free up
  # to 1.05.
  np.testing.assert_allclose(vqvae_trainer.reconstruction_error(reconstruction, batch, clip_margin=0.05),
                             [0.0, -0.15, 0.1, 0.0, -0.6, 0.2, 0.0, 0.25, -0.1], atol=1e-6)


def test_ssim_term_adds_its_weight_times_one_minus_the_ssim_of_the_rendered_reconstruction(tiny_batch):
  config = vqvae_configs.get_config('tiny')
  config.clip_margin = 0.05
  # A reconstruction that is blurred, off by a haze and partly outside [0, 1] (the SSIM term sees it clipped).
  blurred = (tiny_batch + np.roll(tiny_batch, 1, axis=1) + np.roll(tiny_batch, 1, axis=2)) / 3
  reconstruction = jnp.asarray(1.2 * blurred - 0.04, jnp.float32)
  mse_only = vqvae_trainer.image_loss(reconstruction, tiny_batch, config, data_variance=0.08)
  error = vqvae_trainer.reconstruction_error(reconstruction, tiny_batch, 0.05)
  np.testing.assert_allclose(mse_only, np.mean(np.asarray(error) ** 2) / 0.08, rtol=1e-5)
  config.ssim_weight = 0.5
  with_ssim = vqvae_trainer.image_loss(reconstruction, tiny_batch, config, data_variance=0.08)
  reference_ssim = np.mean(metrics.ssim(reconstruction, tiny_batch))   # dm-pix's SSIM (depthwise convolutions)
  assert 0.5 < reference_ssim < 0.99
  np.testing.assert_allclose(with_ssim, mse_only + 0.5 * (1 - reference_ssim), rtol=1e-5)


def test_learning_rate_schedules():
  config = vqvae_configs.get_config('tiny')
  assert vqvae_trainer.learning_rate(config, 1000) == config.learning_rate == 3e-3
  config.lr_schedule = 'cosine'
  schedule = vqvae_trainer.learning_rate(config, 1000)   # warm-up 20 steps, then cosine to 1 % at step 1000
  np.testing.assert_allclose([schedule(0), schedule(10), schedule(20), schedule(510), schedule(1000)],
                             [0.0, 1.5e-3, 3e-3, 0.5 * (3e-3 + 3e-5), 3e-5], rtol=1e-3, atol=1e-9)


def test_checkpoint_restore_equals_save(tmp_path):
  config = vqvae_configs.get_config('tiny')
  state = jax.device_get(vqvae_trainer.create_state(config, jax.random.key(3)))
  state = state.replace(step=np.int32(5))
  store = checkpoints.Checkpoints(str(tmp_path), best_metric='ssim')
  store.save(5, state, {'next_index': 5}, {'ssim': 0.5})
  store.close()
  abstract = jax.eval_shape(lambda: vqvae_trainer.create_state(config, jax.random.key(4)))   # the restore target
  restored, data_state = checkpoints.Checkpoints(str(tmp_path), best_metric='ssim').restore_latest(abstract)
  assert data_state == {'next_index': 5} and int(restored.step) == 5
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)


def train_losses(workdir) -> dict:
  """{step: mean train loss since the previous report} from WORKDIR/metrics.jsonl."""
  return {step: record['loss'] for step, record in sorted(progress.read_jsonl(workdir).items())}


def test_tiny_training_lowers_the_loss(tiny_chain):
  losses = train_losses(tiny_chain['stage1'])
  assert list(losses) == [10, 15, 20, 30] and losses[30] < 0.6 * losses[10]   # reports at 10, 15 (evaluation), 20, 30


def test_a_run_records_where_its_time_went(tiny_chain):
  record = timing.latest(tiny_chain['stage1'])['train_vqvae']
  phases = record['phases']
  assert sorted(phases) == ['checkpoint', 'compile', 'data', 'evaluate', 'setup', 'train']
  assert all(seconds >= 0 for seconds in phases.values()) and sum(phases.values()) <= record['total'] + 0.05
  assert phases['compile'] > phases['train']   # tiny steps: compiling them costs more than running 29 more
  table = timing.table([tiny_chain['stage1']]).splitlines()
  assert table[1].startswith('stage1: train_vqvae') and table[-1].split()[-1] == f'{record["total"]:.1f}'


def test_evaluate_prints_one_json_line_and_writes_files(tiny_chain, tmp_path, run_cli):
  workdir = tmp_path / 'stage1'   # evaluate writes into the workdir
  shutil.copytree(tiny_chain['stage1'], workdir)
  result = run_cli('-m', 'oasis_jax.evaluate', f'--workdir={workdir}', '--split=test', '--c2st_images=100')
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line['split'] == 'test' and line['images'] == 17
  assert 0 < line['ssim'] < 1 and 5 < line['psnr'] < 60 and 1 <= line['perplexity'] <= line['codes_used'] <= 32
  assert line['c2st']['images_per_set'] == 100 and line['c2st']['reconstructions_vs_real'] > 0.9   # tiny: blurry
  with open(workdir / 'eval_test.json') as f:
    assert json.load(f) == line
  assert os.path.getsize(workdir / 'images' / 'eval_test.png') > 1000


def test_load_stage1_gives_the_trained_model(tiny_chain):
  model, variables, config = stage1.load(tiny_chain['stage1'])
  assert config.num_embeddings == 32
  best, _ = checkpoints.restore_raw(os.path.join(tiny_chain['stage1'], 'best'), 'stage-1')
  np.testing.assert_array_equal(variables['vq']['codebook'], best['vq']['codebook'])
  codes = jnp.zeros((1, 16, 16), jnp.int32)
  decoded = model.apply(variables, codes, method=vqvae.VQVAE.decode_codes)
  assert decoded.shape == (1, 64, 64, 1) and np.isfinite(decoded).all()


@pytest.mark.parametrize('overrides, message', [
    ({'dataset': 'oasis_png', 'data_dir': '/nonexistent/oasis'},
     '/nonexistent/oasis: config.data_dir does not exist or is not a directory'),
    ({'num_embeddings': 1}, 'config.num_embeddings=1: expected at least 2 codes'),
    ({'clip_margin': -0.1}, 'config.clip_margin=-0.1: expected a value in [0, 1]'),
    ({'ssim_weight': -1.0}, 'config.ssim_weight=-1.0: expected a number >= 0'),
    ({'lr_schedule': 'linear'}, "config.lr_schedule='linear': expected constant or cosine"),
    ({'upsample': 'bilinear'}, "config.upsample='bilinear': expected one of subpixel, transpose, resize"),
    ({'dtype': 'float16'}, "config.dtype='float16': expected float32 or bfloat16"),
    ({'batch_size': -4}, 'config.batch_size=-4: expected a positive multiple of the device count 2'),
    ({'batch_size': 5}, 'config.batch_size=5: expected a positive multiple of the device count 2'),
])
def test_bad_config_is_one_line(tmp_path, overrides, message):
  config = vqvae_configs.get_config('tiny')
  config.update(overrides)
  with pytest.raises(UserError) as info:
    vqvae_trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(info.value) == message
