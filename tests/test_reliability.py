"""Reliability: damaged checkpoints, the NaN guard, the bad-input matrix, no unsafe loading, one run per workdir
(kill-anywhere resume: test_soak.py)."""
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import gan as gan_configs
from configs import vqvae as vqvae_configs
from oasis_jax import checkpoints, cli, sampling, stage1
from oasis_jax.errors import UserError
from oasis_jax.training import gan_trainer, vqvae_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _damage(step_dir: pathlib.Path, how: str) -> None:
  """Damages checkpoint step_dir the ways disks and interrupted copies do."""
  arrays = max((step_dir / 'state' / 'ocdbt.process_0' / 'd').iterdir(), key=lambda file: file.stat().st_size)
  content = arrays.read_bytes()
  if how == 'truncated array file':
    arrays.write_bytes(content[:len(content) // 2])
  elif how == 'bytes flipped in place':   # same size, so only the digest can tell
    middle = len(content) // 2
    arrays.write_bytes(content[:middle] + bytes(b ^ 0x5A for b in content[middle:middle + 16]) + content[middle + 16:])
  elif how == 'state _METADATA deleted':
    (step_dir / 'state' / '_METADATA').unlink()
  elif how == 'data metadata deleted':
    (step_dir / 'data' / 'metadata').unlink()


DAMAGE = ['truncated array file', 'bytes flipped in place', 'state _METADATA deleted', 'data metadata deleted']


@pytest.fixture(scope='module')
def tiny_state():
  return jax.device_get(vqvae_trainer.create_state(vqvae_configs.get_config('tiny'), jax.random.key(0)))


def _warnings(capfd):
  return [line for line in capfd.readouterr().err.splitlines() if line.startswith('warning: ')]


@pytest.mark.parametrize('how', DAMAGE)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path, how, tiny_state, capfd):
  older = tiny_state.replace(step=np.int32(10))
  newer = older.replace(step=np.int32(20), params=jax.tree.map(lambda x: x + 1, older.params))
  store = checkpoints.Checkpoints(str(tmp_path), best_metric='psnr')
  store.save(10, older, {'next': 10})
  store.save(20, newer, {'next': 20})
  store.close()
  _damage(tmp_path / 'checkpoints' / '20', how)
  capfd.readouterr()
  store = checkpoints.Checkpoints(str(tmp_path), best_metric='psnr')
  restored, data_state = store.restore_latest(tiny_state)
  assert data_state == {'next': 10} and int(restored.step) == 10
  for a, b in zip(jax.tree.leaves(older), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  warnings = _warnings(capfd)
  assert len(warnings) == 1 and re.fullmatch(
      rf'warning: checkpoint {re.escape(str(tmp_path))}/checkpoints/20 cannot be used \(.+\); set aside as '
      rf'{re.escape(str(tmp_path))}/checkpoints/20\.damaged; trying an older one', warnings[0]), warnings
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '20.damaged']   # kept, not deleted
  store.save(20, newer, {'next': 20})   # the resumed run saves its step 20 again beside the damaged one
  store.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '20', '20.damaged']


def test_when_every_checkpoint_is_damaged_the_run_stops_with_one_line(tmp_path, tiny_state):
  store = checkpoints.Checkpoints(str(tmp_path), best_metric='psnr')
  for step in (10, 20):
    store.save(step, tiny_state.replace(step=np.int32(step)), {'next': step})
  store.close()
  for step in ('10', '20'):
    _damage(tmp_path / 'checkpoints' / step, 'truncated array file')
  with pytest.raises(UserError) as info:
    checkpoints.Checkpoints(str(tmp_path), best_metric='psnr').restore_latest(tiny_state)
  assert str(info.value) == (f'{tmp_path}/checkpoints: no usable checkpoint (all 2 failed to restore and were set '
                             'aside as <step>.damaged); move one back to retry it, or use another --workdir')


