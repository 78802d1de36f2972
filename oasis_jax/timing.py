"""Where a command's wall time goes: phases (data, setup, compile, train, evaluate, checkpoint, sample) timed as they
run and appended to WORKDIR/timings.jsonl, one line per command run. `python -m oasis_jax.timing DIR [DIR ...]`
prints the latest run of each command as a table (make demo ends with it).

Compile is the time spent inside the first train call: JAX traces and compiles there and returns before the
steps finish, so their execution counts as train.
"""
import collections
import contextlib
import json
import os
import sys
import time

from oasis_jax import parallel
from oasis_jax.errors import naming_full_disk

FILE = 'timings.jsonl'
COLUMNS = ('data', 'setup', 'compile', 'train', 'evaluate', 'checkpoint', 'sample')


class Phases:
  """Accumulates wall time per named phase: `with phases('train'): ...`."""

  def __init__(self):
    self.start = time.perf_counter()
    self.seconds = collections.OrderedDict()

  @contextlib.contextmanager
  def __call__(self, name: str):
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

  def write(self, workdir: str, command: str) -> None:
    """Appends {"command", "phases": {name: seconds}, "total"} to WORKDIR/timings.jsonl (process 0 only)."""
    if not parallel.is_main_process():
      return
    record = {'command': command, 'phases': {k: round(v, 2) for k, v in self.seconds.items()},
              'total': round(time.perf_counter() - self.start, 2)}
    os.makedirs(workdir, exist_ok=True)
    file = os.path.join(workdir, FILE)
    with naming_full_disk(file), open(file, 'a') as f:
      f.write(json.dumps(record) + '\n')


def latest(workdir: str) -> dict:
  """{command: the latest record of it} from WORKDIR/timings.jsonl (a line cut short by a kill is skipped)."""
  out = {}
  path = os.path.join(workdir, FILE)
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        out[record['command']] = record
  return out


def table(workdirs) -> str:
  """The latest run of each command in each workdir, one row each, seconds per phase and in all."""
  rows = [(f'{os.path.basename(os.path.normpath(workdir))}: {command}', record)
          for workdir in workdirs for command, record in latest(workdir).items()]
  width = max([len(name) for name, _ in rows] + [7]) + 2
  lines = [f'{"command":{width}}' + ''.join(f'{c:>11}' for c in COLUMNS) + f'{"total":>9}']
  for name, record in rows:
    cells = ''.join(f'{record["phases"][c]:>11.1f}' if c in record['phases'] else f'{"":>11}' for c in COLUMNS)
    lines.append(f'{name:{width}}{cells}{record["total"]:>9.1f}')
  lines.append(f'{"all":{width}}{"":>{11 * len(COLUMNS)}}{sum(r["total"] for _, r in rows):>9.1f}')
  return '\n'.join(lines)


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit('usage: python -m oasis_jax.timing WORKDIR [WORKDIR ...]')
  print('wall time per phase, seconds:')
  print(table(sys.argv[1:]))
