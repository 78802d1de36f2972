"""Reliability: kill-anywhere resume, the NaN guard, the bad-input matrix, no unsafe loading."""
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import pytest

from configs import gan as gan_configs
from configs import vqvae as vqvae_configs
from oasis_jax import checkpoints, cli, sampling
from oasis_jax.errors import UserError
from oasis_jax.training import gan_trainer, vqvae_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_killed_runs_resume_bit_for_bit(tmp_path, cache_dir):
  """bench/soak_resume.py with a SIGTERM and a SIGKILL per stage (make soak runs 20): the SIGTERMed run saves at the
  step it names and exits 143, every restart resumes from the newest complete checkpoint, and the final checkpoint
  and every step's losses equal an uninterrupted run exactly."""
  result = subprocess.run([sys.executable, '-m', 'bench.soak_resume', '--kills=2', '--signals=TERM,KILL', '--steps=40',
                           '--max_delay=0.5', '--seed=1',
                           f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'OASIS_JAX_CACHE': cache_dir})
  assert result.returncode == 0, result.stdout + result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['ok'] and [r['stage'] for r in summary['results']] == ['vqvae', 'gan']
  for stage in summary['results']:
    assert stage['kills'] == 2 and stage['by_signal'] == {'TERM': 1, 'KILL': 1} and stage['terms_clean']
    assert stage['params_equal'] and stage['losses_equal'] and stage['steps'] == 40


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, run_cli):
  workdir = tmp_path / 'run'
  common = ['train_vqvae.py', '--config=configs/vqvae.py:tiny', f'--workdir={workdir}',
            f'--config.cache_dir={cache_dir}', '--config.log_every_steps=5', '--config.checkpoint_every_steps=5']
  run_cli(*common, '--config.num_train_steps=5')
  before = sorted(os.listdir(workdir / 'checkpoints'))
  stamp = {name: os.path.getmtime(workdir / 'checkpoints' / name) for name in before}
  result = run_cli(*common, '--config.num_train_steps=30', '--config.learning_rate=1e30', check=False)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert re.fullmatch(r'error: non-finite \S.* at step 10: stopped; the last good checkpoint \(step 5\) is kept\. '
                      r'Try a lower config\.learning_rate', result.stderr.strip().splitlines()[-1])
  assert sorted(os.listdir(workdir / 'checkpoints')) == before == ['5']
  assert {name: os.path.getmtime(workdir / 'checkpoints' / name) for name in before} == stamp


@pytest.fixture(scope='module')
def workdirs(tiny_stage1, tmp_path_factory, cache_dir, run_cli):
  gan = str(tmp_path_factory.mktemp('gan_for_matrix') / 'run')
  run_cli('train_gan.py', '--config=configs/gan.py:tiny', f'--workdir={gan}',
          f'--config.vqvae_workdir={tiny_stage1["whole"]}', '--config.num_train_steps=10')
  small = str(tmp_path_factory.mktemp('stage1_4x4') / 'run')   # 32x32 slices, 3 downsamples: 4x4 code maps
  run_cli('train_vqvae.py', '--config=configs/vqvae.py:tiny', f'--workdir={small}', f'--config.cache_dir={cache_dir}',
          '--config.image_size=32', '--config.num_downsamples=3', '--config.num_train_steps=2')
  return {'vqvae': tiny_stage1['whole'], 'gan': gan, 'small': small}


def _snapshot(workdir):
  """Every file under workdir with its size and modification time."""
  out = {}
  for folder, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(folder, name)
      out[path] = (os.path.getsize(path), os.path.getmtime(path))
  return out


def _train_vqvae(workdir, **overrides):
  config = vqvae_configs.get_config('tiny')
  config.update(overrides)
  vqvae_trainer.train_and_evaluate(config, str(workdir))


def _train_gan(workdir, vqvae_workdir, **overrides):
  config = gan_configs.get_config('tiny')
  config.update(vqvae_workdir=str(vqvae_workdir), **overrides)
  gan_trainer.train_and_evaluate(config, str(workdir))


def _sample(workdir, outdir):
  sampling.write_samples(str(workdir), str(outdir), 2, seed=0)


# (case, what the CLI calls, given (tmp, workdirs), the one-line message). The CLIs turn these UserErrors into
# `error: MESSAGE` and exit status 1 (tests/test_vqvae.py and test_gan.py check that boundary with real processes).
MATRIX = [
    ('K < 2', lambda tmp, w: _train_vqvae(tmp / 'a', num_embeddings=1),
     r'config.num_embeddings=1: expected at least 2 codes'),
    ('negative batch', lambda tmp, w: _train_gan(tmp / 'a', w['vqvae'], batch_size=-8),
     r'config.batch_size=-8: expected a positive number'),
    ('unknown GAN head', lambda tmp, w: _train_gan(tmp / 'a', w['vqvae'], head='pixels'),
     r"config.head='pixels': expected logits \(design a\) or latent \(design b\)"),
    ('stage-1 workdir missing', lambda tmp, w: _train_gan(tmp / 'a', tmp / 'none'),
     r'\S+/none: stage-1 workdir does not exist \(config.vqvae_workdir\)'),
    ('stage-1 code maps too small', lambda tmp, w: _train_gan(tmp / 'a', w['small']),
     r'\S+: stage-1 code maps are 4x4; the DCGAN needs a power of two >= 8'),
    ('stage-1 swapped under a GAN', lambda tmp, w: _train_gan(w['gan'], tmp / 'other_stage1'),
     r'config.vqvae_workdir=\S+ differs from \S+ of the run in \S+: use another --workdir to start a new run'),
    ('stage-1 retrained under an old GAN (no copy of its stage 1)', lambda tmp, w: _sample(tmp / 'gan_copy', tmp / 's'),
     r'\S+: stage-1 num_embeddings=16, but this stage-2 run was trained with 32: train stage 2 again in '
     r'another --workdir'),
    ('stage-2 model changed', lambda tmp, w: _train_gan(w['gan'], w['vqvae'], generator_width=4),
     r'config.generator_width=4 differs from 8 of the run in \S+: use another --workdir to start a new run'),
    ('stage-1 workdir holds stage 2', lambda tmp, w: _train_vqvae(w['gan']),
     r'\S+: holds a gan run, not a vqvae run: use another --workdir'),
    ('stage-2 workdir holds stage 1', lambda tmp, w: _train_gan(w['vqvae'], w['vqvae']),
     r'\S+: holds a vqvae run, not a gan run: use another --workdir'),
    ('sample.py on a stage-1 workdir', lambda tmp, w: _sample(w['vqvae'], tmp / 's'),
     r'\S+: holds a vqvae run, expected a stage-2 \(gan\) workdir'),
    ('evaluate without a workdir', lambda tmp, w: cli.check_workdir(None),
     r'--workdir is required: the directory for checkpoints, logs and images'),
]


