"""Callbacks the CLI tests load by class path (``--trainer.callbacks+=run_probes.SignalAt``): they act on a run
from inside, as a preemption or a crash would."""

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send this process ``signal_name`` (TERM, INT, KILL) at the end of its ``batch``-th training batch
    (counted over the whole run, a resumed part included), like a preemption or an out-of-memory kill."""

    def __init__(self, batch: int, signal_name: str = "TERM"):
        self.batch, self.signum = batch, getattr(signal, f"SIG{signal_name}")

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.fit_loop.total_batch_idx + 1 == self.batch:
            os.kill(os.getpid(), self.signum)
