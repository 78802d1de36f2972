"""Kill-anywhere resume soak: SIGKILL or SIGTERM the training CLIs at random moments, restart them on the same
workdir, and check that nothing is lost.

    python -m bench.soak_resume --kills=20 [--signals=KILL,TERM] [--stage=vqvae|gan|both] [--steps=200] [--seed=0]
                                [--stage1_workdir=DIR]

For each stage: an uninterrupted reference run, then the same run killed `--kills` times (a random moment after it
starts training, often inside an orbax save; the signals taken in turn from --signals) and restarted each time until
it finishes. A SIGKILLed run must resume from the newest *complete* checkpoint on disk at the moment of the kill
(never a partial one). A SIGTERMed run must save a checkpoint at the step it names in its one-line message, exit
with status 143, and resume from that step. Checked at
the end: the final checkpoint equals the reference bit for bit, and so does every step's training loss in
WORKDIR/metrics.jsonl. Prints a table and a final JSON line; exit 1 on any mismatch. tests/test_soak.py runs the
stage-2 part with two kills; `make soak` runs both stages with 20.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def complete_steps(workdir):
  """Step numbers of the complete checkpoints in WORKDIR/checkpoints (orbax renames a finished save into place)."""
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def saving_now(workdir):
  """Whether an orbax save is in flight (a temporary directory exists)."""
  found = []
  for sub in ('checkpoints', 'best'):
    directory = os.path.join(workdir, sub)
    if os.path.isdir(directory):
      found += [name for name in os.listdir(directory) if 'tmp' in name]
  return bool(found)


def command(stage, workdir, steps, stage1_workdir, cache_dir):
  common = [f'--workdir={workdir}', f'--config.num_train_steps={steps}', '--config.log_every_steps=1',
            '--config.checkpoint_every_steps=5', f'--config.cache_dir={cache_dir}']
  if stage == 'vqvae':
    return [sys.executable, 'train_vqvae.py', '--config=configs/vqvae.py:tiny', '--config.eval_every_steps=50',
            *common]
  return [sys.executable, 'train_gan.py', '--config=configs/gan.py:tiny', f'--config.vqvae_workdir={stage1_workdir}',
          '--config.sample_every_steps=50', *common]


def run(cmd, log):
  with open(log, 'a') as out:
    return subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode


def killed_run(cmd, workdir, kills, signals, rng, log, max_delay=2.0):
  """Runs cmd to completion, signalling it `kills` times (signals in turn); returns the record of each kill."""
  records = []
  while True:
    before = os.path.getsize(log) if os.path.exists(log) else 0
    with open(log, 'a') as out:
      process = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if len(records) < kills:
      # Wait until it trains (the first progress line after this start), then kill at a random moment.
      while process.poll() is None:
        with open(log) as f:
          f.seek(before)
          if re.search(r'step \d+/', f.read()):
            break
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, max_delay))
      if process.poll() is None:
        name = signals[len(records) % len(signals)]
        in_save = saving_now(workdir)
        process.send_signal(getattr(signal, f'SIG{name}'))
        code = process.wait()
        if name == 'TERM' and code == 0:
          return records   # the run finished before it could stop
        record = {'signal': name, 'exit': code, 'latest_complete': (complete_steps(workdir) or [0])[-1],
                  'during_save': in_save}
        if name == 'TERM':
          with open(log) as f:
            f.seek(before)
            stopped = re.findall(r'stopped by SIGTERM at step (\d+): a complete checkpoint is saved', f.read())
          record['clean'] = code == 128 + signal.SIGTERM and bool(stopped) and \
              int(stopped[-1]) == record['latest_complete']
        records.append(record)
        continue
    if process.wait() != 0:
      raise SystemExit(f'{cmd} failed; see {log}')
    return records


def check_resumes(log, records):
  """Every restart resumed from the newest complete checkpoint at the moment of the kill before it."""
  resumed = [int(m) for m in re.findall(r'resuming .* from step (\d+)', open(log).read())]
  expected = [r['latest_complete'] for r in records if r['latest_complete'] > 0]
  return resumed == expected, resumed, expected


def compare(reference_dir, killed_dir):
  import jax
  import numpy as np
  from oasis_jax import checkpoints
  from oasis_jax.training import progress
  a, step_a = checkpoints.restore_raw(os.path.join(reference_dir, 'checkpoints'), 'reference')
  b, step_b = checkpoints.restore_raw(os.path.join(killed_dir, 'checkpoints'), 'killed')
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  params_equal = step_a == step_b and len(leaves_a) == len(leaves_b) and all(
      np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
  curve_a, curve_b = progress.read_jsonl(reference_dir), progress.read_jsonl(killed_dir)
  return params_equal, curve_a == curve_b, len(curve_a)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--signals', default='KILL,TERM', help='Comma-separated signals (KILL, TERM, INT), in turn.')
  parser.add_argument('--max_delay', type=float, default=2.0,
                      help='A kill comes this many seconds at most after the run starts training (uniformly drawn).')
  parser.add_argument('--stage', choices=['vqvae', 'gan', 'both'], default='both')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='', help='Where the runs go (default: a temporary directory).')
  parser.add_argument('--stage1_workdir', default='',
                      help='A trained stage-1 run for the GAN to decode through (default: the stage-1 reference run, '
                           'or with --stage=gan a 30-step stage-1 run made first).')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='soak_resume_'))
  os.makedirs(root, exist_ok=True)
  cache_dir = os.path.join(root, 'cache')
  os.environ.setdefault('OASIS_JAX_CACHE', cache_dir)   # the JAX compilation cache too
  stages = ['vqvae', 'gan'] if args.stage == 'both' else [args.stage]
  # The GAN decodes through the stage-1 reference run when there is one (it is trained first), else a 30-step run.
  stage1 = args.stage1_workdir or os.path.join(root, 'vqvae_reference' if 'vqvae' in stages else 'stage1')
  if stages == ['gan'] and not args.stage1_workdir and run(command('vqvae', stage1, 30, '', cache_dir),
                                                           os.path.join(root, 'stage1.log')):
    raise SystemExit(f'the stage-1 run for the GAN soak failed; see {root}/stage1.log')
  results, ok = [], True
  print(f'{"stage":6} {"kills":>5} {"TERM":>5} {"in save":>7} {"TERM ok":>7} {"resumes ok":>10} {"params equal":>12} '
        f'{"losses equal":>12} {"steps":>5} {"wall s":>7}', flush=True)
  for stage in stages:
    reference, killed = os.path.join(root, f'{stage}_reference'), os.path.join(root, f'{stage}_killed')
    if run(command(stage, reference, args.steps, stage1, cache_dir), reference + '.log'):
      raise SystemExit(f'the uninterrupted {stage} run failed; see {reference}.log')
    start = time.perf_counter()
    records = killed_run(command(stage, killed, args.steps, stage1, cache_dir), killed, args.kills,
                         args.signals.split(','), rng, killed + '.log', args.max_delay)
    wall = time.perf_counter() - start
    resumes_ok, resumed, expected = check_resumes(killed + '.log', records)
    params_equal, losses_equal, steps = compare(reference, killed)
    terms_clean = all(r['clean'] for r in records if r['signal'] == 'TERM')
    ok &= resumes_ok and params_equal and losses_equal and terms_clean
    result = {'stage': stage, 'kills': len(records), 'kills_during_save': sum(r['during_save'] for r in records),
              'by_signal': {name: sum(r['signal'] == name for r in records) for name in args.signals.split(',')},
              'terms_clean': terms_clean, 'resumes_ok': resumes_ok, 'resumed_from': resumed, 'expected': expected,
              'params_equal': params_equal, 'losses_equal': losses_equal, 'steps': steps, 'wall_s': round(wall, 1)}
    results.append(result)
    print(f'{stage:6} {result["kills"]:>5} {result["by_signal"].get("TERM", 0):>5} {result["kills_during_save"]:>7} '
          f'{str(terms_clean):>7} {str(resumes_ok):>10} {str(params_equal):>12} {str(losses_equal):>12} {steps:>5} '
          f'{wall:>7.1f}', flush=True)
  print(json.dumps({'ok': ok, 'root': root, 'results': results}), flush=True)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
