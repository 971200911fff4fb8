import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from rayworld.models import (
    MDNRNN,
    Controller,
    ConvVAE,
    MDNOut,
    kl_beta,
    mdn_loss,
    mdn_nll,
    sample_next,
    to_float,
    vae_loss,
)
from rayworld.models.mdn import LOG_SIGMA_MAX, LOG_SIGMA_MIN

# ---------------------------------------------------------------- VAE

def structured_images(n, seed=0):
    """Disks of random colour on random horizontal gradients: easy to overfit, not noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    imgs = []
    for _ in range(n):
        colour = torch.rand(3, 1, 1, generator=g)
        cx, cy, r = torch.randint(16, 48, (3,), generator=g).float()
        disk = (((xx - cx) ** 2 + (yy - cy) ** 2) < (r / 3 + 4) ** 2).float()
        bg = (xx / 63)[None] * torch.rand(3, 1, 1, generator=g)
        imgs.append(bg * (1 - disk) + colour * disk)
    return torch.stack(imgs)


def test_vae_shapes_and_range():
    torch.manual_seed(0)
    vae = ConvVAE(latent=16)
    x = torch.rand(5, 3, 64, 64)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, 16)
    assert vae.decode(mu).shape == (5, 3, 64, 64)
    x_hat, mu2, logvar2 = vae(x)
    assert x_hat.shape == (5, 3, 64, 64)
    assert torch.equal(mu, mu2) and torch.equal(logvar, logvar2)
    assert x_hat.min() >= 0 and x_hat.max() <= 1


def test_vae_parameter_count_matches_paper_architecture():
    conv = lambda cin, cout, k: cin * cout * k * k + cout
    enc = conv(3, 32, 4) + conv(32, 64, 4) + conv(64, 128, 4) + conv(128, 256, 4)
    heads = 2 * (1024 * 32 + 32)
    dec = (32 * 1024 + 1024) + conv(1024, 128, 5) + conv(128, 64, 5) + conv(64, 32, 6) + conv(32, 3, 6)
    n = sum(p.numel() for p in ConvVAE().parameters())
    assert n == enc + heads + dec == 4_348_547


def test_vae_eval_is_deterministic_train_is_stochastic():
    torch.manual_seed(0)
    vae = ConvVAE()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        # Large logvar so the sampled z is visibly different from mu.
        vae.fc_logvar.bias.fill_(4.0)
        vae.eval()
        a, mu, _ = vae(x)
        b, _, _ = vae(x)
        assert torch.equal(a, b)
        assert torch.allclose(a, vae.decode(mu))
        vae.train()
        c, _, _ = vae(x)
        assert not torch.allclose(a, c)


def test_vae_loss_values():
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full_like(x, 0.5)
    mu = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    logvar = torch.zeros(2, 2)
    out = vae_loss(x, x_hat, mu, logvar, beta=2.0, kl_tolerance=0.0)
    assert out["recon"].item() == pytest.approx(48 * 0.25)  # summed over pixels, batch mean
    # KL(N(3,1)||N(0,1)) = 4.5 for sample 0, 0 for sample 1 -> batch mean 2.25.
    assert out["kl"].item() == pytest.approx(2.25)
    assert out["loss"].item() == pytest.approx(12.0 + 2.0 * 2.25)


def test_vae_foreground_weight_charges_the_pixels_that_move():
    from rayworld.models.vae import foreground

    x = torch.zeros(5, 3, 4, 4)
    for i in range(5):
        x[i, :, i % 4, 1] = 1.0  # a "ball" in a new row of each frame; the rest is static
    mask = foreground(x)
    assert mask.shape == (5, 1, 4, 4) and mask.sum().item() == 5  # the ball, nothing else
    assert mask[2, 0, 2, 1] == 1.0 and mask[2, 0, 0, 0] == 0.0
    mu, logvar = torch.zeros(5, 2), torch.zeros(5, 2)
    blank = torch.zeros_like(x)  # a reconstruction that drops the ball
    plain = vae_loss(x, blank, mu, logvar, kl_tolerance=0.0)["recon"].item()
    weighted = vae_loss(x, blank, mu, logvar, kl_tolerance=0.0, foreground_weight=9.0)
    assert plain == pytest.approx(3.0) and weighted["recon"].item() == pytest.approx(30.0)
    static = x.clone()  # an error on a static pixel costs the same either way
    static[:, 0, 3, 3] = 0.5
    assert vae_loss(static, x, mu, logvar, kl_tolerance=0.0, foreground_weight=9.0)[
        "recon"].item() == pytest.approx(0.25)


def test_vae_free_bits_clamp():
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full_like(x, 0.5)
    mu = torch.full((2, 8), 0.1, requires_grad=True)
    logvar = torch.zeros(2, 8)
    out = vae_loss(x, x_hat, mu, logvar, beta=1.0, kl_tolerance=0.5)
    raw_kl = 0.5 * 8 * 0.01
    assert out["kl"].item() == pytest.approx(raw_kl)  # raw value reported
    assert out["loss"].item() == pytest.approx(12.0 + 0.5 * 8)  # floor used in the loss
    out["loss"].backward()
    assert torch.all(mu.grad == 0)  # under the floor: no pressure on the latents
    # Above the floor the KL itself is used.
    big = vae_loss(x, x_hat, torch.full((2, 8), 2.0), logvar, beta=1.0, kl_tolerance=0.5)
    assert big["loss"].item() == pytest.approx(12.0 + 0.5 * 8 * 4.0)


def test_kl_beta_schedule():
    assert kl_beta(0, 1.0, 100) == 0.0
    assert kl_beta(50, 1.0, 100) == pytest.approx(0.5)
    assert kl_beta(25, 4.0, 100) == pytest.approx(1.0)
    assert kl_beta(100, 1.0, 100) == 1.0
    assert kl_beta(10_000, 1.0, 100) == 1.0
    assert kl_beta(0, 0.7, 0) == pytest.approx(0.7)


def test_to_float():
    frames = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    frames[0, 1, 2] = [255, 0, 51]
    x = to_float(frames)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])
    seq = to_float(torch.from_numpy(np.stack([frames, frames])))  # [B, T, H, W, C]
    assert seq.shape == (2, 2, 3, 64, 64)


def test_vae_overfits_small_batch():
    torch.manual_seed(0)
    x = structured_images(6)
    vae = ConvVAE()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    vae.eval()
    with torch.no_grad():
        before = vae_loss(x, *vae(x))["recon"].item()
    vae.train()
    for _ in range(150):
        loss = vae_loss(x, *vae(x))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        after = vae_loss(x, *vae(x))["recon"].item()
    assert after < 0.15 * before, (before, after)


# ---------------------------------------------------------------- MDN-RNN

def test_mdn_forward_shapes():
    m = MDNRNN(latent=6, action_dim=2, hidden=16, mixtures=4)
    out, (h, c) = m(torch.randn(3, 7, 6), torch.randn(3, 7, 2))
    assert isinstance(out, MDNOut)
    for t in (out.logit_pi, out.mu, out.log_sigma):
        assert t.shape == (3, 7, 6, 4)
    assert out.reward.shape == out.done_logit.shape == (3, 7)
    assert out.h.shape == (3, 7, 16)
    assert h.shape == c.shape == (1, 3, 16)
    assert torch.allclose(h[0], out.h[:, -1])
    h0, c0 = m.initial_state(3)
    assert h0.shape == (1, 3, 16) and torch.all(h0 == 0) and torch.all(c0 == 0)


@pytest.mark.parametrize("with_state", [False, True])
def test_mdn_step_matches_forward(with_state):
    torch.manual_seed(0)
    m = MDNRNN(latent=5, action_dim=3, hidden=12, mixtures=3)
    z, a = torch.randn(4, 6, 5), torch.randn(4, 6, 3)
    state = (torch.randn(1, 4, 12), torch.randn(1, 4, 12)) if with_state else None
    full, full_state = m(z, a, state)
    s = state
    for t in range(6):
        out, s = m.step(z[:, t], a[:, t], s)
        for name in MDNOut._fields:
            step_v, seq_v = getattr(out, name), getattr(full, name)[:, t]
            assert step_v.shape == seq_v.shape
            assert torch.allclose(step_v, seq_v, atol=1e-6), name
    assert torch.allclose(s[0], full_state[0], atol=1e-6)
    assert torch.allclose(s[1], full_state[1], atol=1e-6)


def make_out(logit_pi, mu, log_sigma):
    lead = logit_pi.shape[:-2]
    return MDNOut(logit_pi, mu, log_sigma, torch.zeros(lead), torch.zeros(lead), torch.zeros(*lead, 1))


def test_mdn_nll_single_component_equals_gaussian():
    torch.manual_seed(0)
    mu, log_sigma = torch.randn(2, 3, 4, 1), torch.randn(2, 3, 4, 1) * 0.5
    z = torch.randn(2, 3, 4)
    out = make_out(torch.randn(2, 3, 4, 1), mu, log_sigma)
    ref = -D.Normal(mu[..., 0], log_sigma[..., 0].exp()).log_prob(z).mean()
    assert mdn_nll(out, z).item() == pytest.approx(ref.item(), rel=1e-5)


def test_mdn_nll_mixture_equals_torch_distributions_and_respects_mask():
    torch.manual_seed(1)
    shape = (2, 5, 3, 4)
    out = make_out(torch.randn(shape), torch.randn(shape), torch.randn(shape) * 0.5)
    z = torch.randn(2, 5, 3)
    mix = D.MixtureSameFamily(D.Categorical(logits=out.logit_pi), D.Normal(out.mu, out.log_sigma.exp()))
    per_step = -mix.log_prob(z).mean(-1)  # [B, T], averaged over latent dims
    assert mdn_nll(out, z).item() == pytest.approx(per_step.mean().item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    z_pad = z.clone()
    z_pad[0, 3:] = float("nan")  # padding must not leak into the average
    expected = per_step[mask.bool()].mean()
    assert mdn_nll(out, z_pad, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert mdn_nll(out, z, torch.zeros(2, 5)).item() == 0.0  # no valid steps: 0, not NaN


def test_mdn_nll_extremes_are_finite_with_finite_gradients():
    shape = (2, 3, 4, 5)
    for log_sigma_value in (-1e4, -50.0, 0.0, 50.0, 1e4):
        mu = torch.zeros(shape, requires_grad=True)
        log_sigma = torch.full(shape, log_sigma_value, requires_grad=True)
        logits = torch.randn(shape) * 1e3
        logits.requires_grad_(True)
        out = make_out(logits, mu, log_sigma)
        nll = mdn_nll(out, torch.full((2, 3, 4), 1e4))
        assert torch.isfinite(nll), log_sigma_value
        nll.backward()
        for p in (mu, log_sigma, logits):
            assert torch.isfinite(p.grad).all(), log_sigma_value
    # Clamping: below the minimum behaves as the minimum.
    z = torch.full((1, 1, 1), 0.01)
    lo = mdn_nll(make_out(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)), z)
    at = mdn_nll(make_out(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), LOG_SIGMA_MIN)), z)
    assert lo.item() == pytest.approx(at.item())
    assert LOG_SIGMA_MIN < LOG_SIGMA_MAX


def test_mdn_loss_terms_masks_and_weights():
    B, T, Z, K = 2, 4, 3, 2
    out = make_out(torch.zeros(B, T, Z, K), torch.zeros(B, T, Z, K), torch.zeros(B, T, Z, K))
    out = out._replace(reward=torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]),
                       done_logit=torch.tensor([[-5.0, -5.0, 5.0, 5.0], [5.0, -5.0, 0.0, 0.0]]))
    reward = torch.tensor([[1.0, 2.0, 5.0, 100.0], [1.0, 1.0, 0.0, 0.0]])
    done = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    z_next = torch.zeros(B, T, Z)
    d = mdn_loss(out, z_next, reward, done, mask=mask)
    assert set(d) == {"loss", "nll", "reward_mse", "done_bce", "done_acc"}
    assert d["reward_mse"].item() == pytest.approx((0 + 0 + 4 + 1 + 1) / 5)
    assert d["done_acc"].item() == pytest.approx(4 / 5)  # sample 1 step 0 is wrong
    assert d["loss"].item() == pytest.approx((d["nll"] + d["reward_mse"] + d["done_bce"]).item())
    # Positive weighting raises the loss on positive targets only.
    d5 = mdn_loss(out, z_next, reward, done, mask=mask, done_pos_weight=5.0)
    assert d5["done_bce"] > d["done_bce"]
    # z_mask defaults to mask; a different z_mask changes only the NLL.
    z_far = z_next.clone()
    z_far[0, 2] = 3.0
    a = mdn_loss(out, z_far, reward, done, mask=mask)
    b = mdn_loss(out, z_far, reward, done, mask=mask, z_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]]))
    assert a["nll"].item() == pytest.approx(mdn_nll(out, z_far, mask).item())
    assert b["nll"] < a["nll"]
    assert b["reward_mse"] == a["reward_mse"] and b["done_bce"] == a["done_bce"]
    w = mdn_loss(out, z_far, reward, done, mask=mask, reward_weight=0.0, done_weight=2.0)
    assert w["loss"].item() == pytest.approx((w["nll"] + 2 * w["done_bce"]).item())


def mixture_step(n):
    """n copies of one 1-D mixture with 3 separated components, shaped like `step` output."""
    logits = torch.tensor([1.0, 0.2, -0.5]).expand(n, 1, 3)
    mu = torch.tensor([-2.0, 0.5, 3.0]).expand(n, 1, 3)
    sigma = torch.tensor([0.3, 0.5, 0.2])
    out = MDNOut(logits, mu, sigma.log().expand(n, 1, 3), torch.zeros(n), torch.zeros(n), torch.zeros(n, 4))
    return out, logits[0, 0].softmax(-1), mu[0, 0], sigma


def test_sample_next_tau_one_matches_mixture_statistics():
    n = 40_000
    out, pi, mu, sigma = mixture_step(n)
    z = sample_next(out, tau=1.0, generator=torch.Generator().manual_seed(0))
    assert z.shape == (n, 1)
    mean = (pi * mu).sum()
    var = (pi * (sigma ** 2 + mu ** 2)).sum() - mean ** 2
    assert z.mean().item() == pytest.approx(mean.item(), abs=4 * math.sqrt(var / n))
    assert z.var().item() == pytest.approx(var.item(), rel=0.03)
    # Component frequencies: each sample lies near exactly one separated mean.
    comp = (z - mu).abs().argmin(-1)
    freq = torch.bincount(comp, minlength=3).float() / n
    assert torch.allclose(freq, pi, atol=0.015)


def test_sample_next_low_tau_concentrates_on_top_component():
    n = 5_000
    out, pi, mu, sigma = mixture_step(n)
    g = torch.Generator().manual_seed(0)
    z = sample_next(out, tau=1e-3, generator=g)
    assert z.mean().item() == pytest.approx(mu[0].item(), abs=0.01)
    assert z.std().item() == pytest.approx(sigma[0].item() * math.sqrt(1e-3), rel=0.1)
    z_hot = sample_next(out, tau=2.0, generator=g)
    assert z_hot.var() > sample_next(out, tau=1.0, generator=g).var()
    # tau <= 0: deterministic top-component mean.
    assert torch.all(sample_next(out, tau=0.0) == mu[0])
    # Same generator seed, same samples.
    a = sample_next(out, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(out, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def toy_sequences(batch, seq_len, gen, latent=4):
    """z_{t+1} = z_t rotated pairwise by an action-dependent angle; linear reward; threshold done."""
    z = torch.randn(batch, latent, generator=gen)
    a = torch.rand(batch, seq_len, 2, generator=gen) * 2 - 1
    zs = [z]
    for t in range(seq_len):
        theta = (0.3 + 0.2 * a[:, t, 0])[:, None]
        x, y = z[:, 0::2], z[:, 1::2]
        z = torch.stack([x * theta.cos() - y * theta.sin(), x * theta.sin() + y * theta.cos()], -1)
        z = z.reshape(batch, latent)
        zs.append(z)
    zs = torch.stack(zs, 1)
    z_in, z_next = zs[:, :-1], zs[:, 1:]
    reward = z_in @ torch.tensor([0.5, -1.0, 0.25, 0.8]) + 0.5 * a[..., 1]
    done = (z_in[..., 0] > 0.5).float()
    return z_in, a, z_next, reward, done


def test_mdn_learns_toy_dynamics_reward_and_done():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    m = MDNRNN(latent=4, action_dim=2, hidden=64, mixtures=3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    val = toy_sequences(64, 16, gen)

    def evaluate():
        with torch.no_grad():
            return {k: v.item() for k, v in mdn_loss(m(val[0], val[1])[0], *val[2:]).items()}

    before = evaluate()
    for _ in range(300):
        z_in, a, z_next, reward, done = toy_sequences(64, 16, gen)
        loss = mdn_loss(m(z_in, a)[0], z_next, reward, done)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    base_rate = 1 - val[4].mean().item()  # accuracy of always predicting "not done"
    assert after["nll"] < min(0.0, before["nll"] - 1.5), (before, after)
    assert after["reward_mse"] < 0.1 * before["reward_mse"], (before, after)
    assert after["done_bce"] < 0.5 * before["done_bce"], (before, after)
    assert after["done_acc"] > max(0.9, base_rate + 0.15), (base_rate, after)


# ---------------------------------------------------------------- Controller

def test_controller_param_counts():
    assert Controller().num_params == 867 == (32 + 256) * 3 + 3
    assert Controller(kind="mlp", mlp_hidden=(64,)).num_params == 288 * 64 + 64 + 64 * 3 + 3
    assert Controller(kind="mlp", mlp_hidden=(16, 8), action_dim=4).num_params == (
        288 * 16 + 16 + 16 * 8 + 8 + 8 * 4 + 4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_controller_flat_round_trip(kind):
    c = Controller(kind=kind)
    flat = c.get_flat()
    assert flat.dtype == np.float64 and flat.shape == (c.num_params,)
    new = np.random.default_rng(0).standard_normal(c.num_params).astype(np.float32).astype(np.float64)
    c.set_flat(new)
    assert np.array_equal(c.get_flat(), new)
    c2 = Controller(kind=kind)
    c2.set_flat(c.get_flat())
    z, h = torch.randn(5, 32), torch.randn(5, 256)
    assert torch.equal(c(z, h), c2(z, h))
    with pytest.raises(ValueError):
        c.set_flat(new[:-1])


def test_controller_action_ranges_and_mapping():
    c = Controller()
    c.set_flat(np.random.default_rng(1).standard_normal(c.num_params) * 3)
    act = c(torch.randn(1000, 32), torch.randn(1000, 256))
    assert act.shape == (1000, 3)
    steer, gas, brake = act.unbind(-1)
    assert steer.min() >= -1 and steer.max() <= 1 and steer.min() < -0.9 and steer.max() > 0.9
    assert gas.min() >= 0 and gas.max() <= 1 and gas.min() < 0.1 and gas.max() > 0.9
    assert brake.min() == 0 and brake.max() <= 1 and brake.max() > 0.9
    # Zero weights: actions are the mapped biases.
    w = np.zeros(c.num_params)
    w[-3:] = [0.5, 0.0, -0.5]
    c.set_flat(w)
    act = c(torch.zeros(1, 32), torch.zeros(1, 256))[0]
    assert act.tolist() == pytest.approx([math.tanh(0.5), 0.5, 0.0])


def test_controller_bad_kind_and_discrete():
    with pytest.raises(ValueError, match="linear.*mlp"):
        Controller(kind="transformer")
    c = Controller(action_dim=6, discrete=True)
    z, h = torch.randn(50, 32), torch.randn(50, 256)
    act = c(z, h)
    assert act.dtype == torch.long and act.shape == (50,)
    assert torch.equal(act, c.net(torch.cat([z, h], -1)).argmax(-1))
    assert len(set(act.tolist())) > 1


def test_controller_on_z_alone_ignores_h_and_has_fewer_params():
    from rayworld.config import load_config
    from rayworld.policies import make_controller

    zh = make_controller(load_config(None, []), 32, 256, 3, False)
    z_only = make_controller(load_config(None, ["controller.inputs=z"]), 32, 256, 3, False)
    assert (zh.num_params, z_only.num_params) == (289 * 3, 33 * 3)
    torch.manual_seed(0)
    z, h1, h2 = torch.randn(5, 32), torch.randn(5, 256), torch.randn(5, 256)
    assert torch.equal(z_only(z, h1), z_only(z, h2))
    assert not torch.equal(zh(z, h1), zh(z, h2))
    # the batched dream evaluates it the same way, one candidate per row block
    from rayworld.dream import Population

    pop = Population(z_only, np.stack([z_only.get_flat()] * 2), repeats=5)
    torch.testing.assert_close(pop(z.repeat(2, 1), h1.repeat(2, 1)), z_only(z, h1).repeat(2, 1))


@pytest.mark.parametrize("ensemble,reward_from,masked,discrete",
                         [(1, "h", False, False), (3, "h", True, False),
                          (1, "latents", True, False), (2, "latents", False, True)])
def test_fused_step_matches_the_lstm_and_heads_it_fuses(ensemble, reward_from, masked, discrete):
    """A dream step (two matmuls) gives what forward() gives, step after step."""
    torch.manual_seed(0)
    mdn = MDNRNN(latent=6, action_dim=1 if discrete else 3, hidden=16, mixtures=4,
                 action_n=5 if discrete else 0, dropout=0.2, ensemble=ensemble,
                 reward_from=reward_from).eval()
    z = torch.randn(7, 6)
    mask = mdn.dropout_mask(7) if masked else None
    fused = slow = None
    for _ in range(5):
        a = torch.randint(5, (7, 1)) if discrete else torch.rand(7, 3)
        out, fused = mdn.step(z, a, fused, mask)
        ref, slow = mdn.forward(z.unsqueeze(1), a.unsqueeze(1), slow, mask)
        t_dim = 2 if ensemble > 1 else 1
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want.squeeze(t_dim) if want is not ref.h
                                       else want.squeeze(1), rtol=1e-5, atol=1e-6)
        for got, want in zip(fused, slow):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        z = out.mu[..., 0] if ensemble == 1 else out.mu[0, ..., 0]
    # new weights (a training step, load_state_dict) are picked up
    with torch.no_grad():
        mdn.done_head.bias += 1.0
    out, _ = mdn.step(z, a, fused, mask)
    ref, _ = mdn.forward(z.unsqueeze(1), a.unsqueeze(1), slow, mask)
    torch.testing.assert_close(out.done_logit, ref.done_logit.squeeze(t_dim), rtol=1e-5,
                               atol=1e-6)
