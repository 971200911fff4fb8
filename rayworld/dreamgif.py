"""`rayworld dream-gif`: the controller (or the planner) in its dream (decoded by the VAE)
beside the real env."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rayworld import storage
from rayworld.config import Config
from rayworld.io import atomic_path


@torch.no_grad()
def dream_frames(runner, params, steps: int, seed: int, tau: float,
                 dropout: str = "off") -> list[np.ndarray]:
    """Decode one dream rollout of the controller, starting from the real env's first frame."""
    from rayworld.dream import BatchedDream

    obs, _ = runner.env.reset(seed=seed)
    runner.agent.set_params(params)
    runner.agent.reseed(seed)
    runner.agent.reset()
    dream = BatchedDream(runner.world, tau, steps, dropout)
    gen = torch.Generator().manual_seed(seed)
    dream.mask = dream.new_mask(1, 1, gen)
    z = runner.agent.encode(obs)
    state = runner.world.mdn.initial_state(1)
    frames = []
    for _ in range(steps):
        frames.append(_to_uint8(runner.agent.vae.decode(z)))
        action = runner.agent.decide(z, state)  # a planner plans inside this dream too
        z, state, _, done = dream.step(z, state, action, gen)
        if bool(done[0]):
            break
    return frames


def real_frames(runner, params, steps: int, seed: int) -> list[np.ndarray]:
    from rayworld.policies import run_episode

    runner.agent.set_params(params)
    runner.agent.reseed(seed)
    runner.agent.reset()
    return list(run_episode(runner.env, runner.agent, seed, steps)[0])


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def side_by_side(dream: list, real: list, scale: int = 3) -> list[Image.Image]:
    """Dream on the left, real on the right; the shorter one holds its last frame."""
    n = max(len(dream), len(real))
    out = []
    for t in range(n):
        d, r = dream[min(t, len(dream) - 1)], real[min(t, len(real) - 1)]
        gap = np.full((d.shape[0], 4, 3), 255, np.uint8)
        img = Image.fromarray(np.concatenate([d, gap, r], 1))
        out.append(img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST))
    return out


def dream_gif(cfg: Config, run_dir: Path, steps: int = 200, seed: int = 0,
              log=print) -> Path:
    from rayworld.evaluate import RealRunner
    from rayworld.policies import load_controller_params

    run_dir = Path(run_dir).resolve()
    params, _ = load_controller_params(run_dir)
    runner = RealRunner(str(run_dir), cfg.to_dict())
    try:
        dream = dream_frames(runner, params, steps, seed, cfg.evolve.tau, cfg.evolve.dropout)
        real = real_frames(runner, params, steps, seed)
    finally:
        runner.close()
    frames = side_by_side(dream, real)
    path = run_dir / "images" / "dream_vs_real.gif"
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=50,
                       loop=0)
    log(f"dream-gif: {len(dream)} dream steps (left) beside {len(real)} real steps (right) "
        f"in {storage.remote(path)}")
    return path
