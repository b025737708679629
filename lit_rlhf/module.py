"""``PPOModule``: one ``training_step`` is one PPO iteration (rollout, rewards, advantages, PPO epochs).

The Lightning hooks live here; producing rollouts is :mod:`lit_rlhf.experience`, the update
:mod:`lit_rlhf.update`, evaluation :mod:`lit_rlhf.evaluation`, the recipe's checks :mod:`lit_rlhf.recipe_checks`.
"""

from __future__ import annotations

import resource
import time
import warnings
from contextlib import AbstractContextManager
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor, nn

from lit_rlhf import ppo as ppo_math
from lit_rlhf import recipe_checks
from lit_rlhf.checkpoints import ExactResume, plain_hyperparameters
from lit_rlhf.configs import (
    EvaluationConfig,
    OptimizerConfig,
    PPOConfig,
    ReferenceConfig,
    RewardConfig,
    optimizer_and_schedule,
)
from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import evaluate, evaluate_before_training
from lit_rlhf.environments import Environment, environment_summary
from lit_rlhf.experience import Rollout, RolloutProducer, SingleTurnProducer
from lit_rlhf.host_memory import mmap_large_allocations
from lit_rlhf.multiturn import MultiTurnProducer
from lit_rlhf.models import (
    PolicyConfig,
    disable_dropout,
    init_value_head_from_reward,
    load_frozen_reference,
    load_generation_config,
    load_policy,
    load_tokenizer,
    model_context_length,
    response_forward,
)
from lit_rlhf.ranks import Ranks, adapt_strategy, no_gradient_sync, parameters_are_sharded
from lit_rlhf.rewards import FunctionReward, HTTPReward, load_rewards
from lit_rlhf.rollout import SamplingConfig, stop_token_ids
from lit_rlhf.sharding import shard_policy
from lit_rlhf.update import PPOUpdate

# Frozen models and the policy are kept in eval mode on purpose: dropout stays off in rollouts and PPO passes.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)

__all__ = ["PPOModule", "Rollout", "peak_memory_gb"]


