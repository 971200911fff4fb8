"""MDN-RNN world model: LSTM over (z_t, a_t) predicting p(z_{t+1}), reward and done."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

# Keeps exp/square in range: sigma in [~9e-4, ~20] covers VAE latents comfortably.
LOG_SIGMA_MIN = -7.0
LOG_SIGMA_MAX = 3.0
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
REWARD_FROM = ("h", "latents")
SMALL_BATCH = 16  # MDNRNN.step: up to this many rows, torch.lstm_cell beats nn.LSTM's kernel


class MDNOut(NamedTuple):
    logit_pi: torch.Tensor   # [B, T, Z, K]
    mu: torch.Tensor         # [B, T, Z, K]
    log_sigma: torch.Tensor  # [B, T, Z, K]
    reward: torch.Tensor     # [B, T]
    done_logit: torch.Tensor # [B, T]
    h: torch.Tensor          # [B, T, H]


class MDNRNN(nn.Module):
    def __init__(self, latent: int = 32, action_dim: int = 3, hidden: int = 256, mixtures: int = 5,
                 action_n: int = 0, dropout: float = 0.0, ensemble: int = 1,
                 reward_from: str = "h"):
        """action_n > 0: discrete actions, given as an index [..., 1], enter the LSTM one-hot.

        An index fed as a number would tell the LSTM that action 3 lies between 2 and 4.
        dropout: on h where it enters the heads (the recurrent state is never dropped). The
        dream can keep it on, as Dropout's Dream Land does, with masks from `dropout_mask`.
        ensemble: E sets of heads (mixture, reward, done) on one shared LSTM. Sharing h keeps
        one state space, so a controller on [z, h] reads every member the same way; the
        members disagree where the data is thin. With E > 1 every MDNOut field but h gets a
        leading member dim [E, ...]; `select_member` picks one member per row.
        reward_from: "h", a linear head on the LSTM state; or "latents", a small MLP on
        (z_t, z_{t+1}): the reward then follows what the frames show (the car moving along
        the road), so a dream whose h drifts off the data cannot pay for what it does not
        show. forward() needs z_next for it; a dream step calls `latent_reward` after
        sampling z_{t+1}.
        """
        super().__init__()
        if action_n and action_dim != 1:
            raise ValueError(f"MDNRNN: action_n {action_n} needs action_dim 1 (the index), got "
                             f"{action_dim}")
        self.latent, self.action_dim, self.action_n = latent, action_dim, action_n
        self.hidden, self.mixtures, self.dropout = hidden, mixtures, float(dropout)
        if ensemble < 1:
            raise ValueError(f"MDNRNN: ensemble must be at least 1, got {ensemble}")
        self.ensemble = int(ensemble)
        self.lstm = nn.LSTM(latent + (action_n or action_dim), hidden, batch_first=True)
        self.mdn_head = nn.Linear(hidden, ensemble * 3 * latent * mixtures)
        if reward_from not in REWARD_FROM:
            raise ValueError(f"MDNRNN: reward_from {reward_from!r}, expected one of {REWARD_FROM}")
        self.reward_from = reward_from
        if reward_from == "h":
            self.reward_head = nn.Linear(hidden, ensemble)
        else:
            self.reward_head = nn.Sequential(nn.Linear(2 * latent, hidden), nn.ELU(),
                                             nn.Linear(hidden, ensemble))
        self.done_head = nn.Linear(hidden, ensemble)

    def initial_state(self, batch: int, device=None):
        device = device if device is not None else self.mdn_head.weight.device
        zeros = torch.zeros(1, batch, self.hidden, device=device)
        return zeros, zeros.clone()

    def _members_first(self, t: torch.Tensor) -> torch.Tensor:
        """[..., E] -> [...] for one model, [E, ...] for an ensemble."""
        return t.squeeze(-1) if self.ensemble == 1 else t.movedim(-1, 0)

    def latent_reward(self, z: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
        """reward_from "latents": the reward of the step z -> z_next ([...] or [E, ...])."""
        return self._members_first(self.reward_head(torch.cat([z, z_next], dim=-1)))

    def _heads(self, h: torch.Tensor, reward=None) -> MDNOut:
        lead, e = h.shape[:-1], self.ensemble
        p = self.mdn_head(h).view(*lead, e, self.latent, 3, self.mixtures)
        p = p.squeeze(-4) if e == 1 else p.movedim(-4, 0)
        if reward is None:  # "latents" without z_next: no reward yet
            raw = self.reward_head(h) if self.reward_from == "h" else h.new_zeros(*lead, e)
            reward = self._members_first(raw)
        done = self._members_first(self.done_head(h))
        return MDNOut(logit_pi=p[..., 0, :], mu=p[..., 1, :], log_sigma=p[..., 2, :],
                      reward=reward, done_logit=done, h=h)

    def action_input(self, a: torch.Tensor) -> torch.Tensor:
        if self.action_n:
            return F.one_hot(a.squeeze(-1).long(), self.action_n)
        return a

    def forward(self, z: torch.Tensor, a: torch.Tensor, state=None, h_mask=None, z_next=None):
        """h_mask [B, H]: a dropout mask (already scaled) for the heads' input, else the
        module's own dropout while training. z_next: the next latents, for reward_from
        "latents" (teacher forcing)."""
        h, state = self.lstm(torch.cat([z, self.action_input(a).to(z.dtype)], dim=-1), state)
        reward = None
        if self.reward_from == "latents" and z_next is not None:
            reward = self.latent_reward(z, z_next)
        if h_mask is not None:
            out = self._heads(h * h_mask.unsqueeze(1).to(h.dtype), reward)
            return out._replace(h=h), state
        if self.training and self.dropout > 0:
            return self._heads(F.dropout(h, self.dropout), reward), state
        return self._heads(h, reward), state

    def step(self, z: torch.Tensor, a: torch.Tensor, state=None, h_mask=None):
        """One step for B parallel dreams: forward with T=1, in as few kernels as the batch
        allows. Dreams and planners spend nearly all their time here.

        The LSTM: nn.LSTM's own kernel (oneDNN on CPU) for a batch of rollouts; for a few rows
        (an agent in the real env, a planner's small batch) torch.lstm_cell, which skips
        nn.LSTM's per-call set-up (a third of the time at batch 1). The heads: one matmul for
        the mixture, reward and done heads together. No autograd (eval mode).
        """
        if self.training:  # dropout and autograd as forward() has them
            out, state = self.forward(z.unsqueeze(1), a.unsqueeze(1), state, h_mask)
            t_dim = 2 if self.ensemble > 1 else 1  # after the member dim
            return MDNOut(*(t.squeeze(t_dim) for t in out[:-1]), out.h.squeeze(1)), state
        if state is None:
            state = self.initial_state(len(z), z.device)
        x = torch.cat([z, self.action_input(a).to(z.dtype)], dim=1)
        lstm = self.lstm
        if len(z) <= SMALL_BATCH:
            h, c = torch.lstm_cell(x, (state[0][0], state[1][0]), lstm.weight_ih_l0,
                                   lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
            state = (h.unsqueeze(0), c.unsqueeze(0))
        else:
            h, state = lstm(x.unsqueeze(1), state)
            h = h.squeeze(1)
        read = h if h_mask is None else h * h_mask.to(h.dtype)
        w_heads, b_heads, packed = self._fused_heads()
        if packed is not None and read.is_cpu and len(read) > 2:
            heads = torch.ops.mkldnn._linear_pointwise(read.contiguous(), packed, b_heads,
                                                       "none", [], "")
        else:
            heads = torch.addmm(b_heads, read, w_heads)
        e, n_mdn = self.ensemble, self.mdn_head.out_features
        p = heads[:, :n_mdn].view(len(h), e, self.latent, 3, self.mixtures)
        p = p.squeeze(1) if e == 1 else p.movedim(1, 0)
        reward = self._members_first(heads[:, n_mdn:n_mdn + e] if self.reward_from == "h" else
                                     h.new_zeros(len(h), e))
        done = self._members_first(heads[:, -e:])
        return MDNOut(logit_pi=p[..., 0, :], mu=p[..., 1, :], log_sigma=p[..., 2, :],
                      reward=reward, done_logit=done, h=h), state

    def _fused_heads(self):
        """Every head's weights side by side, rebuilt when any of them changes (an optimiser
        step or load_state_dict bumps a parameter's version): (weight^T, bias, the weight
        packed for oneDNN or None). On CPU, oneDNN's matmul (what nn.LSTM uses) runs this one
        about twice as fast as the BLAS behind addmm on this size, and more on AMD CPUs."""
        heads = [self.mdn_head] + ([self.reward_head] if self.reward_from == "h" else []) + \
            [self.done_head]
        params = [t for m in heads for t in (m.weight, m.bias)]
        key = tuple((t.data_ptr(), t._version) for t in params)
        if getattr(self, "_heads_key", None) != key:
            with torch.no_grad():
                weight = torch.cat([m.weight for m in heads])
                self._heads_fused = (weight.t().contiguous(), torch.cat([m.bias for m in heads]),
                                     _packed(weight))
            self._heads_key = key
        return self._heads_fused

    def dropout_mask(self, batch: int, generator=None, device=None) -> torch.Tensor:
        """An inverted-dropout mask [B, H] at the trained rate (all ones without dropout)."""
        device = device if device is not None else self.mdn_head.weight.device
        keep = torch.rand(batch, self.hidden, generator=generator, device=device) >= self.dropout
        return keep.float() / (1.0 - self.dropout)


def _packed(weight: torch.Tensor):
    """`weight` laid out for torch's oneDNN linear op, or None where that op is missing (a
    GPU tensor, a build without oneDNN): MDNRNN.step then uses addmm."""
    if not weight.is_cpu or weight.dtype != torch.float32 or \
            not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1024)
        x = torch.zeros(4, weight.shape[1])
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return packed
    except (AttributeError, RuntimeError):
        return None


def select_member(out: MDNOut, member) -> MDNOut:
    """One member's view of an ensemble's output: `member` an integer (every row) or a
    LongTensor [B] (row b reads member[b]). Outputs of a single model pass through."""
    if out.reward.dim() < out.h.dim():  # a single model: no member dim
        return out
    if not isinstance(member, torch.Tensor) or member.dim() == 0:
        return MDNOut(*(t[int(member)] for t in out[:-1]), out.h)
    rows = torch.arange(len(member), device=out.h.device)
    return MDNOut(*(t[member, rows] for t in out[:-1]), out.h)


def _component_log_prob(out: MDNOut, z_next: torch.Tensor) -> torch.Tensor:
    """log p(z_next) per latent dim, marginalised over the K components."""
    log_sigma = out.log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
    x = z_next.unsqueeze(-1)
    log_n = -0.5 * ((x - out.mu) * torch.exp(-log_sigma)).pow(2) - log_sigma - _LOG_SQRT_2PI
    return torch.logsumexp(F.log_softmax(out.logit_pi, dim=-1) + log_n, dim=-1)


def _masked_mean(values: torch.Tensor, mask, weights=None) -> torch.Tensor:
    """Mean over the steps in `mask`; `weights` (broadcast to values) weighs them further."""
    if mask is None and weights is None:
        return values.mean()
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else \
        mask.to(torch.bool).expand_as(values)
    w = keep.to(values.dtype)
    if weights is not None:
        w = w * weights.to(values.dtype)
    # where() rather than multiply alone, so NaN/inf in padding cannot leak in
    total = (torch.where(keep, values, torch.zeros_like(values)) * w).sum()
    return total / w.sum().clamp(min=1)


def mdn_nll(out: MDNOut, z_next: torch.Tensor, mask=None, weights=None) -> torch.Tensor:
    nll = -_component_log_prob(out, z_next).mean(-1)  # paper averages over latent dims
    return _masked_mean(nll, mask, weights)


def mdn_loss(out: MDNOut, z_next, reward, done, mask=None, z_mask=None,
             reward_weight: float = 1.0, done_weight: float = 1.0,
             done_pos_weight: float = 1.0, weights=None, reward_mask=None) -> dict:
    """z_mask (default: mask) excludes steps without a next frame from the NLL only.

    An ensemble's output ([E, ...] fields) gives the members' mean loss; `weights` [E, B, 1]
    weighs each member's rows (the online bootstrap that makes members differ).
    reward_mask (default: mask): a reward read from (z_t, z_{t+1}) has none without z_{t+1}.
    """
    if z_mask is None:
        z_mask = mask
    nll = mdn_nll(out, z_next, z_mask, weights)
    reward_mse = _masked_mean((out.reward - reward.to(out.reward.dtype)).pow(2),
                              mask if reward_mask is None else reward_mask, weights)
    done_f = done.to(out.done_logit.dtype).expand_as(out.done_logit)
    pos_weight = torch.tensor(float(done_pos_weight), dtype=done_f.dtype, device=done_f.device)
    bce = F.binary_cross_entropy_with_logits(out.done_logit, done_f, pos_weight=pos_weight,
                                             reduction="none")
    done_bce = _masked_mean(bce, mask, weights)
    with torch.no_grad():
        done_acc = _masked_mean(((out.done_logit > 0) == (done_f > 0.5)).to(done_f.dtype), mask)
    loss = nll + reward_weight * reward_mse + done_weight * done_bce
    return {"loss": loss, "nll": nll, "reward_mse": reward_mse, "done_bce": done_bce,
            "done_acc": done_acc}


@torch.no_grad()
def sample_next(out_step: MDNOut, tau: float = 1.0, generator=None, noise=None) -> torch.Tensor:
    """Sample z_{t+1} [..., Z]; tau scales logits (1/tau) and sigma (sqrt(tau)).

    tau <= 0 gives the deterministic mean of the most likely component. `noise` = (u, eps),
    both shaped like z: u in [0, 1) picks the component by inverse CDF, eps is the Gaussian
    draw. Passing the same noise to several rollouts gives them common random numbers.
    """
    logits, mu = out_step.logit_pi, out_step.mu
    if tau <= 0:
        idx = logits.argmax(-1, keepdim=True)
        return mu.gather(-1, idx).squeeze(-1)
    if noise is None:
        shape, dev = mu.shape[:-1], mu.device
        noise = (torch.rand(shape, generator=generator, device=dev),
                 torch.randn(shape, generator=generator, device=dev))
    u, eps = noise
    x = logits.float() if tau == 1 else logits.float() / tau
    # inverse CDF: cheaper than multinomial, and a shared u makes a shared choice. The CDF is
    # left unnormalised (u scaled by its total instead): softmax over a last dim of K = 5
    # costs a dream step more than the rest of its sampling together.
    cdf = (x - x.amax(-1, keepdim=True)).exp_().cumsum(-1)
    idx = (cdf < u.unsqueeze(-1) * cdf[..., -1:]).sum(-1, keepdim=True) \
        .clamp_(max=logits.shape[-1] - 1)
    mean = mu.gather(-1, idx).squeeze(-1)
    # the chosen component's sigma only: clamping all K first would do K times the work
    log_sigma = out_step.log_sigma.gather(-1, idx).squeeze(-1).clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
    sigma = log_sigma.exp() if tau == 1 else log_sigma.exp() * math.sqrt(tau)
    return mean + sigma * eps.to(mean.dtype)