@pytest.mark.parametrize('case, call, message', MATRIX, ids=[case for case, _, _ in MATRIX])
def test_bad_input_matrix(case, call, message, workdirs, tmp_path, edit_saved_config):
  if case == 'stage-1 swapped under a GAN':
    shutil.copytree(workdirs['vqvae'], tmp_path / 'other_stage1')
  if case.startswith('stage-1 retrained under'):   # a copy of the GAN whose stage-1 config now says K=16
    shutil.copytree(workdirs['gan'], tmp_path / 'gan_copy')
    shutil.rmtree(tmp_path / 'gan_copy' / 'stage1')   # as runs made before stage 2 kept a copy of its stage 1
    shutil.copytree(workdirs['vqvae'], tmp_path / 'stage1_copy')
    edit_saved_config(tmp_path / 'gan_copy', vqvae_workdir=str(tmp_path / 'stage1_copy'))
    edit_saved_config(tmp_path / 'stage1_copy', num_embeddings=16)
  before = {name: _snapshot(path) for name, path in workdirs.items()}
  with pytest.raises(UserError) as info:
    call(tmp_path, {name: pathlib.Path(path) for name, path in workdirs.items()})
  assert re.fullmatch(message, str(info.value)) and '\n' not in str(info.value), str(info.value)
  assert {name: _snapshot(path) for name, path in workdirs.items()} == before   # nothing overwritten


@pytest.mark.parametrize('args, message', [
    (['train_vqvae.py', '--config=configs/vqvae.py:tiny', '--workdir={tmp}/a', '--config.widht=3'],
     r"error: --config.widht: unknown config field 'widht' \(the config file lists the fields\)"),
    (['-m', 'oasis_jax.evaluate', '--split=test'],
     r'error: --workdir is required: the directory for checkpoints, logs and images'),
])
def test_bad_input_at_the_cli_is_one_line(args, message, tmp_path, run_cli):
  result = run_cli(*[a.format(tmp=tmp_path) for a in args], check=False)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  assert re.fullmatch(message, result.stderr.strip().splitlines()[-1]), result.stderr


UNSAFE = [r'\bpickle\b', r'allow_pickle\s*=\s*True', r'(?<![.\w])eval\(', r'(?<![.\w])exec\(', r'torch\.load\(',
          r'yaml\.load\(', r'marshal\.']


def test_no_unsafe_loading_anywhere():
  """No pickle, np.load(allow_pickle=True), eval/exec of strings, torch.load, yaml.load or marshal in the code."""
  files = [os.path.join(folder, name) for top in ('oasis_jax', 'configs', 'bench')
           for folder, _, names in os.walk(os.path.join(REPO, top)) for name in names if name.endswith('.py')]
  files += [os.path.join(REPO, name) for name in os.listdir(REPO) if name.endswith('.py')]
  assert len(files) > 40 and any(f.endswith(os.path.join('training', 'loop.py')) for f in files)
  found = []
  for path in sorted(files):
    for number, line in enumerate(open(path), 1):
      found += [f'{os.path.relpath(path, REPO)}:{number}: {line.strip()}' for pattern in UNSAFE
                if re.search(pattern, line)]
  assert not found, '\n'.join(found)


def test_a_second_run_on_a_workdir_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
  workdir = tmp_path / 'run'
  holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from oasis_jax import checkpoints\n'
                             f'with checkpoints.lock({str(workdir)!r}):\n  print("locked", flush=True); time.sleep(60)'],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    config = vqvae_configs.get_config('tiny')
    with pytest.raises(UserError) as info:
      vqvae_trainer.train_and_evaluate(config, str(workdir))
    assert re.fullmatch(rf'{re.escape(str(workdir))}: in use by PID {holder.pid} on {re.escape(socket.gethostname())}, '
                        rf'since \S+ \({re.escape(str(workdir / "lock"))}\): wait for that run to end, or use another '
                        r'--workdir', str(info.value)), str(info.value)
    assert not (workdir / 'config.json').exists()   # the refused run wrote nothing
  finally:
    holder.kill()                                   # SIGKILL: no chance to clean up
    holder.wait()
  assert (workdir / 'lock').read_text().startswith(f'PID {holder.pid} ')   # the file stays ...
  with checkpoints.lock(str(workdir)):              # ... but does not block a restart
    assert (workdir / 'lock').read_text().startswith(f'PID {os.getpid()} ')
