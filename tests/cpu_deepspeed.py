"""Lightning's DeepSpeed strategy on a CPU, for tests.

Lightning refuses DeepSpeed on anything but CUDA, while DeepSpeed itself runs ZeRO on a CPU
(``DS_ACCELERATOR=cpu``, gloo). This subclass lifts only that refusal, so the tests run lit-rlhf's real
DeepSpeed code paths (engine backward and clipping, checkpoint writing and loading) in 2 CPU processes.
"""

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA check, nothing else

    def setup_distributed(self) -> None:
        self.set_world_ranks()  # no GPU index validation
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed reads the process's rank from the device index
