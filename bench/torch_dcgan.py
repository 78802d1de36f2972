"""The PyTorch peer of stage 2 for the benchmarks: oasis_jax.models.dcgan's generator (logits head, straight-through
Gumbel-softmax) and discriminator (minibatch std), the non-saturating loss with R1, Adam; NCHW as PyTorch writes it."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
  def __init__(self, code_size, k, width, latent_dim, upsample='subpixel', final_convs=0):
    super().__init__()
    if upsample not in ('subpixel', 'resize'):
      raise ValueError(f'upsample={upsample!r}: the PyTorch peer has subpixel and resize')
    self.levels = int(math.log2(code_size // 4))
    self.top = width * 2 ** self.levels
    self.dense = nn.Linear(latent_dim, 16 * self.top)
    layers = [nn.BatchNorm2d(self.top), nn.ReLU()]
    ch = self.top
    for level in range(self.levels):
      out = width * 2 ** (self.levels - level - 1)
      if upsample == 'resize':   # nearest-neighbour x2, then a 3x3 conv (oasis_jax's Upsample 'resize')
        layers += [nn.Upsample(scale_factor=2, mode='nearest'), nn.Conv2d(ch, out, 3, padding=1)]
      else:
        layers += [nn.Conv2d(ch, 4 * out, 3, padding=1), nn.PixelShuffle(2)]
      layers += [nn.BatchNorm2d(out), nn.ReLU()]
      ch = out
    for _ in range(final_convs):
      layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
    layers += [nn.Conv2d(ch, k, 3, padding=1)]
    self.body = nn.Sequential(*layers)

  def forward(self, z):
    return self.body(self.dense(z).view(z.shape[0], self.top, 4, 4))


class Discriminator(nn.Module):
  def __init__(self, code_size, d, width, group=4):
    super().__init__()
    layers, ch = [], d
    for level in range(int(math.log2(code_size // 4))):
      layers += [nn.Conv2d(ch, width * 2 ** level, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
      ch = width * 2 ** level
    self.body = nn.Sequential(*layers)
    self.group = group
    self.head = nn.Linear((ch + 1) * 16, 1)

  def forward(self, x):
    x = self.body(x)
    n, c, h, w = x.shape
    g = min(self.group, n)
    std = torch.sqrt(x.view(n // g, g, c, h, w).var(1, unbiased=False) + 1e-8).mean((1, 2, 3))
    x = torch.cat([x, std.repeat_interleave(g)[:, None, None, None].expand(n, 1, h, w)], 1)
    return self.head(x.flatten(1))[:, 0]


def make_train_step(generator, discriminator, codebook, latent_dim, learning_rate, r1_gamma=1.0, temperature=1.0,
                    r1_every=1, one_hot=False, channels_last=False):
  """The step oasis_jax's gan_trainer runs: one generator forward pass whose fakes train D (detached) and then G;
  R1 on real inputs every r1_every-th step, scaled by r1_every (lazy R1). one_hot: D sees one-hot codes [N, K, s, s]
  (config.discriminator_input='one_hot'), else codebook embeddings [N, D, s, s]. channels_last: both nets and what
  D sees are NHWC in memory (torch.channels_last)."""
  layout = torch.channels_last if channels_last else torch.contiguous_format
  generator.to(memory_format=layout)
  discriminator.to(memory_format=layout)
  g_opt = torch.optim.Adam(generator.parameters(), lr=learning_rate, betas=(0.5, 0.999))
  d_opt = torch.optim.Adam(discriminator.parameters(), lr=learning_rate, betas=(0.5, 0.999))
  k = codebook.shape[0]
  count = [0]

  def generate(n):
    logits = generator(torch.randn(n, latent_dim))
    noisy = logits - torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))
    hard = F.one_hot(noisy.argmax(1), k).permute(0, 3, 1, 2).float()
    soft = torch.softmax(noisy / temperature, 1)
    relaxed = hard + soft - soft.detach()
    return (relaxed if one_hot else torch.einsum('nkhw,kd->ndhw', relaxed, codebook)).contiguous(memory_format=layout)

  def step(real_codes):
    n = real_codes.shape[0]
    count[0] += 1
    with_r1 = r1_gamma > 0 and count[0] % r1_every == 0
    real = F.one_hot(real_codes, k).float() if one_hot else codebook[real_codes]
    real = real.permute(0, 3, 1, 2).contiguous(memory_format=layout).requires_grad_(with_r1)
    d_opt.zero_grad(set_to_none=True)
    fake = generate(n)
    real_logits = discriminator(real)
    loss = F.softplus(-real_logits).mean() + F.softplus(discriminator(fake.detach())).mean()
    if with_r1:
      grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
      loss = loss + r1_gamma / 2 * r1_every * grad.pow(2).sum((1, 2, 3)).mean()
    loss.backward()
    d_opt.step()
    g_opt.zero_grad(set_to_none=True)
    g_loss = F.softplus(-discriminator(fake)).mean()
    g_loss.backward()
    g_opt.step()
    return g_loss.detach()
  return step