def _other_model(params: dict, how: str):
  """(a copy of a parameter tree as another version of the model might have written it, what check_fits names for
  it, its paths under 'params/')."""
  flat = {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(params).items()}
  first = min(path for path in flat if path[-1] == 'kernel')
  name = 'params/' + '/'.join(first)
  if how == 'extra':
    flat[('Extra', 'kernel')] = np.zeros(3, np.float32)
    difference = 'only in the checkpoint: params/Extra/kernel'
  elif how == 'missing':
    del flat[first]
    difference = f'only in the model: {name}'
  else:
    shape = flat[first].shape
    flat[first] = np.zeros(shape[:-1] + (1,), np.float32)
    difference = f'other shapes: {name} {shape[:-1] + (1,)} where the model has {shape}'
  return traverse_util.unflatten_dict(flat), difference


@pytest.mark.parametrize('how', ['extra', 'missing', 'shape'])
def test_resuming_a_checkpoint_of_another_model_stops_with_one_line_and_sets_nothing_aside(tmp_path, how,
                                                                                           tiny_state):
  params, difference = _other_model(tiny_state.params, how)
  store = checkpoints.Checkpoints(str(tmp_path), best_metric='psnr')
  for step in (10, 20):
    store.save(step, tiny_state.replace(step=np.int32(step), params=params), {'next': step})
  store.close()
  with pytest.raises(UserError) as info:
    checkpoints.Checkpoints(str(tmp_path), best_metric='psnr').restore_latest(tiny_state)
  assert str(info.value) == (f"{tmp_path}/checkpoints/20: the checkpoint does not fit this version's model "
                             f'({difference}): it was written by another version of oasis_jax; use that version, '
                             'or train again in another --workdir')
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '20']   # intact, so not set aside


@pytest.mark.parametrize('how', ['extra', 'missing', 'shape'])
def test_loading_a_trained_stage_of_another_model_stops_with_one_line(tiny_chain, tmp_path, how):
  """What sample.py, evaluate and train_gan.py load: a generator or a stage 1 whose parameters another version of
  the model wrote is refused, not applied (Flax would ignore extra parameters and fail deep inside on others)."""
  for stage in ('gan', 'stage1'):
    workdir = tmp_path / stage
    shutil.copytree(tiny_chain[stage], workdir)
    shutil.rmtree(workdir / 'checkpoints')   # what is loaded: best/
    state, step = checkpoints.restore_raw(str(workdir / 'best'), stage)
    # The generator's state (stage 2), the train state (stage 1).
    held = (state['0'] if '0' in state else state[0]) if stage == 'gan' else state
    field = 'ema_params' if stage == 'gan' else 'params'
    held[field], difference = _other_model(held[field], how)
    shutil.rmtree(workdir / 'best')
    checkpoints.save_raw(str(workdir / 'best'), step, state)
    load = sampling.load if stage == 'gan' else stage1.load
    with pytest.raises(UserError) as info:
      load(str(workdir))
    again = 'train stage 2 again' if stage == 'gan' else 'train stage 1 again'
    trained = 'its generator was trained' if stage == 'gan' else 'it was trained'
    assert str(info.value) == (f"{workdir}: the checkpoint does not fit this version's model "
                               f'({difference}): {trained} by another version of '
                               f'oasis_jax; {again} in another --workdir')


