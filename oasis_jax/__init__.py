"""oasis_jax: a VQ-VAE + DCGAN over codebook indices that generates brain MRI slices (OASIS)."""
