"""Two processes (jax.distributed, localhost coordinator, gloo CPU collectives, 1 CPU device each) train together
and agree with one process holding 2 devices on the same global batch; only process 0 writes."""
import glob
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import vqvae as vqvae_configs
from oasis_jax import checkpoints
from oasis_jax.training import progress, vqvae_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, cache_dir):
  common = ['train_vqvae.py', '--config=configs/vqvae.py:tiny', '--config.num_train_steps=6',
            '--config.eval_every_steps=6', '--config.checkpoint_every_steps=3', '--config.log_every_steps=3',
            f'--config.cache_dir={cache_dir}']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu'}
  port = _free_port()
  processes = [subprocess.Popen([sys.executable, *common, f'--workdir={tmp_path}/multi',
                                 f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for process, (out, err) in zip(processes, outputs):
    assert process.returncode == 0, out + err
  assert 'on 2 device(s)' in outputs[0][0] and 'step 6/6' in outputs[0][0]
  assert 'step 6/6' not in outputs[1][0]   # progress lines come from process 0 only
  config = vqvae_configs.get_config('tiny')   # the same run in this process: 2 devices (conftest's XLA_FLAGS)
  config.update(num_train_steps=6, eval_every_steps=6, checkpoint_every_steps=3, log_every_steps=3, cache_dir=cache_dir)
  vqvae_trainer.train_and_evaluate(config, f'{tmp_path}/single')
  multi, step = checkpoints.restore_raw(os.path.join(tmp_path, 'multi', 'checkpoints'), 'multi')
  single, _ = checkpoints.restore_raw(os.path.join(tmp_path, 'single', 'checkpoints'), 'single')
  assert step == 6
  for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  curve_multi, curve_single = progress.read_jsonl(f'{tmp_path}/multi'), progress.read_jsonl(f'{tmp_path}/single')
  assert sorted(curve_multi) == sorted(curve_single) == [3, 6]
  np.testing.assert_allclose(curve_multi[6]['loss'], curve_single[6]['loss'], rtol=1e-5)
  validate_multi = progress.read_jsonl(f'{tmp_path}/multi', 'validate')[6]
  assert validate_multi['images'] == 18   # the whole validation split, counted across both processes
  np.testing.assert_allclose(validate_multi['ssim'], progress.read_jsonl(f'{tmp_path}/single', 'validate')[6]['ssim'],
                             rtol=1e-5)
  assert len(glob.glob(f'{tmp_path}/multi/tensorboard/events*')) == 1   # one writer: process 0
