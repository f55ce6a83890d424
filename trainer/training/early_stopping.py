"""Early stopping on the held-out loss (`early_stopping: {patience, min_delta}`), as transformers'
EarlyStoppingCallback: an eval improves when it beats the best so far by more than min_delta; after
`patience` evals in a row without improvement the run stops. The recipe checkpoints each new best
and keeps it through pruning, and reports it at the end."""
from __future__ import annotations

import math
from typing import Optional


class EarlyStopping:
    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss = math.inf
        self.best_step: Optional[int] = None
        self.evals_without_improvement = 0

    def update(self, step: int, eval_loss: float) -> bool:
        """Record an eval; True when it is a new best (the recipe then checkpoints it)."""
        if eval_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step = eval_loss, step
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.evals_without_improvement >= self.patience
