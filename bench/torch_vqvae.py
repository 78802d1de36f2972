"""The PyTorch peer for the benchmarks: the same VQ-VAE as oasis_jax.models.vqvae (widths, depths, EMA quantiser, loss,
Adam), written the way the seed project wrote it (NCHW, nn.Conv2d, ConvTranspose2d or PixelShuffle upsampling)."""
import functools

import torch
import torch.nn.functional as F
from torch import nn


class ResidualStack(nn.Module):
  def __init__(self, hiddens, layers, residual_hiddens):
    super().__init__()
    self.layers = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(hiddens, residual_hiddens, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(residual_hiddens, hiddens, 1)) for _ in range(layers))

  def forward(self, x):
    for layer in self.layers:
      x = x + layer(x)
    return F.relu(x)


def upsample(in_ch, out_ch, kind):
  if kind == 'transpose':
    return nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)
  return nn.Sequential(nn.Conv2d(in_ch, 4 * out_ch, 3, padding=1), nn.PixelShuffle(2))


class VQVAE(nn.Module):
  def __init__(self, config):
    super().__init__()
    h, d, nd = config.num_hiddens, config.embedding_dim, config.num_downsamples
    enc, ch = [], 1
    for i in range(nd):
      width = h if i == nd - 1 else h // 2
      enc += [nn.Conv2d(ch, width, 4, stride=2, padding=1), nn.ReLU()]
      ch = width
    enc += [nn.Conv2d(ch, h, 3, padding=1),
            ResidualStack(h, config.num_residual_layers, config.num_residual_hiddens), nn.Conv2d(h, d, 1)]
    self.encoder = nn.Sequential(*enc)
    dec = [nn.Conv2d(d, h, 3, padding=1), ResidualStack(h, config.num_residual_layers, config.num_residual_hiddens)]
    for i in range(nd):
      last = i == nd - 1
      dec += [upsample(h if i == 0 else h // 2, 1 if last else h // 2, config.upsample)]
      if not last:
        dec += [nn.ReLU()]
    self.decoder = nn.Sequential(*dec)
    k = config.num_embeddings
    limit = (3.0 / d) ** 0.5
    self.register_buffer('codebook', torch.empty(k, d).uniform_(-limit, limit))
    self.register_buffer('ema_counts', torch.zeros(k))
    self.register_buffer('ema_sums', torch.zeros(k, d))
    self.register_buffer('ema_steps', torch.zeros(()))
    self.decay, self.epsilon = config.ema_decay, config.ema_epsilon

  def forward(self, images):
    z = self.encoder(images - 0.5)                                   # [N, D, s, s]
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    distances = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + (self.codebook ** 2).sum(1)
    codes = distances.argmin(1)
    quantized = self.codebook[codes].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    if self.training:
      with torch.no_grad():                                          # Sonnet's EMA update, zero-debiased
        one_hot = F.one_hot(codes, self.codebook.shape[0]).float()
        self.ema_steps += 1
        self.ema_counts.lerp_(one_hot.sum(0), 1 - self.decay)
        self.ema_sums.lerp_(one_hot.T @ flat, 1 - self.decay)
        correction = 1 - self.decay ** self.ema_steps
        counts, sums = self.ema_counts / correction, self.ema_sums / correction
        total = counts.sum()
        counts = (counts + self.epsilon) / (total + counts.shape[0] * self.epsilon) * total
        self.codebook.copy_(sums / counts[:, None])
    commitment = F.mse_loss(z, quantized.detach())
    return self.decoder(z + (quantized - z).detach()) + 0.5, commitment


@functools.lru_cache
def _window_matrix(size: int):
  """oasis_jax's SSIM window (11x11 Gaussian) along one axis of `size`, as the band matrix its filter multiplies by."""
  from oasis_jax import metrics
  return torch.from_numpy(metrics._valid_filter_matrix(size, metrics._gaussian_window()))


def ssim(x, y):
  """Per-image SSIM of [N, 1, H, W] images, the Gaussian window as the same matrix products as oasis_jax's."""
  rows, cols = (_window_matrix(n) for n in x.shape[2:])
  blur = lambda a: torch.einsum('ih,nhw,jw->nij', rows, a, cols)
  x, y = x[:, 0], y[:, 0]
  mu_x, mu_y = blur(x), blur(y)
  var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  return ((2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * (2 * cov + c2) / (var_x + var_y + c2)).mean((1, 2))


def make_train_step(model, learning_rate, data_variance, commitment_cost=0.25, ssim_weight=0.0,
                    decoder_only=False):
  """decoder_only: stage 1's decoder phase (config.decoder_steps) as PyTorch writes it: the encoder frozen
  (requires_grad off, so autograd records none of it), no codebook update (eval mode), Adam over the decoder."""
  if decoder_only:
    model.encoder.requires_grad_(False)
    model.eval()
  optimizer = torch.optim.Adam(model.decoder.parameters() if decoder_only else model.parameters(), lr=learning_rate)

  def step(images):
    optimizer.zero_grad(set_to_none=True)
    reconstruction, commitment = model(images)
    loss = F.mse_loss(reconstruction, images) / data_variance + commitment_cost * commitment
    if ssim_weight:   # config.ssim_weight: on the clipped reconstruction, as oasis_jax's loss
      loss = loss + ssim_weight * (1 - ssim(reconstruction.clamp(0, 1), images).mean())
    loss.backward()
    optimizer.step()
    return loss
  return step