def test_sample_and_evaluate_fall_back_from_a_damaged_best_checkpoint(tiny_chain, tmp_path, capfd):
  gan = tmp_path / 'gan'
  shutil.copytree(tiny_chain['gan'], gan)
  (best_step,) = os.listdir(gan / 'best')
  _damage(gan / 'best' / best_step, 'bytes flipped in place')
  capfd.readouterr()
  loaded = sampling.load(str(gan))   # what sample.py and evaluate --stage=gan load
  latest, _ = checkpoints.restore_raw(str(gan / 'checkpoints'), 'stage-2')
  generator = latest['0'] if '0' in latest else latest[0]
  for a, b in zip(jax.tree.leaves(loaded.g_variables['params']), jax.tree.leaves(generator['ema_params'])):
    np.testing.assert_array_equal(a, b)
  warnings = _warnings(capfd)
  assert len(warnings) == 2 and f'best/{best_step} cannot be used (the digest saved with it does not match its state)' in warnings[0]
  assert warnings[1] == f'warning: {gan}/best: no usable stage-2 checkpoint left; using the newest good one in ' \
                        f'{gan}/checkpoints', warnings


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
  workdir = tmp_path / 'run'
  common = {'cache_dir': cache_dir, 'log_every_steps': 5, 'checkpoint_every_steps': 5}
  _train_vqvae(workdir, num_train_steps=5, **common)
  before = sorted(os.listdir(workdir / 'checkpoints'))
  stamp = {name: os.path.getmtime(workdir / 'checkpoints' / name) for name in before}
  with pytest.raises(UserError) as info:   # the CLIs print it as one line (test_bad_input_at_the_cli_is_one_line)
    _train_vqvae(workdir, num_train_steps=30, learning_rate=1e30, **common)
  assert re.fullmatch(r'non-finite \S.* at step 10: stopped; the last good checkpoint \(step 5\) is kept\. '
                      r'Try a lower config\.learning_rate', str(info.value)), str(info.value)
  assert sorted(os.listdir(workdir / 'checkpoints')) == before == ['5']
  assert {name: os.path.getmtime(workdir / 'checkpoints' / name) for name in before} == stamp


def _as_if_trained_with(workdir, edit_saved_config, **fields) -> None:
  """Makes a copy of a stage-1 run look trained with other model fields: its saved config says so, and its only
  checkpoint (best/) holds a freshly initialised state of that model, as such a run would."""
  edit_saved_config(workdir, **fields)
  _, config = checkpoints.read_config(str(workdir))
  state = vqvae_trainer.create_state(config, jax.random.key(0))
  for folder in ('best', 'checkpoints'):
    shutil.rmtree(os.path.join(workdir, folder))
  checkpoints.save_raw(os.path.join(workdir, 'best'), 1, {'params': state.params, 'vq': state.vq})


@pytest.fixture(scope='module')
def workdirs(tiny_chain, tmp_path_factory, edit_saved_config):
  small = str(tmp_path_factory.mktemp('stage1_4x4') / 'run')   # as if trained on 32x32 slices with 3 downsamples:
  shutil.copytree(tiny_chain['stage1'], small)                 # 4x4 code maps
  _as_if_trained_with(small, edit_saved_config, image_size=32, num_downsamples=3)
  return {'vqvae': tiny_chain['stage1'], 'gan': tiny_chain['gan'], 'small': small}


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
    ('one-hot discriminator input under the latent head',
     lambda tmp, w: _train_gan(tmp / 'a', w['vqvae'], head='latent', discriminator_input='one_hot'),
     r"config.discriminator_input=one_hot: needs config.head=logits \(head 'latent' makes codebook vectors, not "
     r"one-hot codes\)"),
    ('stage-1 workdir missing', lambda tmp, w: _train_gan(tmp / 'a', tmp / 'none'),
     r'\S+/none: stage-1 workdir does not exist \(config.vqvae_workdir\)'),
    ('stage-1 code maps too small', lambda tmp, w: _train_gan(tmp / 'a', w['small']),
     r'\S+: stage-1 code maps are 4x4; the DCGAN needs a power of two >= 8'),
    ('stage-1 swapped under a GAN', lambda tmp, w: _train_gan(w['gan'], tmp / 'other_stage1'),
     r'config.vqvae_workdir=\S+ differs from \S+ of the run in \S+: use another --workdir to start a new run'),
    ('stage-1 retrained under an old GAN (no copy of its stage 1)', lambda tmp, w: _sample(tmp / 'gan_copy', tmp / 's'),
     r'\S+: stage-1 num_embeddings=16, but this stage-2 run was trained with 32: train stage 2 again in '
     r'another --workdir'),
    ('negative CPU devices', lambda tmp, w: _train_gan(tmp / 'a', w['vqvae'], cpu_devices=-1),
     r"config.cpu_devices=-1: expected a number of CPU devices >= 0 \(0: JAX's default\)"),
    ('batch not split evenly over the CPU devices', lambda tmp, w: _train_gan(tmp / 'a', w['vqvae'], cpu_devices=3),
     r'config.batch_size=8: expected a multiple of config.cpu_devices \(3\)'),
    ('stage-2 model changed', lambda tmp, w: _train_gan(w['gan'], w['vqvae'], generator_width=4),
     r'config.generator_width=4 differs from 8 of the run in \S+: use another --workdir to start a new run'),
    ('stage-2 run saved before its generator had final convs', lambda tmp, w: _train_gan(tmp / 'gan_copy', w['vqvae'],
                                                                                     generator_final_convs=1),
     r'config.generator_final_convs=1 differs from 0 of the run in \S+: use another --workdir to start a new run'),
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
    _as_if_trained_with(tmp_path / 'stage1_copy', edit_saved_config, num_embeddings=16)
  if case.startswith('stage-2 run saved before'):   # a copy of the GAN whose saved config lacks the field
    shutil.copytree(workdirs['gan'], tmp_path / 'gan_copy')
    edit_saved_config(tmp_path / 'gan_copy', drop=('generator_final_convs',))
  before = {name: _snapshot(path) for name, path in workdirs.items()}
  with pytest.raises(UserError) as info:
    call(tmp_path, {name: pathlib.Path(path) for name, path in workdirs.items()})
  assert re.fullmatch(message, str(info.value)) and '\n' not in str(info.value), str(info.value)
  assert {name: _snapshot(path) for name, path in workdirs.items()} == before   # nothing overwritten


