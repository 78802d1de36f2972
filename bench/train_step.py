"""Stage-1 train step: oasis_jax vs a PyTorch peer of the same architecture, and against this machine's GEMM peak.

    python -m bench.train_step [--sizes=seed,demo] [--rounds=5] [--decoder_only]

For each size (seed: the `default` recipe, 256x256 slices at batch 32, 64x64 codes, K=512; demo: the `demo` recipe)
it times oasis_jax's real pmapped train step (1 device, fp32, donated state) and the PyTorch peer
(bench/torch_vqvae.py: eager and torch.compile, the seed's transposed-conv upsampling and the sub-pixel form JAX
uses, NCHW and channels-last), in alternating rounds in one process, and prints the median images/s of each, the
ratio JAX / best PyTorch, and JAX's useful FLOP/s as a fraction of the median jitted fp32 GEMM FLOP/s. Useful FLOPs
are the model's: XLA's cost analysis of the step written with direct convolutions (conv_impl=xla); Winograd layers
execute fewer (also printed), so their useful rate can pass what the GEMM peak would allow for direct convolutions.
Needs bench/requirements.txt (torch==2.13.0, the CPU build on these machines).
"""
import argparse
import contextlib
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import vqvae as vqvae_configs
from oasis_jax import parallel
from oasis_jax.ops import winograd_cpu
from oasis_jax.training import vqvae_trainer


def gemm_peak(n=2048, repeats=5):
  """Median FLOP/s of a jitted fp32 n x n matmul (a chain of 4, so dispatch is negligible)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / np.sqrt(n)

  @jax.jit
  def chain(x):
    for _ in range(4):
      x = x @ a
    return x
  chain(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    chain(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 4 * 2 * n ** 3 / statistics.median(times)


def cpu_kind(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU's model name and the vector features that matter here: 'AVX-512 with AMX', 'AVX-512' or 'AVX2 only'
  (VMs of one kind differ 3-5x in speed on this project by these)."""
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return 'unknown CPU'
  model = next((line.split(':', 1)[1].strip() for line in text.splitlines() if line.startswith('model name')), '?')
  flags = set(next((line.split(':', 1)[1].split() for line in text.splitlines() if line.startswith('flags')), []))
  if 'avx512f' in flags:
    vector = 'AVX-512 with AMX' if 'amx_tile' in flags else 'AVX-512'
  else:
    vector = 'AVX2 only' if 'avx2' in flags else 'no AVX2'
  return f'{model} ({vector})'


def machine_header() -> float:
  """Prints what the figures were measured on (CPU kind, cores, versions, GEMM peak) and returns the peak FLOP/s."""
  import torch
  torch.set_num_threads(os.cpu_count())
  peak = gemm_peak()
  print(f'machine: {cpu_kind()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}, '
        f'torch {torch.__version__}; jitted fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s', flush=True)
  return peak


def conv_variant(spec: str):
  """'IMPL' or 'IMPL+xla_transforms' (Winograd without the native kernels) -> (config.conv_impl, a context to
  trace the variant's program in)."""
  impl, _, variant = spec.partition('+')
  if variant not in ('', 'xla_transforms'):
    raise ValueError(f'unknown variant {variant!r} in {spec!r}: expected IMPL or IMPL+xla_transforms')
  return impl, winograd_cpu.turned_off() if variant else contextlib.nullcontext()


def int_list(text: str, default: int) -> list[int]:
  """A comma-separated flag such as --batch_sizes=4,8 as ints; [default] when it is empty."""
  return [int(item) for item in text.split(',')] if text else [default]


def alternating_medians(runners: dict, rounds: int) -> dict:
  """Median seconds per step of each runner (a callable that runs some steps and returns how many), timed in
  alternating rounds so that drifts in machine speed hit all alike."""
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      start = time.perf_counter()
      steps = run()
      times[name].append((time.perf_counter() - start) / steps)
  return {name: statistics.median(values) for name, values in times.items()}


