"""A callback the DDP test loads by class path: each rank dumps what the test compares across ranks."""

import os

import lightning as L
import torch


class DDPProbe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.kl_coef_in_rollout = pl_module.kl_controller.value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rollout = pl_module.latest_rollout
        logged = trainer.callback_metrics
        self.records.append({
            "local_kl": float(rollout.kl.sum(1).mean()),
            "logged_kl": float(logged["objective/kl"]),
            "logged_non_score_reward": float(logged["objective/non_score_reward"]),
            "kl_coef_in_rollout": self.kl_coef_in_rollout,
            "prompts": list(rollout.prompts),
            "advantages": rollout.advantages.detach().cpu(),
            "mask": rollout.mask.detach().cpu(),
            "local_score": float(rollout.scores.mean()),
            "logged_score": float(trainer.callback_metrics["objective/scores"]),
            "kl_coef": pl_module.kl_controller.value,
            "threads": torch.get_num_threads(),
        })

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        weights = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save({"weights": weights, "records": self.records, "world_size": trainer.world_size},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


class FirstStepProbe(L.Callback):
    """Each rank dumps its first PPO iteration: the trained weights before it, the rollout, and the gradient of
    the first optimizer step (all-reduced across ranks, before clipping)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.record = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "weights" not in self.record:
            self.record["weights"] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            self.record["hparams"] = dict(pl_module.hparams)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if "gradients" not in self.record:
            self.record["gradients"] = {n: p.grad.detach().cpu().clone() for n, p in pl_module.named_parameters()
                                        if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "rollout" in self.record:
            return
        rollout = pl_module.latest_rollout
        self.record["rollout"] = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                                  for k, v in vars(rollout).items() if k != "stats"}
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(self.record, os.path.join(self.out_dir, f"first_step_rank{trainer.global_rank}.pt"))
