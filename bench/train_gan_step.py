"""Stage-2 G+D train step: oasis_jax vs a PyTorch peer of the same models, and against this machine's GEMM peak.

    python -m bench.train_gan_step [--sizes=seed|demo] [--rounds=5] [--conv_impls=xla,auto,auto+xla_transforms]
        [--steps_per_call=1,4] [--batch_sizes=16,32] [--torch=eager,eager-channels_last]

seed: the `default` GAN recipe over the `default` stage 1 (64x64 code maps, K=512, D=64, batch 64, widths 64); demo:
the `demo` recipes (32x32 codes, K=64, D=16, batch 16, generator width 16, discriminator 32). Both with the logits
head, minibatch std and R1 as configured. oasis_jax's real pmapped calls (on config.cpu_devices XLA:CPU devices, or
--cpu_devices; config.steps_per_call steps each; --batch_sizes for other global batches) vs bench/torch_dcgan.py
eager and torch.compile, NCHW and channels-last, in alternating rounds; median images/s, the ratio, and useful
FLOP/s (XLA's cost analysis of the step written with direct convolutions, conv_impl=xla) vs the fp32 GEMM peak.
"""
import argparse
import functools
import json
import math

import jax
import numpy as np

from bench.train_step import alternating_medians, conv_variant, int_list, machine_header, xla_flops
from configs import gan as gan_configs
from configs import vqvae as vqvae_configs
from oasis_jax import parallel, sampling
from oasis_jax.training import gan_trainer


def pmapped_step(config, stage1, with_r1=True):
  generator, discriminator = sampling.make_models(config, stage1, axis_name=parallel.AXIS)
  return jax.pmap(functools.partial(gan_trainer.train_step, config=config, generator=generator,
                                    discriminator=discriminator, with_r1=with_r1),
                  axis_name=parallel.AXIS, donate_argnums=(0,), in_axes=(0, 0, None, None), devices=jax.devices()[:1])


def model_flops(config, stage1, real_codes, codebook) -> float:
  """FLOPs of one G+D step written with direct convolutions (XLA's cost analysis, before compiling), averaged over
  a lazy-R1 cycle (one step in config.r1_every has the penalty); the whole batch on one device."""
  config = config.copy_and_resolve_references()
  config.conv_impl = 'xla'
  states = jax.tree.map(lambda x: np.asarray(x)[None], gan_trainer.create_states(config, stage1, jax.random.key(0)))
  flops = lambda with_r1: xla_flops(pmapped_step(config, stage1, with_r1).lower(
      states, real_codes[None], jax.random.key(1), codebook))
  if config.r1_every == 1:
    return flops(True)
  return (flops(True) + (config.r1_every - 1) * flops(False)) / config.r1_every


