"""Stage-2 (DCGAN over code maps) recipes: `--config=configs/gan.py[:default|:demo|:tiny]`.

`vqvae_workdir` names the stage-1 run whose encoder makes the real code maps and whose decoder renders samples.
`dataset`/`data_dir`/`cache_dir` left empty take the stage-1 run's.
"""
import ml_collections


def get_config(variant: str = 'default') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.vqvae_workdir = 'runs/vqvae'
  config.dataset = ''            # '' = the stage-1 run's dataset
  config.data_dir = ''
  config.cache_dir = ''
  # Model (DCGAN).
  config.latent_dim = 100
  config.generator_width = 64
  config.discriminator_width = 64
  config.generator_final_convs = 0  # 3x3 conv + batch norm + ReLU blocks at the code map's size before the head
  config.upsample = 'subpixel'   # generator upsampling: 'subpixel', 'transpose' (the DCGAN paper's) or 'resize'
  config.conv_impl = 'auto'      # as configs/vqvae.py: 'xla', 'im2col', 'winograd', 'taps' or 'auto'
  # How the generator respects discrete codes (README, "Stage 2 design"):
  #   'logits': K logits per position, straight-through Gumbel-softmax to one-hot codes (design a);
  #   'latent': a D-dim latent per position, nearest codebook vector, straight-through (design b).
  config.head = 'logits'
  config.gumbel_temperature = 1.0
  # The Gumbel noise's scale in training: 1 draws each position's code from softmax(logits), 0 takes argmax(logits),
  # so that a code map is a function of z alone (straight-through argmax). sample_gumbel_scale: the same when
  # drawing samples (sample.py, evaluate and the validation samples); below 1 sharpens the draw.
  config.gumbel_scale = 1.0
  config.sample_gumbel_scale = 1.0
  # What the discriminator sees of a code map: 'embedding' (one-hot codes @ the frozen stage-1 codebook, [s, s, D])
  # or 'one_hot' (the codes themselves, [s, s, K]: every two equally far apart; head 'logits' only; docs/quality.md
  # compares them).
  config.discriminator_input = 'embedding'
  config.latent_commitment = 0.25  # head 'latent': weight of ||latent - its codebook vector||^2
  # Stabilisers (0 = off). Without the minibatch-std feature and R1 the generator collapses to one slice (README,
  # "Stage 2 design").
  config.loss = 'nonsaturating'  # or 'hinge'
  config.r1_gamma = 1.0          # R1 gradient penalty on real code maps
  config.r1_every = 16           # lazy R1 (StyleGAN2): the penalty x r1_every on every r1_every-th step only
  config.minibatch_std_group = 4 # minibatch standard-deviation feature in the discriminator (group size)
  config.spectral_norm = False   # spectral normalisation of the discriminator's weights (Miyato et al. 2018)
  config.generator_ema = 0.0     # EMA decay of the generator weights that samples are drawn from (with a warm-up)
  # Head 'logits': weight of KL(the real codes' histogram || the generator's expected one) in the generator's loss,
  # over the global batch (0 = off): codes the discriminator cannot tell from near ones are not dropped.
  config.code_histogram_weight = 0.0
  config.code_histogram_scope = 'global'  # or 'position': the KL at each code-map position, averaged over them
  # DiffAugment (Zhao et al. 2020) of what the discriminator sees, real and generated alike: '' (none) or a
  # comma-separated subset of 'translation' (by up to augment_translation x the map's side) and 'cutout'.
  config.augment = ''
  config.augment_translation = 0.125
  # Optimisation (Radford et al.: Adam 2e-4, beta1 0.5).
  config.seed = 0
  config.batch_size = 64
  config.learning_rate = 2e-4
  config.discriminator_learning_rate = 0.0  # two time-scale rates (Heusel et al. 2017): D's rate; 0 = learning_rate
  config.beta1 = 0.5
  config.num_train_steps = 20000
  config.steps_per_call = 1      # train steps per compiled call: best a divisor of r1_every and of the intervals below
  # On CPU: split each step's batch over this many XLA:CPU devices, whose replicas run side by side and keep the
  # cores busy where one replica's small layers cannot (0: JAX's default; docs/performance.md). No effect on GPU/TPU.
  config.cpu_devices = 0
  # Bookkeeping.
  config.log_every_steps = 100
  config.sample_every_steps = 1000
  config.checkpoint_every_steps = 1000
  # Every sample_every_steps: eval_samples samples vs eval_images validation slices (SWD picks WORKDIR/best/).
  config.eval_samples = 64
  config.eval_images = 256

  if variant == 'demo':
    config.vqvae_workdir = 'runs/demo/vqvae'
    config.conv_impl = 'xla'       # 16/32-wide layers: 'auto' is no faster (docs/performance.md compares them)
    config.upsample = 'resize'     # nearest x2 + 3x3 conv: lower SWD than 'subpixel' (docs/quality.md)
    config.generator_width = 16    # the generator holds most of the step's FLOPs: at 16, 4000 steps fit the demo
    config.discriminator_width = 32
    config.generator_final_convs = 1  # lower SWD than none (docs/quality.md)
    config.batch_size = 16         # as many slices as 2000 steps of 32, twice the updates (docs/quality.md)
    config.learning_rate = 5e-4
    config.discriminator_learning_rate = 1e-3   # twice the generator's (docs/quality.md)
    config.sample_gumbel_scale = 0.5   # sharper draws: fewer stray codes in the background (docs/quality.md)
    config.num_train_steps = 4000
    config.steps_per_call = 4      # divides r1_every and the intervals: two compiled forms (with and without R1)
    config.cpu_devices = 2         # two replicas of 8 slices: 1.2-1.3x the steps/s on 2 cores (docs/performance.md)
    config.log_every_steps = 100
    config.sample_every_steps = 800
    config.checkpoint_every_steps = 800
  elif variant == 'tiny':
    config.generator_width = 8
    config.conv_impl = 'xla'       # tiny layers: compile time dominates
    config.discriminator_width = 8
    config.latent_dim = 16
    config.batch_size = 8
    config.learning_rate = 1e-3
    config.num_train_steps = 20
    config.steps_per_call = 2
    config.log_every_steps = 10
    config.sample_every_steps = 10
    config.checkpoint_every_steps = 10
    config.eval_samples = 16
    config.eval_images = 16
  elif variant != 'default':
    raise ValueError(f'unknown variant {variant!r} of configs/gan.py: expected default, demo or tiny')
  return config
