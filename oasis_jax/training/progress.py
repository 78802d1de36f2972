"""Progress on the terminal (step, metrics, steps/s, ETA), TensorBoard events and WORKDIR/metrics.jsonl (one JSON
line per report, full precision: {"step": ..., "prefix": "train" | "validate", <metric>: ...}), from process 0 only.

After a resume the steps since the last checkpoint are reported again; the last line for a step is the one that
counts (the values are the same: training resumes bit for bit on CPU)."""
import json
import os
import sys
import threading
import time

import jax
import numpy as np

from oasis_jax import parallel
from oasis_jax.errors import naming_full_disk, no_space_left


def read_jsonl(workdir: str, prefix: str = 'train') -> dict:
  """{step: metrics} from WORKDIR/metrics.jsonl, the last line for each step winning; a line cut short by a kill
  is skipped."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.pop('prefix') == prefix:
        out[record.pop('step')] = record
  return out


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


class Progress:
  """`report(step, metrics)` prints one line and writes scalars; `images(step, tag, grid)` writes a picture."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, name: str):
    self.total, self.name = total_steps, name
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.writer = self.jsonl = None
    if parallel.is_main_process():
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      _quiet_full_disk_in_threads()
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a+')
      self.jsonl.seek(0, os.SEEK_END)
      if self.jsonl.tell() > 0:
        self.jsonl.seek(self.jsonl.tell() - 1)
        if self.jsonl.read(1) != '\n':
          self.jsonl.write('\n')   # ends a line cut short by a killed run

  def report(self, step: int, metrics: dict, prefix: str = 'train') -> None:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    if self.writer is None:
      return
    for key, value in metrics.items():
      self.writer.add_scalar(f'{prefix}/{key}', float(value), step)
    with naming_full_disk(self.jsonl.name):
      self.jsonl.write(json.dumps({'step': step, 'prefix': prefix, **{k: float(v) for k, v in metrics.items()}})
                       + '\n')
      self.jsonl.flush()
    shown = '  '.join(f'{k} {float(v):.4g}' for k, v in metrics.items())
    timing = f'  {rate:.2f} steps/s  ETA {_duration((self.total - step) / rate)}' if rate > 0 and prefix == 'train' else ''
    print(f'[{self.name}] step {step}/{self.total}  {prefix}: {shown}{timing}', flush=True)

  def image(self, step: int, tag: str, grid_uint8: np.ndarray) -> None:
    if self.writer is not None:
      self.writer.add_image(tag, grid_uint8[None], step, dataformats='CHW')

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.jsonl.close()
    sys.stdout.flush()


def _quiet_full_disk_in_threads() -> None:
  """TensorBoard's writer thread dies with a traceback when the disk is full; the training thread reports the full
  disk in one line at its next write (metrics.jsonl, an image, a checkpoint)."""
  previous = threading.excepthook
  if getattr(previous, 'oasis_jax', False):
    return

  def hook(args):
    if not no_space_left(args.exc_value)[0]:
      previous(args)
  hook.oasis_jax = True
  threading.excepthook = hook


class History:
  """Per-step metrics (device arrays, replicated; a metric may hold several steps, stacked) since the last report,
  fetched in one go when summarised."""

  def __init__(self):
    self.steps = []

  def append(self, step_metrics) -> None:
    self.steps.append(step_metrics)

  def state(self) -> list:
    """The metrics not yet summarised, as JSON-able lists (with their dtypes), for a checkpoint taken between
    reports: a resumed run then reports the same means as an uninterrupted one."""
    return [{key: {'dtype': str(np.asarray(value[0]).dtype), 'values': np.ravel(value[0]).tolist()}
             for key, value in entry.items()} for entry in jax.device_get(self.steps)]

  def set_state(self, state: list) -> None:
    self.steps = [{key: np.asarray(value['values'], value['dtype'])[None] for key, value in entry.items()}
                  for entry in state]

  def summary(self) -> dict:
    """Mean of each metric since the last summary (non-finite values stay as they are, for the caller to check)."""
    fetched = jax.device_get(self.steps)
    self.steps = []
    return {key: float(np.mean(np.concatenate([np.ravel(m[key][0]) for m in fetched]))) for key in fetched[0]}