def xla_flops(stage) -> float:
  """FLOPs by XLA's cost analysis of a lowered or compiled pmapped step."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def pmapped_step(config, step=vqvae_trainer.train_step, decoder_only: bool = False):
  """`step` (train_step, or train_steps for several per call) pmapped as train_vqvae.py runs it; decoder_only: the
  decoder phase's step."""
  return jax.pmap(functools.partial(step, config=config, data_variance=0.08, decoder_only=decoder_only),
                  axis_name=parallel.AXIS, donate_argnums=(0,), in_axes=(0, 0, None))


def model_flops(config, batch, decoder_only: bool = False) -> float:
  """FLOPs of one step of the model as written with direct convolutions (XLA's cost analysis, before compiling)."""
  config = config.copy_and_resolve_references()
  config.conv_impl = 'xla'
  state = parallel.replicate(vqvae_trainer.create_state(config, jax.random.key(0)))
  return xla_flops(pmapped_step(config, decoder_only=decoder_only).lower(state, jnp.asarray(batch[None]),
                                                                         jax.random.key(1)))


def jax_runner(config, batch, steps: int, decoder_only: bool = False):
  """oasis_jax's pmapped train steps on one device as train_vqvae.py runs them: calls of config.steps_per_call
  steps (vqvae_trainer.train_steps), at least `steps` steps per run."""
  per_call = config.steps_per_call
  p_state = parallel.replicate(vqvae_trainer.create_state(config, jax.random.key(0)))
  call = pmapped_step(config, vqvae_trainer.train_steps, decoder_only)
  images = jnp.asarray(np.broadcast_to(batch, (1, per_call) + batch.shape))
  keys = jnp.stack([jax.random.key(i) for i in range(per_call)])
  flops = xla_flops(call.lower(p_state, images, keys).compile()) / per_call
  holder = {'state': p_state}
  calls = -(-steps // per_call)

  def run():
    for _ in range(calls):
      holder['state'], metrics = call(holder['state'], images, keys)
    jax.block_until_ready(metrics)
    return calls * per_call
  run()
  return run, flops


def torch_runner(config, batch, kind, compiled, steps: int, channels_last: bool = False, decoder_only: bool = False):
  import torch
  from bench import torch_vqvae
  torch.manual_seed(0)
  cfg = config.copy_and_resolve_references()
  cfg.upsample = kind
  model = torch_vqvae.VQVAE(cfg)
  images = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
  if channels_last:   # NHWC in memory, as oasis_jax's layout (torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  step = torch_vqvae.make_train_step(model, cfg.learning_rate, 0.08, ssim_weight=cfg.get('ssim_weight', 0.0),
                                     decoder_only=decoder_only)
  if compiled:
    step = torch.compile(step)

  def run(steps=steps):
    for _ in range(steps):
      loss = step(images)
    float(loss)
    return steps
  run(2)   # compile / warm up
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='seed,demo')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--torch', default='transpose-eager,transpose-compiled,subpixel-eager,subpixel-compiled,'
                      'subpixel-eager-channels_last,subpixel-compiled-channels_last',
                      help='PyTorch peers: UPSAMPLE-MODE[-channels_last] (memory_format=torch.channels_last)')
  parser.add_argument('--conv_impls', default='auto,auto+xla_transforms',
                      help='oasis_jax variants: config.conv_impl, +xla_transforms: Winograd minus native kernels')
  parser.add_argument('--steps_per_call', default='1,10',
                      help='oasis_jax variants (config.steps_per_call; the seed recipe\'s default: 10) to time')
  parser.add_argument('--batch_sizes', default='',
                      help="oasis_jax variants: global batch sizes (config.batch_size), e.g. 4,8; default: the "
                      "recipe's. The PyTorch peers run the recipe's")
  parser.add_argument('--decoder_only', action='store_true',
                      help="time stage 1's decoder-phase step (config.decoder_steps: the decoder alone trained, "
                      'encoder and codebook frozen) on both sides')
  args = parser.parse_args()
  for name in args.torch.split(','):
    kind, _, rest = name.partition('-')
    mode, _, layout = rest.partition('-')
    if kind not in ('transpose', 'subpixel') or mode not in ('eager', 'compiled') or layout not in ('', 'channels_last'):
      parser.error(f'--torch: {name!r} is not UPSAMPLE-MODE[-channels_last] (transpose or subpixel, eager or '
                   f'compiled)')
  peak = machine_header()
  summary = {'gemm_gflops': peak / 1e9, 'decoder_only': args.decoder_only, 'sizes': {}}
  for size in args.sizes.split(','):
    config = vqvae_configs.get_config('default' if size == 'seed' else size)
    batches = int_list(args.batch_sizes, config.batch_size)
    images = np.random.default_rng(0).random((max(batches + [config.batch_size]), config.image_size,
                                              config.image_size, 1), np.float32)
    batch = images[:config.batch_size]
    steps = 1 if size == 'seed' else 3
    runners, flops, batch_of = {}, {}, {}
    for spec in args.conv_impls.split(','):
      for per_call in args.steps_per_call.split(','):
        for size_of_batch in batches:
          impl, context = conv_variant(spec)
          config.conv_impl, config.steps_per_call = impl, int(per_call)
          name = f'oasis_jax {spec}, {per_call}/call' + (f', b{size_of_batch}' if len(batches) > 1 else '')
          with context:
            runners[name], flops[name] = jax_runner(config, images[:size_of_batch], steps, args.decoder_only)
          batch_of[name] = size_of_batch
    for name in args.torch.split(','):
      kind, mode, *layout = name.split('-')
      try:
        runners[f'torch {name}'] = torch_runner(config, batch, kind, mode == 'compiled', steps,
                                                layout == ['channels_last'], args.decoder_only)
        batch_of[f'torch {name}'] = config.batch_size
      except Exception as error:   # torch.compile needs a working C++ toolchain; report, don't hide
        print(f'  torch {name}: unavailable ({type(error).__name__}: {str(error).splitlines()[0][:120]})')
    medians = alternating_medians(runners, args.rounds)
    print(f'\n{size}: {config.image_size}x{config.image_size}, batch {config.batch_size}, hidden '
          f'{config.num_hiddens}, K={config.num_embeddings}, {args.rounds} alternating rounds of >= {steps} step(s)'
          + (', the decoder-phase step (decoder alone)' if args.decoder_only else ''))
    print(f'  {"implementation":40} {"s/step":>8} {"images/s":>9}')
    rates = {}
    for name, median in medians.items():
      rates[name] = batch_of[name] / median
      print(f'  {name:40} {median:8.3f} {rates[name]:9.2f}')
    best_torch = max((v for k, v in rates.items() if k.startswith('torch')), default=float('nan'))
    summary['sizes'][size] = {'images_per_s': rates}
    useful = model_flops(config, batch, args.decoder_only)
    print(f'  model: {useful / 1e9:.1f} GFLOP/step of {config.batch_size} with direct convolutions')
    for name in flops:
      achieved = useful * rates[name] / config.batch_size   # the model's FLOPs per image, at any batch
      print(f'  {name}: {rates[name] / best_torch:.2f}x the best torch;  useful {achieved / 1e9:.1f} GFLOP/s = '
            f'{achieved / peak:.1%} of the GEMM peak (executes {flops[name] / 1e9:.1f} GFLOP/step of '
            f'{batch_of[name]})', flush=True)
      summary['sizes'][size][name] = {'ratio_vs_best_torch': rates[name] / best_torch,
                                      'executed_gflop_per_step': flops[name] / 1e9,
                                      'useful_gflop_per_step': useful / 1e9, 'useful_fraction_of_gemm_peak':
                                      achieved / peak}
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
