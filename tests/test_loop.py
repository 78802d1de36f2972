"""The training loop on a toy stage: SIGTERM / SIGINT save a complete checkpoint at the end of the current call and
stop, and the resumed run equals an uninterrupted one bit for bit (state, data position, logged means)."""
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from oasis_jax import checkpoints, parallel
from oasis_jax.errors import Stopped
from oasis_jax.training import loop, progress


def toy_run(workdir, signal_at=None, signal_number=signal.SIGTERM):
  """20 steps of w <- w - 0.1 * (w - batch) on batches 0, 1, 2, ... (two steps per call, log every 5 steps,
  checkpoint every 10); sends itself `signal_number` during the call that runs step `signal_at`."""
  state = train_state.TrainState.create(apply_fn=None, params={'w': jnp.zeros(3)}, tx=optax.sgd(0.1))
  iterator = iter(grain.MapDataset.range(1000).map(lambda i: np.full((jax.local_device_count(), 3), i, np.float32))
                  .to_iter_dataset())

  def step(state, batch):
    grads = {'w': state.params['w'] - batch}
    loss = jnp.sum(grads['w'] ** 2)
    return state.apply_gradients(grads=grads), {'loss': loss, 'count': jnp.int32(1)}
  p_step = jax.pmap(step, axis_name=parallel.AXIS)

  def run_steps(p_state, first, last):
    outputs = []
    for number in range(first, last + 1):
      p_state, step_metrics = p_step(p_state, next(iterator))
      outputs.append(step_metrics)
      if number == signal_at:
        os.kill(os.getpid(), signal_number)
    return p_state, jax.tree.map(lambda *v: jnp.stack(v, axis=1), *outputs)

  def evaluate(step, p_state):
    return loop.Evaluation({'w0': float(parallel.unreplicate(p_state).params['w'][0])}, {'w0': 0.0},
                           np.zeros((4, 4), np.uint8), 'picture', f'picture_{step}.png')
  return loop.train('toy', str(workdir), state, iterator, 20, loop.Cadence(5, 20, 10, steps_per_call=2), 'w0',
                    run_steps, evaluate)


# Calls (2 steps at most, ending at steps 5, 10, 15, 20): 1-2, 3-4, 5, 6-7, 8-9, 10, 11-12, 13-14, 15, ...
@pytest.mark.parametrize('signal_number, signal_at, stop_step', [(signal.SIGTERM, 7, 7), (signal.SIGINT, 13, 14)])
def test_a_signal_saves_stops_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, signal_number, signal_at,
                                                                              stop_step):
  toy_run(tmp_path / 'whole')
  with pytest.raises(Stopped) as info:
    toy_run(tmp_path / 'stopped', signal_at=signal_at, signal_number=signal_number)
  name = signal.Signals(signal_number).name
  assert info.value.signal_number == signal_number and str(info.value) == (
      f'[toy] stopped by {name} at step {stop_step}: a complete checkpoint is saved in {tmp_path / "stopped"}; '
      'run the same command to resume')
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is not None
  saved = sorted(int(n) for n in os.listdir(tmp_path / 'stopped' / 'checkpoints') if n.isdigit())
  assert saved[-1] == stop_step        # the end of the call the signal came in, not a periodic checkpoint
  toy_run(tmp_path / 'stopped')        # resumes and finishes
  a, _ = checkpoints.restore_raw(str(tmp_path / 'whole' / 'checkpoints'), 'toy')
  b, _ = checkpoints.restore_raw(str(tmp_path / 'stopped' / 'checkpoints'), 'toy')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The means logged after the stop cover the same steps as the uninterrupted run's (the unlogged metrics of steps
  # 6-7 / 11-14 travel in the checkpoint).
  assert progress.read_jsonl(str(tmp_path / 'stopped')) == progress.read_jsonl(str(tmp_path / 'whole'))
