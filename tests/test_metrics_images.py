import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from rayworld import images
from rayworld.images import save_curves, save_recon_grid
from rayworld.io import atomic_path
from rayworld.metrics import psnr, ssim


def smooth_images(n, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    f = torch.rand(n, 3, 1, 1, generator=g) * 6
    p = torch.rand(n, 3, 1, 1, generator=g) * 6
    return 0.5 + 0.4 * torch.sin(f * xx + p) * torch.cos(f * yy - p)


def skimage_ssim(x, y):
    return np.array([
        structural_similarity(a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(),
                              channel_axis=-1, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for a, b in zip(x, y)])


# ---------------------------------------------------------------- metrics

def test_psnr_identical_and_known_mse():
    x = torch.rand(3, 3, 16, 16)
    assert psnr(x, x).shape == (3,)
    assert torch.all(psnr(x, x) >= 90) and torch.isfinite(psnr(x, x)).all()
    y = torch.full((2, 3, 8, 8), 0.5)
    y_off = y.clone()
    y_off[0] += 0.1   # MSE 0.01 -> 20 dB
    y_off[1, :, :4] += 0.2  # MSE 0.02 -> 10*log10(50)
    got = psnr(y, y_off)
    assert got[0].item() == pytest.approx(20.0, abs=1e-4)
    assert got[1].item() == pytest.approx(10 * np.log10(50), abs=1e-4)
    assert psnr(y * 255, y_off * 255, data_range=255.0)[0].item() == pytest.approx(20.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["random", "smooth", "noisy_smooth"])
def test_ssim_matches_skimage(kind):
    torch.manual_seed(0)
    if kind == "random":
        x, y = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    elif kind == "smooth":
        x, y = smooth_images(4, seed=0), smooth_images(4, seed=1)
    else:
        x = smooth_images(4, 48, 40)
        y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    ours = ssim(x, y).numpy()
    ref = skimage_ssim(x, y)
    assert ours.shape == (4,)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert np.ptp(ref) > 1e-3 or kind == "random"  # the cases are not all the same value


def test_ssim_identical_is_one_and_ordered_by_noise():
    x = smooth_images(2)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    light, heavy = ssim(x, (x + 0.02 * noise).clamp(0, 1)), ssim(x, (x + 0.2 * noise).clamp(0, 1))
    assert torch.all(light > heavy) and torch.all(light < 1)


# ---------------------------------------------------------------- images

def frames(n, h=8, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_save_recon_grid_layout(tmp_path):
    orig, rec = frames(10), frames(10, seed=1)
    path = tmp_path / "grid.png"
    save_recon_grid(orig, rec, path, cols=4, scale=3)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (3 * 2 * 8 * 3, 4 * 6 * 3, 3)  # 3 row pairs of 4 columns
    up = lambda f: f.repeat(3, 0).repeat(3, 1)
    assert np.array_equal(img[:24, :18], up(orig[0]))
    assert np.array_equal(img[24:48, :18], up(rec[0]))
    assert np.array_equal(img[:24, 18:36], up(orig[1]))
    assert np.array_equal(img[48:72, :18], up(orig[4]))  # frame 4 starts the second pair
    assert np.array_equal(img[72:96, 18:36], up(rec[5]))
    assert os.listdir(tmp_path) == ["grid.png"]


def test_save_recon_grid_accepts_tensors_and_few_frames(tmp_path):
    orig = torch.from_numpy(frames(3))
    path = tmp_path / "sub" / "g.png"
    save_recon_grid(orig, orig.clone(), path)  # fewer frames than cols: narrower image
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (2 * 8 * 2, 3 * 6 * 2, 3)
    assert np.array_equal(img[:16, :12], orig[0].numpy().repeat(2, 0).repeat(2, 1))
    # Float NCHW in [0, 1] (straight from the VAE) is accepted too.
    as_float = orig.permute(0, 3, 1, 2).float() / 255
    save_recon_grid(as_float, as_float, path)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), img)
    with pytest.raises(ValueError):
        save_recon_grid(frames(3), frames(2), tmp_path / "bad.png")


def test_save_curves(tmp_path):
    path = tmp_path / "curves.png"
    save_curves({"loss": [3.0, 2.0, 1.5], "kl": [0.1, 0.2, 0.3], "empty": []}, path, title="vae")
    with Image.open(path) as im:
        assert im.format == "PNG"
        two = im.size
    save_curves({"loss": [1.0, 0.5], "empty": []}, tmp_path / "one.png")
    save_curves({"loss": [1.0, 0.5]}, tmp_path / "ref.png")
    with Image.open(tmp_path / "one.png") as im, Image.open(tmp_path / "ref.png") as ref:
        one = im.size
        assert one == ref.size  # empty series got no subplot
    assert two[0] > one[0]  # two panels are wider than one
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "one.png", "ref.png"]


def test_atomic_path_success_and_failure(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"original")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        assert not os.path.exists(path) or path.read_bytes() == b"original"
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.png"]


def test_save_functions_do_not_clobber_on_error(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    save_recon_grid(frames(2), frames(2), path)
    good = path.read_bytes()

    def failing_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(images.Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        save_recon_grid(frames(2, seed=5), frames(2, seed=6), path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["grid.png"]
