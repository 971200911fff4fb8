"""World Models controller: a tiny policy on [z, h], evolved with CMA-ES."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

KINDS = ("linear", "mlp")


class Controller(nn.Module):
    def __init__(self, latent: int = 32, hidden: int = 256, action_dim: int = 3,
                 kind: str = "linear", mlp_hidden=(64,), discrete: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown controller kind {kind!r}; allowed kinds: {', '.join(KINDS)}")
        self.kind, self.discrete, self.action_dim = kind, discrete, action_dim
        self.hidden = hidden  # 0: the controller reads z alone (it is still handed h)
        sizes = [latent + hidden] + (list(mlp_hidden) if kind == "mlp" else []) + [action_dim]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def logits(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, h[..., :self.hidden]], dim=-1))

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.to_action(self.logits(z, h))

    def to_action(self, o: torch.Tensor) -> torch.Tensor:
        """The last layer's output -> the env's action (a population shares this step)."""
        if self.discrete:
            return o.argmax(-1)
        o = torch.tanh(o)
        if self.action_dim != 3:
            return o
        # CarRacing: steer in [-1,1], gas in [0,1], brake in [0,1] (paper's mapping).
        return torch.stack([o[..., 0], (o[..., 1] + 1) / 2, o[..., 2].clamp(0, 1)], dim=-1)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_flat(self) -> np.ndarray:
        return torch.nn.utils.parameters_to_vector(self.parameters()).detach().cpu().double().numpy()

    def set_flat(self, vec) -> None:
        vec = np.array(vec, dtype=np.float64).ravel()  # a copy: Ray hands out read-only arrays
        if vec.size != self.num_params:
            raise ValueError(f"expected {self.num_params} parameters, got {vec.size}")
        ref = next(self.parameters())
        t = torch.as_tensor(vec, dtype=ref.dtype, device=ref.device)
        offset = 0
        with torch.no_grad():
            for p in self.parameters():  # copy_ keeps storage, so optimizers/refs stay valid
                p.copy_(t[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