def jax_runner(config, stage1, real_codes, codebook):
  """Calls as train_gan.py makes them: config.steps_per_call steps each, lazy R1 (config.r1_every > 1) on the steps
  gan_trainer.r1_pattern names."""
  calls = gan_trainer.train_calls(config, *sampling.make_models(config, stage1, axis_name=parallel.AXIS))
  per_call = config.steps_per_call
  holder = {'states': parallel.replicate(gan_trainer.create_states(config, stage1, jax.random.key(0))), 'step': 0}
  split = real_codes.reshape((jax.local_device_count(), 1, -1) + real_codes.shape[1:])   # [devices, 1, per device..]
  codes = np.broadcast_to(split, split.shape[:1] + (per_call,) + split.shape[2:])
  keys = jax.random.split(jax.random.key(1), per_call)

  def run(steps):
    assert steps % per_call == 0, (steps, per_call)
    for _ in range(steps // per_call):
      first, holder['step'] = holder['step'] + 1, holder['step'] + per_call
      pattern = gan_trainer.r1_pattern(config, first, holder['step'])
      holder['states'], metrics = calls(pattern)(holder['states'], codes, keys, codebook)
    jax.block_until_ready(metrics)
    return steps
  run(config.r1_every)   # compiles every form
  return run


def torch_runner(config, stage1, real_codes, codebook, compiled, channels_last=False):
  import torch
  from bench import torch_dcgan
  torch.manual_seed(0)
  size = sampling.code_size(stage1)
  generator = torch_dcgan.Generator(size, stage1.num_embeddings, config.generator_width, config.latent_dim,
                                   config.upsample, config.get('generator_final_convs', 0))
  discriminator = torch_dcgan.Discriminator(size, gan_trainer.discriminator_channels(config, stage1),
                                            config.discriminator_width, config.minibatch_std_group)
  step = torch_dcgan.make_train_step(generator, discriminator, torch.from_numpy(np.asarray(codebook)),
                                     config.latent_dim, config.learning_rate, config.r1_gamma,
                                     r1_every=config.r1_every, one_hot=gan_trainer.sees_one_hot(config),
                                     channels_last=channels_last)
  if compiled:
    step = torch.compile(step)
  codes = torch.from_numpy(np.asarray(real_codes, np.int64))

  def run(steps):
    for _ in range(steps):
      loss = step(codes)
    float(loss)
    return steps
  run(max(2, config.r1_every))   # a whole lazy-R1 cycle: a compiled step that cannot run R1 fails here
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='seed')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--r1_every', default='', help="Lazy R1 intervals to time (config.r1_every), e.g. 1,16; "
                      "default: the recipe's. The PyTorch peers run the recipe's.")
  parser.add_argument('--discriminator_input', default='', choices=['', 'embedding', 'one_hot'],
                      help="config.discriminator_input, for oasis_jax and the PyTorch peers; default: the recipe's")
  parser.add_argument('--upsample', default='', choices=['', 'subpixel', 'resize'],
                      help="config.upsample, for oasis_jax and the PyTorch peers; default: the recipe's")
  parser.add_argument('--steps_per_call', default='',
                      help="oasis_jax variants: steps per compiled call (config.steps_per_call), e.g. 1,4; default: "
                      "the recipe's")
  parser.add_argument('--batch_sizes', default='',
                      help="oasis_jax variants: global batch sizes (config.batch_size), e.g. 16,32; default: the "
                      "recipe's. The PyTorch peers run the recipe's")
  parser.add_argument('--cpu_devices', type=int, default=-1,
                      help="XLA:CPU devices oasis_jax splits the batch over (config.cpu_devices); default: the "
                      "recipe's. One per process: a device of several runs slower than a process's only one")
  parser.add_argument('--torch', default='eager,compiled,eager-channels_last,compiled-channels_last',
                      help='PyTorch peers: MODE[-channels_last] (memory_format=torch.channels_last)')
  parser.add_argument('--conv_impls', default='xla,auto,auto+xla_transforms',
                      help='oasis_jax variants: config.conv_impl, +xla_transforms: Winograd minus native kernels')
  args = parser.parse_args()
  for peer in args.torch.split(','):
    mode, *layout = peer.split('-')
    if mode not in ('eager', 'compiled') or layout not in ([], ['channels_last']):
      parser.error(f'--torch: {peer!r} is not MODE[-channels_last] with MODE eager or compiled')
  sizes = args.sizes.split(',')
  recipes = {size: gan_configs.get_config('default' if size == 'seed' else size) for size in sizes}
  counts = {args.cpu_devices} if args.cpu_devices >= 0 else {recipes[size].cpu_devices for size in sizes}
  if len(counts) > 1:
    parser.error(f'--sizes={args.sizes}: their recipes run on different numbers of CPU devices (config.cpu_devices); '
                 f'run them one size at a time, or pass --cpu_devices')
  jax.config.update('jax_num_cpu_devices', max(counts.pop(), 1))
  peak = machine_header()
  summary = {'gemm_gflops': peak / 1e9, 'sizes': {}}
  for size in sizes:
    config, stage1 = recipes[size], vqvae_configs.get_config('default' if size == 'seed' else size)
    config.discriminator_input = args.discriminator_input or config.discriminator_input
    config.upsample = args.upsample or config.upsample
    s, k = sampling.code_size(stage1), stage1.num_embeddings
    rng = np.random.default_rng(0)
    batches = int_list(args.batch_sizes, config.batch_size)
    recipe_batch = config.batch_size
    all_codes = rng.integers(0, k, (max(batches + [recipe_batch]), s, s)).astype(np.int32)
    real_codes = all_codes[:recipe_batch]
    codebook = rng.standard_normal((k, stage1.embedding_dim)).astype(np.float32)
    runners, batch_of = {}, {}
    recipe_r1_every = config.r1_every
    r1_intervals = int_list(args.r1_every, recipe_r1_every)
    per_calls = int_list(args.steps_per_call, config.steps_per_call)
    for spec in args.conv_impls.split(','):   # 'auto+xla_transforms': Winograd without the native kernels
      for r1_every in r1_intervals:
        for per_call in per_calls:
          for batch in batches:
            config.conv_impl, context = conv_variant(spec)
            config.r1_every, config.steps_per_call, config.batch_size = r1_every, per_call, batch
            name = (f'oasis_jax conv {spec}' + (f' r1/{r1_every}' if len(r1_intervals) > 1 else '')
                    + (f' x{per_call}' if len(per_calls) > 1 else '') + (f' b{batch}' if len(batches) > 1 else ''))
            with context:
              runners[name] = jax_runner(config, stage1, all_codes[:batch], codebook)   # traces here
            batch_of[name] = batch
    config.r1_every, config.batch_size = recipe_r1_every, recipe_batch
    flops = model_flops(config, stage1, real_codes, codebook)
    for peer in args.torch.split(','):
      mode, *layout = peer.split('-')
      try:
        runners[f'torch {peer}'] = torch_runner(config, stage1, real_codes, codebook, mode == 'compiled',
                                                layout == ['channels_last'])
        batch_of[f'torch {peer}'] = recipe_batch
      except Exception as error:
        print(f'  torch {peer}: unavailable ({type(error).__name__}: {str(error).splitlines()[0][:120]})')
    cycle = math.lcm(*r1_intervals, *per_calls)   # whole lazy-R1 cycles of whole calls
    steps = cycle * -(-(2 if size == 'seed' else 5) // cycle)
    medians = alternating_medians({name: functools.partial(run, steps) for name, run in runners.items()},
                                  args.rounds)
    print(f'\n{size}: {s}x{s} code maps, K={k}, D={stage1.embedding_dim}, batch {config.batch_size}, widths '
          f'{config.generator_width}, {config.upsample} upsampling, discriminator on {config.discriminator_input}, '
          f'oasis_jax on {jax.local_device_count()} CPU device(s); {args.rounds} alternating rounds of {steps} steps')
    rates = {}
    for name, median in medians.items():
      rates[name] = batch_of[name] / median
      print(f'  {name:32} {median:8.3f} s/step {rates[name]:9.1f} images/s')
    best_torch = max((v for n, v in rates.items() if n.startswith('torch')), default=float('nan'))
    summary['sizes'][size] = {'images_per_s': rates, 'useful_gflop_per_step': flops / 1e9}
    for name in rates:
      if name.startswith('oasis_jax'):
        achieved = flops * rates[name] / config.batch_size   # the model's FLOPs per image, at any batch
        print(f'  {name}: {rates[name] / best_torch:.2f}x the best torch;  {flops / 1e9:.2f} GFLOP per step of '
              f'{config.batch_size}, useful '
              f'{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of the GEMM peak', flush=True)
        summary['sizes'][size][name] = {'ratio_vs_best_torch': rates[name] / best_torch,
                                        'useful_fraction_of_gemm_peak': achieved / peak}
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
