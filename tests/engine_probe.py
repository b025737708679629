"""A callback the vLLM negative-control test loads by class path: it withholds one weight sync from the engine."""

import lightning as L


class SkipEngineSync(L.Callback):
    """At PPO iteration ``iteration`` the engine keeps the previous iteration's weights (a stale adapter)."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.iteration == self.iteration:
            pl_module.producer.engine_iteration = pl_module.iteration  # the module now believes the engine is current