class PPOModule(ExactResume, L.LightningModule):
    """PPO for a LoRA policy with a value head, against a frozen reference and a reward.

    One ``training_step`` is one PPO iteration: a rollout (:mod:`lit_rlhf.experience`), its advantages
    (:mod:`lit_rlhf.advantages`, inside the rollout), then the update (:mod:`lit_rlhf.update`).
    """

    MODEL_SECTIONS_THAT_MUST_MATCH = ("policy", "reward", "reference")  # a resume refuses other ones

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        reward: RewardConfig = RewardConfig(),
        reference: ReferenceConfig = ReferenceConfig(),
        generation: SamplingConfig = SamplingConfig(),
        ppo: PPOConfig = PPOConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        evaluation: EvaluationConfig = EvaluationConfig(),
        environment: Optional[Environment] = None,
        release_host_memory: bool = True,
    ) -> None:
        """
        Args:
            policy: The trained causal LM, its LoRA adapter and value head.
            reward: The reward model or function.
            reference: The frozen reference; by default the policy with its adapter off.
            generation: Sampling settings of the rollouts.
            ppo: PPO hyper-parameters.
            optimizer: Optimizer and learning-rate schedule.
            evaluation: How held-out prompts (``data.val_path``) are answered and scored during training.
            environment: Multi-turn rollouts: the environment the policy talks to (``class_path``, ``init_args``;
                see :mod:`lit_rlhf.environments`), each trajectory scored by the sum of its step rewards (plus
                ``reward``'s score of the final answer, if a reward is set). None: one response per prompt.
            release_host_memory: On CPU, have glibc return large freed blocks to the system at once
                (``mallopt`` mmap threshold of 4 MiB); lowers peak resident memory. Process-wide.
        """
        super().__init__()
        reward.terms(allow_none=environment is not None)  # one source or a list; an environment may score alone
        optimizer.check()
        if ppo.num_minibatches < 1 or ppo.gradient_accumulation_steps < 1 or ppo.ppo_epochs < 1:
            raise ConfigError("ppo.ppo_epochs, ppo.num_minibatches and ppo.gradient_accumulation_steps must be >= 1")
        if generation.temperature <= 0:
            raise ConfigError("generation.temperature must be positive (sampling is always on in PPO rollouts)")
        self.save_hyperparameters(plain_hyperparameters(
            policy=policy, reward=reward, reference=reference, generation=generation, ppo=ppo, optimizer=optimizer,
            evaluation=evaluation, release_host_memory=release_host_memory, environment=environment_summary(environment),
        ))
        # The typed configs (``self.hparams`` holds the same values as dicts).
        self.policy_config, self.reward_config, self.reference_config = policy, reward, reference
        self.sampling, self.ppo_config, self.optimizer_config = generation, ppo, optimizer
        self.evaluation = evaluation
        if evaluation.num_samples < 1 or (evaluation.num_samples > 1 and evaluation.temperature == 0):
            raise ConfigError("evaluation.num_samples > 1 needs evaluation.temperature > 0 (greedy completions repeat)")
        self.release_host_memory = release_host_memory
        self.automatic_optimization = False
        self.score_moments = ppo_math.RunningMoments()
        self.iteration = 0  # PPO iterations done
        self.environment = environment
        # batch -> Rollout: one response per prompt, or whole conversations with the environment
        self.producer: RolloutProducer = (SingleTurnProducer(self) if environment is None
                                          else MultiTurnProducer(self, environment))
        self.update = PPOUpdate(self)  # Rollout -> optimizer steps
        self.latest_rollout: Optional[Rollout] = None  # for callbacks and debugging
        self.latest_samples: dict[str, list] = {}
        # checkpoints hold only the trained weights (see state_dict); which ones is checked on load
        self.strict_loading = False
        self.policy = None
        self.engine = None  # the vLLM engine (generation.engine: vllm), made in configure_model
        # The separate reference and the reward model live outside the module tree: strategies (DDP, FSDP,
        # DeepSpeed) then neither broadcast, shard nor wrap them, and Lightning's train() leaves them in eval
        # mode. Each rank holds its own frozen copy on its device (quantize them to save memory).
        self._frozen_models: dict[str, nn.Module] = {}
        if ppo.adaptive_kl:
            self.kl_controller = ppo_math.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        else:
            self.kl_controller = ppo_math.FixedKLController(ppo.kl_coef)

    # ----------------------------------------------------------------------------------------------
    # Set-up
    def configure_model(self) -> None:
        """Load the tokenizer, policy, reference and reward (once; Lightning may call this again)."""
        if self.policy is not None:
            return
        policy_cfg, reference_cfg = self.policy_config, self.reference_config
        device = self._trainer.strategy.root_device if self._trainer is not None else None
        if self.device_mesh is not None and policy_cfg.quantization is not None:
            raise ConfigError(
                "policy.quantization cannot be combined with sharding (ModelParallelStrategy): FSDP2 does not "
                "shard bitsandbytes weights. Use DDP with a quantized policy, or shard an unquantized one"
            )
        self._prepare()
        self.policy = load_policy(policy_cfg, device, value_head=self.uses_critic)
        if self.ppo_config.disable_dropout:
            disable_dropout(self.policy)
        vocab_size = self.policy.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab_size:
            raise ConfigError(
                f"The tokenizer of policy.model_name_or_path has {len(self.tokenizer)} tokens but the model's "
                f"embedding has only {vocab_size} rows: use the tokenizer saved with that checkpoint"
            )
        if reference_cfg.model_name_or_path is not None and self.uses_reference:
            self._frozen_models["reference"] = load_frozen_reference(
                reference_cfg.model_name_or_path, policy_cfg.dtype, policy_cfg.trust_remote_code,
                reference_cfg.quantization, device)
        self.rewards = load_rewards(self.reward_config, self.tokenizer, policy_cfg.trust_remote_code, device,
                                    self._frozen_models)
        if policy_cfg.value_head_from_reward:
            if self.reward_model is None or self.policy.value_head is None:
                raise ConfigError(
                    "policy.value_head_from_reward needs a reward model (reward.model_name_or_path) and a critic "
                    "(ppo.advantage_estimator: gae)"
                )
            init_value_head_from_reward(self.policy.value_head, self.reward_model)
        if self.device_mesh is not None:  # ModelParallelStrategy: shard the policy with FSDP2 over the mesh
            shard_policy(self.policy, self.device_mesh)
        if self.sampling.engine == "vllm":
            from lit_rlhf.engines import make_engine

            longest = max(new_tokens for _, new_tokens in self._response_budgets())  # evaluation samples on it too
            if self.environment is not None:
                longest = max(longest, self.environment.max_total_tokens)
            self.engine = make_engine(self.policy_config, self.policy.model.config, self.sampling,
                                      self.evaluation.num_samples, longest, self._data_settings(), device,
                                      self.ranks.rank)

    def _data_settings(self) -> Any:
        """The data module's settings (``data.*``), or None outside a trainer."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "hparams", None)

    def _prepare(self) -> None:
        """What needs no model weights: tokenizer, stop tokens, reward function, and every check of the recipe
        against the model's config and the data. Runs in ``setup``, before any weight loads."""
        if getattr(self, "tokenizer", None) is not None:
            return
        policy_cfg = self.policy_config
        self.tokenizer = load_tokenizer(policy_cfg.model_name_or_path, policy_cfg.trust_remote_code,
                                        "model.policy.model_name_or_path")
        generation_config = load_generation_config(policy_cfg.model_name_or_path, policy_cfg.trust_remote_code)
        checkpoint_eos = getattr(generation_config, "eos_token_id", None)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.sampling.stop_tokens, checkpoint_eos)
        if isinstance(self.producer, MultiTurnProducer):
            if self.device_mesh is not None or self.parameters_are_sharded():
                raise ConfigError(
                    "model.environment is not supported with sharded weights (ModelParallelStrategy, DeepSpeed "
                    "ZeRO-3) yet: ranks play different numbers of turns, and generation with sharded weights needs "
                    "every rank in every step. Use DDP (trainer.strategy: ddp) for multi-turn rollouts"
                )
            self.producer.prepare(self.tokenizer)  # the chat template must render conversations by appending
        strategy = type(self._trainer.strategy).__name__ if self._trainer is not None else ""
        recipe_checks.check_algorithm(self.policy_config, self.sampling, self.ppo_config, self.reference_config,
                                      self.device_mesh is not None, strategy, self.environment is not None)
        for term in self.reward_config.terms(allow_none=self.environment is not None):  # before any weight loads
            if term.function is not None:
                FunctionReward(term.function, term.kwargs)
            elif term.url is not None:
                HTTPReward(term.url)
        data = self._data_settings()
        if data is not None and getattr(data, "batch_size", None) is not None:
            self.minibatch_sizes(data.batch_size)
            context = model_context_length(policy_cfg.model_name_or_path, policy_cfg.trust_remote_code)
            recipe_checks.check_prompt_budget(data.max_prompt_length, self._response_budgets(), context)
            if self.environment is not None:
                recipe_checks.check_trajectory_budget(self.environment.max_total_tokens, context)

    def _response_budgets(self) -> list[tuple[str, int]]:
        return recipe_checks.response_budgets(self.sampling, self.evaluation)

    def minibatch_sizes(self, batch_size: int) -> tuple[int, int]:
        """Minibatch and micro-batch sizes for ``data.batch_size`` prompts (x ``num_generations`` responses)."""
        return recipe_checks.minibatch_sizes(self.ppo_config, self.sampling.num_generations, batch_size)

    def check_sequence_length(self, context_length: int, max_new_tokens: int) -> None:
        recipe_checks.check_sequence_length(self.policy.model.config, context_length, max_new_tokens)

    @property
    def reference(self) -> Optional[nn.Module]:
        """The separate frozen reference model (None: the policy with its adapter disabled)."""
        return self._frozen_models.get("reference")

    @property
    def reward_model(self) -> Optional[nn.Module]:
        """The frozen reward model (None when the reward is a Python function)."""
        return self._frozen_models.get("reward")

    @property
    def ranks(self) -> Ranks:
        """Sums, maxima and gathers over the data-parallel ranks of the run."""
        return Ranks(self._trainer)

    @property
    def uses_critic(self) -> bool:
        """Whether the advantages need a value function (``gae``)."""
        return self.ppo_config.advantage_estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        """Whether a reference is computed at all: not with ``kl_coef: 0`` and no ``kl_in_loss``."""
        return recipe_checks.uses_reference(self.ppo_config)

    def setup(self, stage: str) -> None:
        """Write checkpoints atomically unless a strategy brings its own writer; adapt to DeepSpeed."""
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from lit_rlhf.callbacks import AtomicCheckpointIO

        strategy = self.trainer.strategy
        self._prepare()  # every check that needs no weights, before configure_model loads them
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self.release_host_memory and isinstance(self.trainer.accelerator, CPUAccelerator):
            mmap_large_allocations()
        adapt_strategy(strategy, self.ppo_config)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return optimizer_and_schedule(params, self.optimizer_config, self._total_optimizer_steps())

    def _total_optimizer_steps(self) -> int:
        """Optimizer steps in the run: ``trainer.max_steps`` counts them; epochs count iterations."""
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        steps_per_iteration = self.ppo_config.ppo_epochs * self.ppo_config.num_minibatches
        return int(trainer.estimated_stepping_batches) * steps_per_iteration

    # ----------------------------------------------------------------------------------------------
    # One PPO iteration: rollout (with its advantages), then the update
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = self.producer(batch)
        rollout_seconds = time.perf_counter() - start
        train_stats = self.update(rollout)
        if rollout.logprobs_from_update:  # the statistics that needed the rollout's log-probs
            rollout.stats |= self.producer.log_prob_stats(rollout)
        train_seconds = time.perf_counter() - start - rollout_seconds
        # every rank updates its controller with the same global KL, so the coefficients stay equal
        global_kl = float(self.ranks.mean(rollout.stats["objective/kl"].detach()))
        self.kl_controller.update(global_kl, n_steps=rollout.mask.shape[0] * self.trainer.world_size)
        self.iteration += 1
        self.latest_rollout, self.latest_samples = rollout, rollout.samples()
        num_tokens = float(rollout.mask.sum())
        self.log_metrics({
            **rollout.stats,
            **train_stats,
            "kl_coef": self.kl_controller.value,
            "lr": self.optimizers().param_groups[0]["lr"],
            "perf/rollout_sec": rollout_seconds,
            "perf/train_sec": train_seconds,
            "perf/tokens_per_sec": num_tokens / max(rollout_seconds, 1e-9),
            "perf/peak_memory_gb": peak_memory_gb(self.device),
            "train/skipped_updates": self.update.skipped_updates,
        }, batch_size=rollout.mask.shape[0])

    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor, context_length: int) -> Tensor:
        """Log-probs of the responses under the reference: the separate model, or the adapter-free policy."""
        temperature = self.sampling.temperature
        if self.reference is not None:
            return response_forward(self.reference, input_ids, attention_mask, context_length, temperature).logprobs
        return self.policy.reference_logprobs(input_ids, attention_mask, context_length, temperature)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Evaluation on held-out prompts (``data.val_path``), logged under ``eval/``."""
        metrics, prompts = evaluate(self, batch)
        for name, value in metrics.items():
            self.log(name, value, batch_size=prompts, sync_dist=True, prog_bar=name == "eval/score")

    def log_metrics(self, metrics: dict[str, Any], batch_size: int) -> None:
        """Log every metric; the progress bar shows the score and the KL."""
        progress = {"objective/scores": "score", "objective/kl": "kl"}
        for name, value in metrics.items():  # averaged over ranks under data parallelism
            value = torch.as_tensor(value, dtype=torch.float32, device=self.device)
            self.log(name, value, batch_size=batch_size, prog_bar=False, sync_dist=True)
            if name in progress:
                self.log(progress[name], value, batch_size=batch_size, prog_bar=True, logger=False, sync_dist=True)

    # ----------------------------------------------------------------------------------------------
    # Strategy plumbing
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip the global gradient norm to ``ppo.max_grad_norm``.

        Lightning calls this hook inside ``optimizer.step()`` after unscaling fp16 gradients (``16-mixed``),
        so the clip sees the true norm. DeepSpeed clips in its own step (``gradient_clipping``).
        """
        max_norm = self.ppo_config.max_grad_norm
        if max_norm is None or isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return
        self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def parameters_are_sharded(self) -> bool:
        """Whether every forward all-gathers weights (FSDP2, ZeRO-3): generation then keeps all ranks stepping."""
        return parameters_are_sharded(self._trainer.strategy if self._trainer is not None else None)

    def no_gradient_sync(self) -> AbstractContextManager:
        """Skip the cross-rank gradient reduction of the next backward (accumulation micro-batches)."""
        return no_gradient_sync(self.policy, self.trainer.strategy)

    # ----------------------------------------------------------------------------------------------
    # Run state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl_controller.state_dict()
        checkpoint["score_moments"] = self.score_moments.state_dict()
        checkpoint["ppo_progress"] = {"iteration": self.iteration, "skipped_updates": self.update.skipped_updates}

    def on_train_start(self) -> None:
        super().on_train_start()  # the optimizer follows the recipe (also after a resume)
        if self.evaluation.before_training and self.iteration == 0 and self.trainer.ckpt_path is None:
            evaluate_before_training(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the run's state; the recipe that runs now is the one that counts (a changed ``ppo.kl_coef``
        starts the KL controller again from it)."""
        super().on_load_checkpoint(checkpoint)
        if "kl_controller" in checkpoint:
            saved_coef = ((checkpoint.get("hyper_parameters") or {}).get("ppo") or {}).get("kl_coef")
            if saved_coef is None or saved_coef == self.ppo_config.kl_coef:
                self.kl_controller.load_state_dict(checkpoint["kl_controller"])
        if "score_moments" in checkpoint:
            self.score_moments.load_state_dict(checkpoint["score_moments"])
        if "ppo_progress" in checkpoint:
            self.iteration = checkpoint["ppo_progress"]["iteration"]
            self.update.skipped_updates = checkpoint["ppo_progress"]["skipped_updates"]

    def on_train_end(self) -> None:
        """Write the trained adapter (peft format) and value head next to the logs."""
        from lit_rlhf.runs import run_directory

        directory = run_directory(self.trainer) / "policy"  # a collective under DDP: every rank must ask
        self.policy.save_pretrained(directory, is_main_process=self.trainer.is_global_zero)  # gathers if sharded
        if self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(directory)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory on GPU, else peak resident memory of this process, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
