"""The workdir layout, in one place, and orbax checkpoints.

    WORKDIR/config.json          {"stage": "vqvae" | "gan", "config": {...}}: the run's ConfigDict
    WORKDIR/lock                 held (flock) by the training run using the workdir; names its PID and host
    WORKDIR/stage1/              stage 2 only: the stage-1 run it was trained on, copied (stage1.pin)
    WORKDIR/checkpoints/<step>/  latest checkpoints (orbax, atomic): train state + data iterator state + their digest
    WORKDIR/best/<step>/         the best checkpoint by a validation metric (stage 1: config.best_metric, PSNR)
    WORKDIR/*/<step>.damaged/    a checkpoint that failed to restore or to match its digest, set aside (not deleted)
    WORKDIR/tensorboard/         TensorBoard event files
    WORKDIR/images/              image grids written during training and evaluation
    WORKDIR/eval_<split>.json    what `python -m oasis_jax.evaluate` measured

Checkpoints hold unreplicated host arrays, so a run can resume on a different number of devices. Each holds a
sha256 digest of its contents, checked on every restore: a checkpoint that fails either way is reported in one line
and set aside, and the newest good one is used instead. A checkpoint that restores intact but does not fit this
version's model (parameters added, removed or reshaped since it was written: `check_fits`) stops with one line and
is left in place. A trained stage is loaded by `stage1.load` or `sampling.load`, each in one place.
"""
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from oasis_jax import parallel
from oasis_jax.errors import DiskFull, UserError, naming_full_disk

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'
STAGE1, STAGE2 = 'vqvae', 'gan'   # the stage names config.json records
DIGEST = 'digest'                  # the checkpoint item holding {item: sha256 of its contents, 'scheme': ...}
DIGEST_SCHEME = 'sha256/1'         # how `digest` hashes a tree; a checkpoint with another scheme is restored unchecked
DAMAGED = '.damaged'               # the suffix of a checkpoint directory set aside


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


# Model fields added after runs were saved without them, and the value those runs were built with.
ADDED_FIELDS = {'generator_final_convs': 0, 'decoder_steps': 0}


def check_resumable(workdir: str, config: ml_collections.ConfigDict, stage: str,
                    must_match: tuple[str, ...] = (), why: dict[str, str] | None = None) -> None:
  """Refuses a workdir of the other stage, or one whose run's `must_match` fields differ from config's (`why`: a
  reason to name, per field). A run that saved no checkpoint (one that failed before its first) binds nothing."""
  if os.path.exists(path(workdir, CONFIG_FILE)):
    saved_stage, saved = read_config(workdir)
    if saved_stage != stage:
      raise UserError(f'{workdir}: holds a {saved_stage} run, not a {stage} run: use another --workdir')
    if not has_checkpoint(workdir):
      return
    for field in must_match:
      if field not in saved and field not in ADDED_FIELDS:
        continue
      value = saved[field] if field in saved else ADDED_FIELDS[field]
      if _comparable(field, value) != _comparable(field, config[field]):
        reason = f' ({why[field]})' if why and field in why else ''
        raise UserError(f'config.{field}={config[field]!r} differs from {value!r} of the run in {workdir}'
                        f'{reason}: use another --workdir to start a new run')


def has_checkpoint(workdir: str) -> bool:
  """Whether the run in workdir has saved a complete checkpoint (latest or best)."""
  return any(latest_complete_step(path(workdir, folder)) is not None for folder in ('checkpoints', 'best'))


def _comparable(field: str, value):
  """Workdir paths compare as absolute paths (runs saved before they were stored absolute hold relative ones)."""
  return os.path.abspath(value) if field.endswith('_workdir') and isinstance(value, str) else value


