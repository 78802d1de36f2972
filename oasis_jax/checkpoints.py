"""The workdir layout, in one place, and orbax checkpoints.

    WORKDIR/config.json          {"stage": "vqvae" | "gan", "config": {...}}: the run's ConfigDict
    WORKDIR/lock                 held (flock) by the training run using the workdir; names its PID and host
    WORKDIR/stage1/              stage 2 only: the stage-1 run it was trained on, copied (stage1.pin)
    WORKDIR/checkpoints/<step>/  latest checkpoints (orbax, atomic): train state + data iterator state
    WORKDIR/best/<step>/         the best checkpoint by a validation metric (stage 1: config.best_metric, PSNR)
    WORKDIR/tensorboard/         TensorBoard event files
    WORKDIR/images/              image grids written during training and evaluation
    WORKDIR/eval_<split>.json    what `python -m oasis_jax.evaluate` measured

Checkpoints hold unreplicated host arrays, so a run can resume on a different number of devices.
A trained stage is loaded by `stage1.load` or `sampling.load`, each in one place.
"""
import contextlib
import datetime
import fcntl
import json
import os
import socket

import ml_collections
import orbax.checkpoint as ocp

from oasis_jax import parallel
from oasis_jax.errors import UserError

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'
STAGE1, STAGE2 = 'vqvae', 'gan'   # the stage names config.json records


def path(workdir: str, *parts: str) -> str:
  return os.path.join(os.path.abspath(workdir), *parts)


def read_config(workdir: str) -> tuple[str, ml_collections.ConfigDict]:
  """(stage, config) saved by a training run in workdir."""
  file = path(workdir, CONFIG_FILE)
  if not os.path.exists(file):
    raise UserError(f'{workdir}: not a training workdir (no {CONFIG_FILE}; train it first)')
  with open(file) as f:
    saved = json.load(f)
  return saved['stage'], ml_collections.ConfigDict(saved['config'])


def check_resumable(workdir: str, config: ml_collections.ConfigDict, stage: str,
                    must_match: tuple[str, ...] = ()) -> None:
  """Refuses a workdir of the other stage, or one whose run's `must_match` fields differ from config's."""
  if os.path.exists(path(workdir, CONFIG_FILE)):
    saved_stage, saved = read_config(workdir)
    if saved_stage != stage:
      raise UserError(f'{workdir}: holds a {saved_stage} run, not a {stage} run: use another --workdir')
    for field in must_match:
      if field in saved and _comparable(field, saved[field]) != _comparable(field, config[field]):
        raise UserError(f'config.{field}={config[field]!r} differs from {saved[field]!r} of the run in {workdir}: '
                        'use another --workdir to start a new run')


def _comparable(field: str, value):
  """Workdir paths compare as absolute paths (runs saved before they were stored absolute hold relative ones)."""
  return os.path.abspath(value) if field.endswith('_workdir') and isinstance(value, str) else value


def write_config(workdir: str, config: ml_collections.ConfigDict, stage: str,
                 must_match: tuple[str, ...] = ()) -> None:
  """Saves the run's config, after check_resumable."""
  check_resumable(workdir, config, stage, must_match)
  if parallel.is_main_process():
    os.makedirs(path(workdir), exist_ok=True)
    tmp = path(workdir, CONFIG_FILE + '.tmp')
    with open(tmp, 'w') as f:
      json.dump({'stage': stage, 'config': config.to_dict()}, f, indent=2, sort_keys=True)
    os.replace(tmp, path(workdir, CONFIG_FILE))


@contextlib.contextmanager
def lock(workdir: str):
  """Holds WORKDIR/lock for a training run (process 0 of a multi-process run): a second run on the workdir is
  refused with one line naming the holder. The lock is an flock on the open file, so the kernel releases it when
  the holder exits, also by kill -9: a stale lock file never blocks a restart."""
  if not parallel.is_main_process():
    yield
    return
  os.makedirs(path(workdir), exist_ok=True)
  handle = open(path(workdir, LOCK_FILE), 'a+')
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      handle.seek(0)
      holder = handle.read().strip() or 'another process'
      raise UserError(f'{workdir}: in use by {holder} ({path(workdir, LOCK_FILE)}): wait for that run to end, '
                      'or use another --workdir') from None
    handle.seek(0)
    handle.truncate()
    handle.write(f'PID {os.getpid()} on {socket.gethostname()}, since '
                 f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
    handle.flush()
    yield
  finally:
    handle.close()   # releases the flock


class Checkpoints:
  """Latest checkpoints (for resume) and the best one (by a validation metric) of a training run."""

  def __init__(self, workdir: str, best_metric: str, keep: int = 2):
    self.best_metric = best_metric
    self.latest = ocp.CheckpointManager(path(workdir, 'checkpoints'),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        path(workdir, 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m[best_metric],
                                             best_mode='max'))

  def save(self, step: int, state, data_state: dict, metrics: dict | None = None) -> None:
    """Saves the (unreplicated) state and the data iterator state; also as best when metrics improve on it.

    The best candidate is written (and finished) before the latest checkpoint: a run killed in between resumes
    from the previous latest checkpoint, redoes this step and offers it as best again, so best/ never misses it."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    if metrics is not None and step not in self.best.all_steps():
      self.best.save(step, args=args, metrics={self.best_metric: float(metrics[self.best_metric])})
      self.best.wait_until_finished()
    if step not in self.latest.all_steps():
      self.latest.save(step, args=args)

  def latest_step(self):
    return self.latest.latest_step()

  def restore_latest(self, abstract_state):
    """(state, data_state) of the latest complete checkpoint, or None when there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def close(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


def restore_raw(directory: str, what: str):
  """The `state` item of the newest checkpoint in directory, as nested dicts of arrays (no target needed)."""
  if not os.path.isdir(directory):
    raise UserError(f'{directory}: no {what} checkpoints (train it first)')
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    raise UserError(f'{directory}: no complete {what} checkpoint (train it first)')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return restored['state'], step


def latest_complete_step(directory: str):
  """The newest complete checkpoint step in directory, or None (also when there is no such directory)."""
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  manager.close()
  return step


def save_raw(directory: str, step: int, state) -> None:
  """Saves a tree of arrays as the `state` item of checkpoint `step` in directory (what restore_raw reads)."""
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  manager.close()


def best_or_latest(workdir: str) -> str:
  """WORKDIR/best when it holds a complete checkpoint, else WORKDIR/checkpoints."""
  directory = path(workdir, 'best')
  return directory if latest_complete_step(directory) is not None else path(workdir, 'checkpoints')

