"""CPU forms of the models' operations: convolutions as Winograd / im2col / taps GEMMs (with native XLA:CPU tile
kernels) and vectorised exact arg-min and arg-max. Same parameters and results as the plain forms, faster on XLA:CPU.

`layers(conv_impl)` and `argmax()` are the places that pick them: on XLA:CPU they return these forms, on GPU/TPU the
plain ones (`flax.linen.Conv`, `jnp.argmin`, `jnp.argmax`) without importing the native-kernel builder."""
import functools

from oasis_jax.errors import check_choice

CONV_IMPLS = ('xla', 'im2col', 'winograd', 'taps', 'auto')


def layers(conv_impl: str = 'xla') -> dict:
  """The models' injected layers, {'conv': a flax.linen.Conv-like module class, 'argmin': last-axis arg-min}.

  On XLA:CPU: `convolution.Conv` in the form `conv_impl` names (one of CONV_IMPLS; 'auto' picks per layer) and the
  vectorised `reductions.argmin`. Elsewhere: `flax.linen.Conv` and `jnp.argmin` (GPU/TPU libraries choose their own
  convolution algorithms). The parameters are the same either way, so a checkpoint loads into both."""
  import jax
  if jax.default_backend() != 'cpu':
    import flax.linen as nn
    from oasis_jax.models.vqvae import argmin_last
    return {'conv': nn.Conv, 'argmin': argmin_last}
  from oasis_jax.ops import convolution, reductions
  check_choice({'conv_impl': conv_impl}, 'conv_impl', CONV_IMPLS)
  return {'conv': functools.partial(convolution.Conv, impl=conv_impl), 'argmin': reductions.argmin}


def argmax():
  """The last-axis arg-max (int32, the first index among ties) for this backend: the vectorised
  `reductions.argmax` on XLA:CPU, `jnp.argmax` elsewhere."""
  import jax
  if jax.default_backend() != 'cpu':
    from oasis_jax.models.dcgan import argmax_last
    return argmax_last
  from oasis_jax.ops import reductions
  return reductions.argmax
