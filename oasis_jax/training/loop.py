"""The training loop both stages share: resume from the latest checkpoint, run pmapped calls of train steps, log,
evaluate and checkpoint on a cadence, stop on a non-finite metric, save and stop on SIGTERM or SIGINT (a preempted
cloud VM's notice, Ctrl-C), and close the checkpoint store and logs however the run ends.

A stage supplies its initial state, a checkpointable data iterator, `run_steps` (one compiled call over a range of
steps) and `evaluate`; `train` does the rest.
"""
import contextlib
import dataclasses
import signal
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from oasis_jax import checkpoints, images, parallel, timing
from oasis_jax.errors import Stopped, UserError
from oasis_jax.training import progress


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Every how many steps the loop logs, evaluates and checkpoints; how many steps one compiled call may run; the
  steps at which a call must end besides (`ends`: where a stage's training changes phase; the loop evaluates and
  checkpoints there too, so that the best checkpoint of a phase can be its last step)."""
  log_every: int
  eval_every: int
  checkpoint_every: int
  steps_per_call: int = 1
  ends: tuple[int, ...] = ()

  def steps_in_call(self, first: int, total_steps: int) -> int:
    """How many steps the call starting at step `first` runs: up to steps_per_call, ending at the first step that
    logs, evaluates, checkpoints, ends a phase or ends the run (so a killed run resumes at a call boundary of the
    uninterrupted one)."""
    for count in range(1, self.steps_per_call):
      last = first + count - 1
      if last == total_steps or last in self.ends or any(
          last % every == 0 for every in (self.log_every, self.eval_every, self.checkpoint_every)):
        return count
    return min(self.steps_per_call, total_steps - first + 1)


PENDING_METRICS = 'oasis_jax_pending_metrics'   # in a checkpoint taken between reports: the metrics not yet logged


class Evaluation(NamedTuple):
  """What a stage's `evaluate(step, p_state)` returns."""
  metrics: dict            # logged with the prefix 'validate'
  best: dict               # offered to WORKDIR/best/ ({best_metric: value}, higher is better)
  picture: np.ndarray      # a uint8 image grid, for TensorBoard and WORKDIR/images/
  picture_tag: str         # its TensorBoard tag
  picture_file: str        # its file name under WORKDIR/images/


class StopSignals:
  """While active, SIGTERM and SIGINT only set a flag; `requested(step)` says whether to save and stop after that
  step. Several processes agree on the step through JAX's preemption service (it handles SIGTERM itself)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None

  @contextlib.contextmanager
  def active(self):
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = {number: signal.signal(number, self._receive) for number in self.SIGNALS}
    try:
      yield self
    finally:
      for number, handler in previous.items():
        signal.signal(number, handler)

  def _receive(self, number, frame):
    del frame
    self.received = number

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = signal.SIGTERM
    return self.received is not None


def train(name: str, workdir: str, state: Any, iterator, total_steps: int, cadence: Cadence, best_metric: str,
          run_steps: Callable, evaluate: Callable[[int, Any], Evaluation], describe: str = '',
          phases: timing.Phases | None = None) -> tuple[dict, dict]:
  """Trains from `state` (or the latest checkpoint in workdir) to `total_steps`.

  Args:
    name: the stage's name, prefixed to every printed line.
    state: the initial host state; its structure is the target a checkpoint restores into.
    iterator: a checkpointable data iterator (get_state / set_state), saved with every checkpoint.
    run_steps: (replicated state, first step, last step) -> (replicated state, metrics of those steps).
    evaluate: (step, replicated state) -> Evaluation.
    describe: a line printed once the state is restored.
    phases: where the wall time of setup, compile, train, evaluate and checkpoint is added up.
  Returns: (the last train-metrics summary, the last evaluation's metrics).
  """
  phases = phases or timing.Phases()
  store = checkpoints.Checkpoints(workdir, best_metric=best_metric)
  log = None
  stack = contextlib.ExitStack()
  failed = True
  try:
    history = progress.History()
    with phases('setup'):
      restored = store.restore_latest(jax.device_get(state))
      if restored is not None:
        state, data_state = restored
        history.set_state(data_state.pop(PENDING_METRICS, []))
        iterator.set_state(data_state)
        print(f'[{name}] resuming {workdir} from step {_step(state)}', flush=True)
      step = _step(state)
      p_state = parallel.replicate(state)
      log = progress.Progress(workdir, total_steps, step, name)
    if describe:
      print(f'[{name}] {describe}', flush=True)
    summary, validation = {}, {}
    compiled = False
    stop = stack.enter_context(StopSignals().active())
    while step < total_steps:
      first, step = step + 1, step + cadence.steps_in_call(step + 1, total_steps)
      with phases('train' if compiled else 'compile'):
        p_state, step_metrics = run_steps(p_state, first, step)
      compiled = True
      history.append(step_metrics)
      do_eval = step % cadence.eval_every == 0 or step == total_steps or step in cadence.ends
      do_save = step % cadence.checkpoint_every == 0 or do_eval
      if step % cadence.log_every == 0 or do_save:
        with phases('train'):   # waits for the steps to finish
          summary = history.summary()
        bad = [key for key, value in summary.items() if not np.isfinite(value)]
        if bad:   # stop before the state that produced it can be checkpointed
          raise UserError(f'non-finite {", ".join(bad)} at step {step}: stopped; the last good checkpoint '
                          f'(step {store.latest_step()}) is kept. Try a lower config.learning_rate')
        log.report(step, summary)
      evaluation = None
      if do_eval:
        with phases('evaluate'):
          evaluation = evaluate(step, p_state)
        validation = evaluation.metrics
        log.report(step, validation, prefix='validate')
        log.image(step, evaluation.picture_tag, evaluation.picture)
        if parallel.is_main_process():
          images.save_png(evaluation.picture, checkpoints.path(workdir, 'images', evaluation.picture_file))
      if do_save:
        with phases('checkpoint'):
          store.save(step, parallel.unreplicate(p_state), iterator.get_state(), evaluation and evaluation.best)
      if stop.requested(step) and step < total_steps:
        if not do_save:
          with phases('checkpoint'):
            store.save(step, parallel.unreplicate(p_state), {**iterator.get_state(), PENDING_METRICS: history.state()})
        raise Stopped(f'[{name}] stopped by {signal.Signals(stop.received).name} at step {step}: a complete '
                      f'checkpoint is saved in {workdir}; run the same command to resume', stop.received)
    failed = False
    return summary, validation
  finally:
    stack.close()
    try:
      with phases('checkpoint'):
        store.close()
      if log is not None:
        log.close()
    except Exception:
      if not failed:   # else the error that ended the run is the one to report, not what closing then hit
        raise


def unrolled(state, steps) -> tuple[Any, dict]:
  """Runs each `(step, args)` of `steps` in order, `state, metrics = step(state, *args)`, unrolled into the caller's
  trace; returns the last state and each metric stacked over the steps. A stage's train_steps runs a compiled
  call's steps this way: XLA:CPU maps in and page-faults a call's temporary buffers afresh each call, so steps that
  share a call reuse them. Make each `step` a nested jit, traced once for all the steps that use it."""
  outputs = []
  for step, args in steps:
    state, step_metrics = step(state, *args)
    outputs.append(step_metrics)
  return state, jax.tree.map(lambda *values: jnp.stack(values), *outputs)


def _step(state) -> int:
  """The step of a train state, or of the first of a tuple of them (stage 2's generator and discriminator)."""
  return int((state[0] if isinstance(state, tuple) else state).step)