@pytest.mark.parametrize('args, message', [
    (['train_vqvae.py', '--config=configs/vqvae.py:tiny', '--workdir={tmp}/a', '--config.widht=3'],
     r"error: --config.widht: unknown config field 'widht' \(the config file lists the fields\)"),
    (['train_gan.py', '--config=configs/gan.py:tiny', '--workdir={tmp}/g', '--config.discriminator_widht=3'],
     r"error: --config.discriminator_widht: unknown config field 'discriminator_widht' "
     r"\(the config file lists the fields; did you mean discriminator_width\?\)"),
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


def test_a_damaged_copy_of_stage1_is_never_replaced_by_what_stage1_holds_now(tiny_chain, tmp_path):
  gan = tmp_path / 'gan'
  shutil.copytree(tiny_chain['gan'], gan)
  (step,) = os.listdir(gan / 'stage1' / 'checkpoints')
  _damage(gan / 'stage1' / 'checkpoints' / step, 'truncated array file')
  with pytest.raises(UserError, match=r'no usable stage-1 checkpoint \(all 1 failed to restore'):
    sampling.load(str(gan))
  with pytest.raises(UserError) as info:   # what train_gan.py does first on resume
    stage1.pin(str(gan), tiny_chain['stage1'])
  assert str(info.value) == (f'{gan}/stage1: the stage-1 checkpoint this stage-2 run was trained on is missing or '
                             'damaged; train stage 2 again in another --workdir')


def test_a_run_that_failed_before_its_first_checkpoint_does_not_bind_the_workdir(tmp_path, cache_dir):
  workdir = tmp_path / 'run'
  with pytest.raises(UserError, match='keras_png_slices'):   # fails preparing its data, after writing config.json
    _train_vqvae(workdir, dataset='oasis_png', data_dir=str(tmp_path), cache_dir=cache_dir)
  assert (workdir / 'config.json').exists() and not checkpoints.has_checkpoint(str(workdir))
  _train_vqvae(workdir, cache_dir=cache_dir, log_every_steps=5, checkpoint_every_steps=5, num_train_steps=5)
  assert checkpoints.read_config(str(workdir))[1].dataset == 'demo' and checkpoints.has_checkpoint(str(workdir))


def test_extending_a_cosine_schedule_run_is_refused(tiny_chain, tmp_path, edit_saved_config):
  workdir = tmp_path / 'run'   # a 30-step run, as if trained with the cosine schedule
  shutil.copytree(tiny_chain['stage1'], workdir)
  edit_saved_config(workdir, lr_schedule='cosine')
  with pytest.raises(UserError) as info:
    _train_vqvae(workdir, lr_schedule='cosine', num_train_steps=60)
  assert str(info.value) == (
      f"config.num_train_steps=60 differs from 30 of the run in {workdir} (the cosine learning-rate schedule is laid "
      "out over the run's length; extending it would raise the learning rate at the resume point): use another "
      "--workdir to start a new run")


def test_a_stage2_run_without_a_checkpoint_copies_the_stage1_it_is_given_now(tiny_chain, tmp_path,
                                                                              edit_saved_config):
  gan, first, second = tmp_path / 'gan', tmp_path / 'first', tmp_path / 'second'
  for stage1_run in (first, second):
    shutil.copytree(tiny_chain['stage1'], stage1_run)
  edit_saved_config(second, seed=7)   # tells the two copies apart
  pinned = stage1.pin(str(gan), str(first))   # what a run that failed before its first checkpoint left behind
  assert checkpoints.read_config(pinned)[1].seed == 0
  stage1.pin(str(gan), str(second))
  assert checkpoints.read_config(pinned)[1].seed == 7


def _can_mount_a_small_filesystem() -> bool:
  """Whether this machine lets an unprivileged user namespace mount a tmpfs (most Linux kernels do)."""
  if not shutil.which('unshare'):
    return False
  return subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                         'mount -t tmpfs -o size=64k tmpfs /mnt'], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_a_small_filesystem(), reason='no unprivileged user+mount namespaces here')
