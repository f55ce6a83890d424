"""A progress bar for local runs (tqdm). Off when disabled, and when stderr is not a terminal
(tqdm's `disable=None`): in a pod's log a redrawn bar is noise, so an enabled bar there prints a
plain line every `text_every` steps instead. `write()` lines (eval losses, SIGTERM) always print,
except with `silent=True` (ranks other than 0 under torchrun: one rank reports for the run)."""
from __future__ import annotations

from typing import Optional

from tqdm.auto import tqdm


class ProgressBar:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train", text_every: int = 10,
                 silent: bool = False):
        self.silent = silent
        enabled = enabled and not silent
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=None if enabled else True)
        self._text_every = text_every if enabled and self._bar.disable else 0
        self.total = total

    def update(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None, **extra: float) -> None:
        """`extra`: further numbers to show beside the loss (DPO: reward accuracy and margin)."""
        self._bar.n = step
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        postfix.update({key: f"{value:.3f}" for key, value in extra.items() if value is not None})
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()
        if self._text_every and (step % self._text_every == 0 or step == self.total):
            self.write(f"step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in postfix.items()))

    def write(self, message: str) -> None:
        if not self.silent:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