def write_config(workdir: str, config: ml_collections.ConfigDict, stage: str,
                 must_match: tuple[str, ...] = (), why: dict[str, str] | None = None) -> None:
  """Saves the run's config, after check_resumable."""
  check_resumable(workdir, config, stage, must_match, why)
  if parallel.is_main_process():
    os.makedirs(path(workdir), exist_ok=True)
    tmp = path(workdir, CONFIG_FILE + '.tmp')
    with naming_full_disk(tmp), open(tmp, 'w') as f:
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
    """Saves the (unreplicated) state, the data iterator state and their digest; also as best when metrics improve.

    The best candidate is written (and finished) before the latest checkpoint: a run killed in between resumes
    from the previous latest checkpoint, redoes this step and offers it as best again, so best/ never misses it."""
    state = jax.device_get(state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              **{DIGEST: ocp.args.JsonSave({'state': digest(state), 'data': digest(data_state),
                                                              'scheme': DIGEST_SCHEME})})
    if metrics is not None and step not in self.best.all_steps():
      with _saving(self.best, step):
        self.best.save(step, args=args, metrics={self.best_metric: float(metrics[self.best_metric])})
        self.best.wait_until_finished()
    if step not in self.latest.all_steps():
      with _saving(self.latest, step):   # finished here, so that a failure is reported at the save that failed
        self.latest.save(step, args=args)
        self.latest.wait_until_finished()

  def latest_step(self):
    return self.latest.latest_step()

  def restore_latest(self, abstract_state):
    """(state, data_state) of the newest good checkpoint, or None when there is none; damaged ones are set aside."""
    found = _restore_newest_good(self.latest, 'checkpoint', {'state': ocp.args.StandardRestore(abstract_state),
                                                             'data': ocp.args.JsonRestore()})
    if found is None:
      return None
    restored, _ = found
    return restored['state'], restored['data']

  def close(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


@contextlib.contextmanager
def _saving(manager, step: int):
  """Turns a full disk during a save into one line naming the checkpoint (the earlier ones are left as they were),
  without orbax's error logs and tracebacks of each failed background write; other failures keep them."""
  _silence_late_reads()
  held = _HeldOrbaxErrors()
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(held)
  full = False
  try:
    with naming_full_disk(f'{manager.directory}/{step}', ' while saving this checkpoint; the earlier ones are intact'):
      yield
  except DiskFull:
    full = True
    raise
  finally:
    if not full:   # after a full disk the filter stays: the save's other background writes fail and log later
      absl_logger.removeFilter(held)
      for record in held.records:
        absl_logger.handle(record)


class _HeldOrbaxErrors(logging.Filter):
  """Holds back orbax's error records (a save's failed background writes) until the save's outcome is known."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname:
      self.records.append(record)
      return False
    return True


def _named_leaves(tree) -> list:
  """[(path, leaf)] of a tree, a path naming dict keys, attributes and sequence indices alike ('0/params/Conv_0/
  kernel'), so that a saved tree and the nested dicts a raw restore returns for it name their leaves the same."""
  return [('/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in key_path), leaf)
          for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def digest(tree) -> str:
  """sha256 of a tree's leaves (arrays by path, dtype, shape and bytes; scalars and strings by path and value), in
  path order, so that a saved tree and the nested dicts a raw restore returns for it have the same digest."""
  leaves = _named_leaves(tree)
  hasher = hashlib.sha256()
  for name, leaf in sorted(leaves, key=lambda item: item[0]):
    if isinstance(leaf, str) or np.ndim(leaf) == 0:   # a scalar may come back as a Python number or a 0-d array
      hasher.update(f'{name}={json.dumps(leaf if isinstance(leaf, str) else np.asarray(leaf).item())};'.encode())
    else:
      array = np.ascontiguousarray(leaf)
      hasher.update(f'{name}:{array.dtype.str}{array.shape};'.encode())
      hasher.update(array.tobytes())
  return hasher.hexdigest()


def tree_difference(found, expected, limit: int = 3) -> str:
  """'' when two trees (`found` restored, `expected` what the model has) hold leaves of the same shapes at the same
  paths (named as `digest` names them), else their first differences in one line: paths only one of them has, and
  shapes that differ."""
  found, expected = dict(_named_leaves(found)), dict(_named_leaves(expected))
  shown = lambda paths: ', '.join(paths[:limit]) + (f' and {len(paths) - limit} more' if len(paths) > limit else '')
  parts = []
  for label, paths in (('only in the checkpoint', sorted(set(found) - set(expected))),
                       ('only in the model', sorted(set(expected) - set(found)))):
    if paths:
      parts.append(f'{label}: {shown(paths)}')
  reshaped = [f'{name} {tuple(np.shape(found[name]))} where the model has {tuple(np.shape(expected[name]))}'
              for name in sorted(set(found) & set(expected)) if np.shape(found[name]) != np.shape(expected[name])]
  if reshaped:
    parts.append(f'other shapes: {shown(reshaped)}')
  return '; '.join(parts)


def check_fits(found, expected, where: str, remedy: str) -> None:
  """Stops with one line naming `where` when a restored tree does not fit what this version's model expects
  (tree_difference): a checkpoint written by another version of the code, which restores intact."""
  difference = tree_difference(found, expected)
  if difference:
    raise UserError(f'{where}: the checkpoint does not fit this version\'s model ({difference}): {remedy}')


OTHER_VERSION = ('it was written by another version of oasis_jax; use that version, or train again in another '
                 '--workdir')


def _restore_newest_good(manager, what: str, items: dict):
  """(restored items, step) of the newest checkpoint in manager that restores and matches its digest, or None when
  it has none at all. Each bad one is reported in one line and set aside (renamed <step>.damaged, by process 0).
  Checkpoints written without a digest (or with another DIGEST_SCHEME) are restored unchecked. A checkpoint that
  fails to restore into a `state` target (StandardRestore(target)) but restores intact without one was written for
  another model, not damaged: that stops with one line (check_fits), and nothing is set aside."""
  steps = sorted(manager.all_steps(), reverse=True)
  bad = []
  for step in steps:
    directory = os.path.join(str(manager.directory), str(step))
    with_digest = os.path.isdir(os.path.join(directory, DIGEST))

    def restore(args: dict):   # the items named by args, checked against the digest
      restored = manager.restore(step, args=ocp.args.Composite(
          **args, **({DIGEST: ocp.args.JsonRestore()} if with_digest else {})))
      if with_digest and restored[DIGEST].get('scheme') == DIGEST_SCHEME:
        wrong = [item for item in args if restored[DIGEST][item] != digest(restored[item])]
        if wrong:
          raise ValueError(f'the digest saved with it does not match its {" and ".join(wrong)}')
      return restored

    target = getattr(items.get('state'), 'item', None)
    try:
      restored = restore(items)
    except Exception as error:   # orbax, tensorstore, JSON: any failure to read it back means the same here
      _silence_late_reads()
      if target is not None:
        try:
          intact = restore({**items, 'state': ocp.args.StandardRestore()})['state']
        except Exception:
          _silence_late_reads()
        else:
          check_fits(intact, target, directory, OTHER_VERSION)
      reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
      reason = reason if len(reason) <= 160 else reason[:157] + '...'
      aside = _set_aside(directory)
      print(f'warning: {what} {directory} cannot be used ({reason}); ' +
            (f'set aside as {aside}' if aside else 'left in place') + '; trying an older one', file=sys.stderr,
            flush=True)
      bad.append(directory)
      continue
    if target is not None:
      check_fits(restored['state'], target, directory, OTHER_VERSION)
    if bad:
      manager.reload()
    return {item: restored[item] for item in items}, step
  if bad:
    raise UserError(f'{manager.directory}: no usable {what} (all {len(bad)} failed to restore and were set aside '
                    f'as <step>{DAMAGED}); move one back to retry it, or use another --workdir')
  return None


def _silence_late_reads() -> None:
  """After a failed restore or save, the reads and writes of its other arrays still finish in tensorstore's threads
  and call back into orbax's closed event loop; Python would print each such RuntimeError with a traceback."""
  if getattr(sys.excepthook, 'oasis_jax', False):
    return
  late = lambda error: isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable_hook(unraisable):
    if not late(unraisable.exc_value):
      previous_unraisable(unraisable)

  def except_hook(kind, value, traceback):
    if not late(value):
      previous_except(kind, value, traceback)
  unraisable_hook.oasis_jax = except_hook.oasis_jax = True
  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


def _set_aside(directory: str) -> str:
  """Renames a damaged checkpoint directory to <step>.damaged (process 0; '' when that is not possible)."""
  if not parallel.is_main_process():
    return ''
  target = directory + DAMAGED
  suffix = 1
  while os.path.exists(target):
    suffix += 1
    target = f'{directory}{DAMAGED}{suffix}'
  try:
    os.rename(directory, target)
  except OSError:
    return ''
  return target


def restore_raw(directory: str, what: str):
  """(state, step): the `state` item of the newest good checkpoint in directory, as nested dicts of arrays."""
  if not os.path.isdir(directory):
    raise UserError(f'{directory}: no {what} checkpoints (train it first)')
  manager = ocp.CheckpointManager(directory)
  try:
    found = _restore_newest_good(manager, f'{what} checkpoint', {'state': ocp.args.StandardRestore()})
  finally:
    manager.close()
  if found is None:
    raise UserError(f'{directory}: no complete {what} checkpoint (train it first)')
  restored, step = found
  return restored['state'], step


def restore_trained(workdir: str, what: str):
  """(state, step) of a training run: its best checkpoint, else (none, or none usable) its newest good one."""
  best = path(workdir, 'best')
  if latest_complete_step(best) is not None:
    try:
      return restore_raw(best, f'{what} (best)')
    except UserError:
      print(f'warning: {best}: no usable {what} checkpoint left; using the newest good one in '
            f'{path(workdir, "checkpoints")}', file=sys.stderr, flush=True)
  return restore_raw(path(workdir, 'checkpoints'), what)


def latest_complete_step(directory: str):
  """The newest complete checkpoint step in directory, or None (also when there is no such directory)."""
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  manager.close()
  return step


def save_raw(directory: str, step: int, state) -> None:
  """Saves a tree of arrays, with its digest, as the `state` item of checkpoint `step` in directory (what
  restore_raw reads)."""
  state = jax.device_get(state)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      **{DIGEST: ocp.args.JsonSave({'state': digest(state), 'scheme': DIGEST_SCHEME})}))
  manager.wait_until_finished()
  manager.close()
