"""RSR apart from length: each teacher's effect at equal response length.

The fixed-effects fit log(rank_surprisal_ratio) ~ problem + teacher + log(resp_token_length) over the
matched trajectories. A teacher's effect is exp(b_teacher - mean of the teachers' b): the factor by which
its trajectories' RSR sits above (> 1) or below (< 1) the teachers' average at the same problem and length;
lower = more suitable at equal length, as RSR itself. The problem effects are absorbed by centring every
variable within its problem. Resamples weigh each problem by how often it was drawn, which centring leaves
unchanged (the weights are constant within a problem), so the centred variables are computed once.
"""

from __future__ import annotations

import numpy as np


def _centred(values: np.ndarray, problem: np.ndarray) -> np.ndarray:
    """Each column minus its mean within the row's problem."""
    sums = np.zeros((problem.max() + 1, values.shape[1]))
    np.add.at(sums, problem, values)
    counts = np.maximum(np.bincount(problem, minlength=len(sums)), 1)[:, None]
    return values - (sums / counts)[problem]


class LengthFit:
    """The fit on trajectories given as arrays: RSR, response length, teacher index (0..t-1) and problem
    index (0..n-1)."""

    def __init__(self, rsr: np.ndarray, length: np.ndarray, teacher: np.ndarray, problem: np.ndarray, n_teachers: int):
        dummies = (teacher[:, None] == np.arange(1, n_teachers)[None, :]).astype(float)  # the first teacher's b is 0
        self.design = _centred(np.column_stack([dummies, np.log(length)]), problem)
        self.target = _centred(np.log(rsr)[:, None], problem)[:, 0]
        self.problem = problem

    def effects(self, problem_weights: np.ndarray | None = None) -> np.ndarray:
        """[effect of each teacher..., length coefficient], the problems weighted by `problem_weights`
        (how often a resample drew each; all once by default)."""
        root = np.ones(len(self.target)) if problem_weights is None else np.sqrt(problem_weights[self.problem])
        coefficients = np.linalg.lstsq(self.design * root[:, None], self.target * root, rcond=None)[0]
        b = np.concatenate([[0.0], coefficients[:-1]])
        return np.concatenate([np.exp(b - b.mean()), coefficients[-1:]])
