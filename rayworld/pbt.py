"""PopulationBasedTraining with its own random stream, so a sweep seed fixes every PBT draw.

Tune's PBT draws the donor trial and the explore step from Python's global `random`, and
resamples a value from numpy's global RNG; other code in the driver draws from both, at times
that depend on the machine's timing. Here each of the scheduler's calls swaps in its own state
of both and hands the global ones back, so with `synch` (every trial reaches the interval
before any is perturbed) and deterministic trials, a sweep repeats.
"""

from __future__ import annotations

import random

import numpy as np
from ray.tune.schedulers import PopulationBasedTraining


class SeededPBT(PopulationBasedTraining):
    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._rng_state = (random.Random(seed).getstate(),
                           np.random.RandomState(seed).get_state())

    def _own_random(self, fn, *args):
        outer = random.getstate(), np.random.get_state()
        random.setstate(self._rng_state[0])
        np.random.set_state(self._rng_state[1])
        try:
            return fn(*args)
        finally:
            self._rng_state = random.getstate(), np.random.get_state()
            random.setstate(outer[0])
            np.random.set_state(outer[1])

    def on_trial_add(self, tune_controller, trial):
        return self._own_random(super().on_trial_add, tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._own_random(super().on_trial_result, tune_controller, trial, result)
