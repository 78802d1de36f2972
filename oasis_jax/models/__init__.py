"""Models: pure Flax modules and functions (stage 1 VQ-VAE, stage 2 DCGAN), free of training code.

Their convolution layer is injected (`conv`, default `flax.linen.Conv`), as in flax's examples/imagenet."""
