"""Per-image reconstruction metrics (PSNR, SSIM) in torch, for NCHW float images."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # Half precision loses the small variances SSIM depends on.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    x, y = _as_float(x), _as_float(y)
    mse = (x - y).pow(2).flatten(1).mean(1).clamp(min=1e-10)  # identical images -> 100 dB, not inf
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, dtype, device) -> torch.Tensor:
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
         win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image over channels and 'valid' window positions.

    Valid convolution equals skimage's filter-then-crop-borders, so results match
    structural_similarity(gaussian_weights=True, use_sample_covariance=False).
    """
    x, y = _as_float(x), _as_float(y)
    c = x.shape[1]
    w = _gaussian_window(win_size, sigma, c, x.dtype, x.device)
    filt = lambda t: F.conv2d(t, w, groups=c)
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x * mu_x
    syy = filt(y * y) - mu_y * mu_y
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