@pytest.mark.parametrize('size, failing', [('180k', r'checkpoints/10: no space left on device while saving this '
                                                    r'checkpoint; the earlier ones are intact'),
                                           # at 330k the step-15 PNG or the best/15 checkpoint, whichever write
                                           # the filesystem refuses first (both seen)
                                           ('330k', r'((images/\S+\.png|metrics\.jsonl): no space left on device|'
                                                    r'best/15: no space left on device while saving this checkpoint; '
                                                    r'the earlier ones are intact)')])
def test_a_full_disk_stops_training_with_one_line_naming_what_failed(tmp_path, cache_dir, size, failing):
  """Training on a small filesystem (a tmpfs of `size` in a user namespace) until it is full: exit status 1, one
  line on stderr naming the checkpoint or file that did not fit, and the checkpoints saved before it restore."""
  disk, err = tmp_path / 'disk', tmp_path / 'stderr.txt'
  disk.mkdir()
  train = [sys.executable, 'train_vqvae.py', '--config=configs/vqvae.py:tiny', f'--workdir={disk}/run',
           f'--config.cache_dir={cache_dir}', '--config.num_train_steps=60', '--config.checkpoint_every_steps=10']
  restore = [sys.executable, '-c', 'from oasis_jax import checkpoints; '
             f'print(checkpoints.latest_complete_step({str(disk / "run" / "checkpoints")!r}))']
  script = (f'mount -t tmpfs -o size={size} tmpfs {disk} && {shlex.join(train)} 2> {err}; echo "exit $?"; '
            f'{shlex.join(restore)}')
  result = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'bash', '-c', script], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  lines = result.stdout.strip().splitlines()
  assert 'exit 1' in lines, result.stdout + result.stderr
  stderr = err.read_text().strip().splitlines()
  assert len(stderr) == 1 and re.fullmatch(rf'error: {re.escape(str(disk))}/run/{failing}; .+', stderr[0]), stderr
  saved = lines[-1]   # the newest complete checkpoint left, if the failure came after one
  assert saved == ('None' if failing.startswith('checkpoints/10') else '10'), lines
