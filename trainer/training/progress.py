"""A progress bar for local runs (tqdm); silent when disabled or when stderr is not a terminal
that wants one (tqdm's own `disable=None` rule)."""
from __future__ import annotations

from typing import Optional

from tqdm.auto import tqdm


class ProgressBar:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled)

    def update(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None) -> None:
        self._bar.n = step
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def write(self, message: str) -> None:
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
