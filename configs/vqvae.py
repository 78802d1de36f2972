"""Stage-1 (VQ-VAE) recipes: `--config=configs/vqvae.py[:default|:demo|:tiny]`, fields overridable as --config.X=...

default: the original PyTorch project's recipe for OASIS, for an accelerator (Adam 1e-3, batch 32, 4 epochs, K=512, D=64, 64x64 codes).
demo:    what `make demo` runs on a 2-core CPU (narrower, K=64, 256x256 slices -> 32x32 codes).
tiny:    seconds, for tests (64x64 images, few channels).
"""
import ml_collections


def get_config(variant: str = 'default') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data: `demo` needs no download; `oasis_png` / `oasis_volumes` read config.data_dir (see README).
  config.dataset = 'demo'
  config.data_dir = ''
  config.cache_dir = ''          # '' = $OASIS_JAX_CACHE or ~/.cache/oasis_jax
  config.image_size = 256
  # Model.
  config.num_hiddens = 128
  config.num_residual_layers = 2
  config.num_residual_hiddens = 32
  config.embedding_dim = 64
  config.num_embeddings = 512
  config.num_downsamples = 2
  config.upsample = 'subpixel'   # 'transpose' (stride-2 transposed convs, as the original PyTorch project), 'resize'
  config.dtype = 'float32'       # or 'bfloat16' compute (params and quantiser stay float32)
  # How convolutions are computed (same parameters, same results up to float rounding): 'xla' (XLA's convolution
  # op), 'im2col' (one GEMM per layer), 'winograd' (F(4x4, 3x3) where it applies), 'taps' (3x3 layers as one GEMM
  # to every tap + a shift-and-add) or 'auto' (per layer, the faster on XLA:CPU by bench/conv_layers.py; see
  # docs/performance.md). On GPU/TPU 'xla' is the natural choice.
  config.conv_impl = 'auto'
  # Quantiser (Sonnet VectorQuantizerEMA).
  config.commitment_cost = 0.25
  config.ema_decay = 0.99
  config.ema_epsilon = 1e-5
  config.dead_code_fraction = 0.03  # restart codes used < 3 % of the uniform share
  # Loss: the reconstruction MSE (over the data variance) + commitment_cost x the commitment term. clip_margin > 0:
  # outputs that clipping to [0, 1] renders exactly, down to clip_margin below 0 on black pixels (and above 1 on
  # white ones), cost nothing, so the black background can come out exactly black instead of a faint haze.
  config.clip_margin = 0.05
  # + ssim_weight x (1 - SSIM) of the clipped reconstruction (0 = off): SSIM charges blurred detail more than MSE.
  config.ssim_weight = 0.0
  # Optimisation.
  config.seed = 0
  config.batch_size = 32
  config.learning_rate = 1e-3
  config.lr_schedule = 'constant'  # or 'cosine': linear warm-up, then cosine decay to 1 %
  config.num_epochs = 4
  config.num_train_steps = -1    # > 0 overrides num_epochs
  # Then decoder_steps more steps train the decoder alone (0 = none), on the codes of the encoder and codebook of the
  # joint steps' best checkpoint, frozen: reconstructions sharpen while the code maps stage 2 learns stay as they
  # are. Its rate: a warm-up, then cosine decay from decoder_learning_rate (0 = learning_rate) to 1 % of it.
  config.decoder_steps = 0
  config.decoder_learning_rate = 0.0
  # Train steps per compiled call (unrolled; a call ends early at a step that logs, evaluates or saves): XLA:CPU
  # page-faults a call's temporary buffers afresh each call, so steps sharing a call run faster, at the cost of a
  # longer first compile.
  config.steps_per_call = 10
  # Bookkeeping.
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.max_eval_images = -1    # -1: the whole validation split at each evaluation
  # The checkpoint kept in WORKDIR/best/ (what evaluate, train_gan.py and sample.py load): the highest validation
  # PSNR. SSIM swings with faint noise in the black background while PSNR rises steadily; 'ssim' is allowed.
  config.best_metric = 'psnr'

  if variant == 'demo':          # for a 2-core CPU: 32x32 code maps, narrow layers, batch 4
    config.steps_per_call = 5      # a shorter first compile than 10
    config.num_downsamples = 3
    config.num_hiddens = 64
    config.num_residual_hiddens = 32
    config.num_residual_layers = 1
    config.embedding_dim = 16
    config.num_embeddings = 64
    config.ema_decay = 0.95        # a short run: codes that fall out of use are restarted within ~70 steps
    config.ssim_weight = 0.25      # sharper sulci than the squared error alone (docs/quality.md)
    config.batch_size = 4          # 1000 steps of 4: as many slices as 500 of 8, twice the updates (docs/quality.md)
    config.learning_rate = 2e-3
    config.num_epochs = 0
    config.num_train_steps = 1000
    config.decoder_steps = 1000    # sharper reconstructions from the same code maps (docs/quality.md)
    config.decoder_learning_rate = 1e-3
    config.log_every_steps = 50
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 100
  elif variant == 'tiny':
    config.image_size = 64
    config.conv_impl = 'xla'     # at 64x64 and 8-16 channels compile time dominates; Winograd has its own tests
    config.steps_per_call = 5
    config.num_hiddens = 16
    config.num_residual_hiddens = 8
    config.num_residual_layers = 1
    config.embedding_dim = 8
    config.num_embeddings = 32
    config.batch_size = 8
    config.learning_rate = 3e-3
    config.num_epochs = 0
    config.num_train_steps = 30
    config.log_every_steps = 10
    config.eval_every_steps = 15
    config.checkpoint_every_steps = 10
  elif variant != 'default':
    raise ValueError(f'unknown variant {variant!r} of configs/vqvae.py: expected default, demo or tiny')
  return config
