"""``PPOModule``: one ``training_step`` is one PPO iteration (rollout, rewards, advantages, PPO epochs)."""

from __future__ import annotations

import math
import os
import random
import resource
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

from lit_rlhf.errors import ConfigError, TrainingError
from lit_rlhf import ppo as ppo_math
from lit_rlhf.host_memory import mmap_large_allocations
from lit_rlhf.models import (
    DType, PolicyConfig, Quantization, SequenceClassifierReward, disable_dropout, freeze, import_reward_function,
    init_value_head_from_reward, load_causal_lm, load_generation_config, load_policy, load_tokenizer,
    model_context_length, response_forward,
)
from lit_rlhf.rollout import SamplingConfig, response_mask, sample_responses, stop_token_ids, trim_padding
from lit_rlhf.sharding import shard_policy

# Frozen models and the policy are kept in eval mode on purpose: dropout stays off in rollouts and PPO passes.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


@dataclass
class RewardConfig:
    """Where scores come from: a sequence-classification model or a Python function (exactly one)."""

    model_name_or_path: Optional[str] = None
    """A sequence-classification checkpoint (hub id, local folder or ``builtin:tiny-<arch>-classifier``)."""
    function: Optional[str] = None
    """``package.module:function`` taking ``(prompts, completions)`` and returning one score each."""
    label_index: Optional[int] = None
    """Which logit is the reward, for classifiers with more than one label."""
    dtype: DType = "float32"
    """Dtype of the reward model's weights."""
    quantization: Quantization = None
    """Load the reward model in ``4bit`` (nf4) or ``8bit`` with bitsandbytes."""
    batch_size: Optional[int] = None
    """Score in chunks of this many sequences (None: the whole rollout at once)."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of every response that never emitted the stop token."""
    normalize: Literal["none", "running", "fixed"] = "none"
    """``running``: standardize scores with the running mean/std of all scores so far;
    ``fixed``: ``(score - shift) / scale``."""
    shift: float = 0.0
    """Subtracted from scores when ``normalize`` is ``fixed``."""
    scale: float = 1.0
    """Divides scores when ``normalize`` is ``fixed``."""
    clip: Optional[float] = None
    """Clip (normalized) scores to ``[-clip, clip]``."""


@dataclass
class ReferenceConfig:
    """The frozen reference policy of the KL penalty."""

    model_name_or_path: Optional[str] = None
    """A separate reference checkpoint (e.g. another SFT model); None uses the policy with its adapter off,
    which holds no second copy of the weights."""
    quantization: Quantization = None
    """Load the separate reference in ``4bit`` or ``8bit`` (its dtype is the policy's)."""


@dataclass
class PPOConfig:
    """PPO hyper-parameters; defaults follow TRL's so that results compare."""

    ppo_epochs: int = 4
    """Optimization passes over each rollout."""
    num_minibatches: int = 1
    """Minibatches per pass; must divide the batch size. One optimizer step per minibatch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch whose gradients are accumulated before the step."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Clip range of the importance ratio."""
    clip_range_value: float = 0.2
    """Clip range of the value update."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0 turns it off)."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty against the reference."""
    kl_estimator: ppo_math.KLEstimator = "k1"
    """KL estimator: k1 (log ratio), k2 or k3."""
    adaptive_kl: bool = False
    """Adapt the KL coefficient towards ``kl_target`` (Ziegler et al.)."""
    kl_target: float = 6.0
    """Target sequence KL of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller."""
    whiten_advantages: bool = True
    """Normalize advantages over each rollout."""
    whiten_rewards: bool = False
    """Normalize rewards (without shifting the mean) before GAE."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the gradient norm to this value; None turns clipping off."""
    target_kl: Optional[float] = None
    """Stop the PPO epochs of an iteration early once the mean approx KL exceeds this."""
    disable_dropout: bool = True
    """Set every dropout probability of the policy to 0, so PPO passes compute the same log-probs as the
    rollout did (rollouts never use dropout). The PPO passes run in training mode either way."""
    max_consecutive_skips: int = 5
    """Optimizer steps are skipped (with a warning) when the loss or a gradient is NaN/inf; after this many
    skips in a row the run stops with an error and a checkpoint of the last good state."""


@dataclass
class OptimizerConfig:
    """AdamW on the LoRA and value-head weights, with an optional warm-up and decay."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-5
    """Adam epsilon (1e-5, as in the published PPO implementations)."""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Decay of the learning rate to 0 over the run (per optimizer step)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""


@dataclass
class Rollout:
    """One batch of experience; per-token tensors are ``[batch, response_len]``."""

    query_responses: Tensor
    attention_mask: Tensor
    context_length: int
    mask: Tensor
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    stats: dict[str, Tensor]
    prompts: list[str]
    completions: list[str]
    scores: Tensor
    kl: Tensor
    rewards: Tensor

    def samples(self) -> dict[str, list]:
        """Per-response rows for sample tables: prompt, completion, score, KL and total reward."""
        return {
            "prompt": self.prompts,
            "completion": self.completions,
            "score": self.scores.tolist(),
            "kl": self.kl.sum(1).tolist(),
            "reward": self.rewards.sum(1).tolist(),
        }


class PPOModule(L.LightningModule):
    """PPO for a LoRA policy with a value head, against a frozen reference and a reward."""

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        reward: RewardConfig = RewardConfig(),
        reference: ReferenceConfig = ReferenceConfig(),
        generation: SamplingConfig = SamplingConfig(),
        ppo: PPOConfig = PPOConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
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
            release_host_memory: On CPU, have glibc return large freed blocks to the system at once
                (``mallopt`` mmap threshold of 4 MiB); lowers peak resident memory. Process-wide.
        """
        super().__init__()
        if (reward.model_name_or_path is None) == (reward.function is None):
            raise ConfigError("Set exactly one of reward.model_name_or_path and reward.function")
        if ppo.num_minibatches < 1 or ppo.gradient_accumulation_steps < 1 or ppo.ppo_epochs < 1:
            raise ConfigError("ppo.ppo_epochs, ppo.num_minibatches and ppo.gradient_accumulation_steps must be >= 1")
        if generation.temperature <= 0:
            raise ConfigError("generation.temperature must be positive (sampling is always on in PPO rollouts)")
        # Plain dicts, so that checkpoints load with ``torch.load(weights_only=True)`` and hparams.yaml reads well.
        self.save_hyperparameters({  # lists, not tuples: hparams.yaml must load with yaml.safe_load
            name: _plain(asdict(config)) for name, config in (
                ("policy", policy), ("reward", reward), ("reference", reference), ("generation", generation),
                ("ppo", ppo), ("optimizer", optimizer),
            )
        } | {"release_host_memory": release_host_memory})
        # The typed configs (``self.hparams`` holds the same values as dicts).
        self.policy_config, self.reward_config, self.reference_config = policy, reward, reference
        self.sampling, self.ppo_config, self.optimizer_config = generation, ppo, optimizer
        self.release_host_memory = release_host_memory
        self.automatic_optimization = False
        self.score_moments = ppo_math.RunningMoments()
        self.iteration = 0  # PPO iterations done
        self.skipped_updates, self.consecutive_skips = 0, 0
        self.latest_rollout: Optional[Rollout] = None  # for callbacks and debugging
        self.latest_samples: dict[str, list] = {}
        # checkpoints hold only the trained weights (see state_dict); which ones is checked on load
        self.strict_loading = False
        self.policy = None
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
        policy_cfg, reward_cfg, reference_cfg = self.policy_config, self.reward_config, self.reference_config
        device = self._trainer.strategy.root_device if self._trainer is not None else None
        if self.device_mesh is not None and policy_cfg.quantization is not None:
            raise ConfigError(
                "policy.quantization cannot be combined with sharding (ModelParallelStrategy): FSDP2 does not "
                "shard bitsandbytes weights. Use DDP with a quantized policy, or shard an unquantized one"
            )
        self._prepare()
        self.policy = load_policy(policy_cfg, device)
        if self.ppo_config.disable_dropout:
            disable_dropout(self.policy)
        vocab_size = self.policy.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab_size:
            raise ConfigError(
                f"The tokenizer of policy.model_name_or_path has {len(self.tokenizer)} tokens but the model's "
                f"embedding has only {vocab_size} rows: use the tokenizer saved with that checkpoint"
            )
        if reference_cfg.model_name_or_path is not None:
            self._frozen_models["reference"] = freeze(load_causal_lm(
                reference_cfg.model_name_or_path, policy_cfg.dtype, policy_cfg.trust_remote_code,
                field_name="reference.model_name_or_path", quantization=reference_cfg.quantization, device=device,
            ))
        if reward_cfg.model_name_or_path is not None:
            self._frozen_models["reward"] = SequenceClassifierReward(
                reward_cfg.model_name_or_path, self.tokenizer, reward_cfg.label_index, reward_cfg.dtype,
                policy_cfg.trust_remote_code, reward_cfg.quantization, reward_cfg.batch_size, device,
            )
        if policy_cfg.value_head_from_reward:
            if self.reward_model is None:
                raise ConfigError("policy.value_head_from_reward needs reward.model_name_or_path, not a reward function")
            init_value_head_from_reward(self.policy.value_head, self.reward_model)
        if self.device_mesh is not None:  # ModelParallelStrategy: shard the policy with FSDP2 over the mesh
            shard_policy(self.policy, self.device_mesh)

    def _prepare(self) -> None:
        """What needs no model weights: tokenizer, stop tokens, reward function, and every check of the recipe
        against the model's config and the data. Runs in ``setup``, before any weight loads."""
        if getattr(self, "tokenizer", None) is not None:
            return
        policy_cfg = self.policy_config
        self.tokenizer = load_tokenizer(policy_cfg.model_name_or_path, policy_cfg.trust_remote_code)
        generation_config = load_generation_config(policy_cfg.model_name_or_path, policy_cfg.trust_remote_code)
        checkpoint_eos = getattr(generation_config, "eos_token_id", None)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.sampling.stop_tokens, checkpoint_eos)
        self.reward_function = None
        if self.reward_config.function is not None:
            self.reward_function = import_reward_function(self.reward_config.function)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "hparams", None)
        if data is not None and getattr(data, "batch_size", None) is not None:
            self._minibatch_sizes(data.batch_size)
            context = model_context_length(policy_cfg.model_name_or_path, policy_cfg.trust_remote_code)
            total = data.max_prompt_length + self.sampling.max_new_tokens
            if context is not None and total > context:
                raise ConfigError(
                    f"data.max_prompt_length={data.max_prompt_length} + generation.max_new_tokens="
                    f"{self.sampling.max_new_tokens} = {total} exceeds the context of policy.model_name_or_path "
                    f"({context} tokens): lower one of them"
                )

    @property
    def reference(self) -> Optional[nn.Module]:
        """The separate frozen reference model (None: the policy with its adapter disabled)."""
        return self._frozen_models.get("reference")

    @property
    def reward_model(self) -> Optional[SequenceClassifierReward]:
        """The frozen reward model (None when the reward is a Python function)."""
        return self._frozen_models.get("reward")

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
        if isinstance(strategy, FSDPStrategy):
            raise ConfigError(
                "trainer.strategy: FSDPStrategy (FSDP1) runs training_step inside the wrapped module's forward, "
                "where PPO's manual backward passes fail. Shard with FSDP2 instead: "
                "lightning.pytorch.strategies.ModelParallelStrategy (see recipes/llama3.1-8b-fsdp2.yaml)"
            )
        if isinstance(strategy, DeepSpeedStrategy):
            strategy.exclude_frozen_parameters = True  # checkpoints: the trained weights, not the frozen base
            # The DeepSpeed engine owns gradient accumulation and clipping: its accumulation boundary is
            # Lightning's accumulate_grad_batches (1 under manual optimization), and it clips in engine.step().
            if strategy.zero_stage_3:
                raise ConfigError(
                    "trainer.strategy: DeepSpeed ZeRO stage 3 is not supported yet (it would partition the weights "
                    "while they load and while the frozen reward model is used outside the engine). Use stage 2, "
                    "or the FSDP strategy to shard weights (recipes/llama3.1-8b-fsdp.yaml)"
                )
            if self.ppo_config.gradient_accumulation_steps > 1:
                raise ConfigError(
                    "ppo.gradient_accumulation_steps > 1 is not supported with the DeepSpeed strategy: use more "
                    "ppo.num_minibatches (smaller minibatches) or the FSDP/DDP strategy"
                )
            if self.ppo_config.max_grad_norm is not None:
                strategy.config.setdefault("gradient_clipping", self.ppo_config.max_grad_norm)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optimizer_config
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        total = max(self._total_optimizer_steps(), 1)

        def lr_factor(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = min((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
            if cfg.scheduler == "linear":
                return 1.0 - progress
            if cfg.scheduler == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_optimizer_steps(self) -> int:
        """Optimizer steps in the run: ``trainer.max_steps`` counts them; epochs count iterations."""
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        steps_per_iteration = self.ppo_config.ppo_epochs * self.ppo_config.num_minibatches
        return int(trainer.estimated_stepping_batches) * steps_per_iteration

    # ----------------------------------------------------------------------------------------------
    # One PPO iteration
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = self.make_rollout(batch)
        rollout_seconds = time.perf_counter() - start
        train_stats = self.ppo_update(rollout)
        train_seconds = time.perf_counter() - start - rollout_seconds
        # every rank updates its controller with the same global KL, so the coefficients stay equal
        global_kl = float(self._mean_over_ranks(rollout.stats["objective/kl"].detach()))
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
            "train/skipped_updates": self.skipped_updates,
        }, batch_size=rollout.mask.shape[0])

    @torch.no_grad()
    def make_rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample responses, score them, and compute KL-penalized rewards and GAE advantages."""
        sampling, ppo_cfg, reward_cfg = self.sampling, self.ppo_config, self.reward_config
        self.policy.eval()
        queries, query_mask = batch["input_ids"], batch["attention_mask"]
        context_length = queries.shape[1]
        self._check_sequence_length(context_length)
        responses = sample_responses(
            self.policy, queries, query_mask, sampling, self.stop_token_ids, self.tokenizer.pad_token_id,
            synced_gpus=self.parameters_are_sharded(),
        )
        mask = response_mask(responses, self.stop_token_ids)
        query_responses = torch.cat([queries, responses], dim=1)
        attention_mask = torch.cat([query_mask, mask.long()], dim=1)
        out = self.policy(query_responses, attention_mask, context_length, sampling.temperature)
        ref_logprobs = self.reference_logprobs(query_responses, attention_mask, context_length)

        lengths = mask.sum(1).long()
        completions = [
            self.tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(responses.tolist(), lengths.tolist())
        ]
        last_tokens = responses.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
        has_stop = torch.isin(last_tokens, torch.as_tensor(self.stop_token_ids, dtype=last_tokens.dtype, device=last_tokens.device))
        scores = self.score(batch["prompts"], completions, query_responses, attention_mask)
        raw_scores = scores
        if reward_cfg.missing_eos_penalty is not None:
            scores = scores - reward_cfg.missing_eos_penalty * (~has_stop).float()
        if reward_cfg.normalize == "running":
            self.score_moments.update(self._gather(scores))
            scores = self.score_moments.normalize(scores)
        elif reward_cfg.normalize == "fixed":
            scores = (scores - reward_cfg.shift) / reward_cfg.scale
        if reward_cfg.clip is not None:
            scores = scores.clamp(-reward_cfg.clip, reward_cfg.clip)

        rewards, kl = ppo_math.compute_rewards(
            scores, out.logprobs, ref_logprobs, mask, self.kl_controller.value, ppo_cfg.kl_estimator
        )
        if ppo_cfg.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False, all_reduce=self._all_reduce_sum)
        advantages, returns = ppo_math.compute_gae(rewards, out.values * mask, mask, ppo_cfg.gamma, ppo_cfg.lam)
        if ppo_cfg.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask, all_reduce=self._all_reduce_sum)

        sequence_kl = kl.sum(1).mean()
        non_score_reward = (-self.kl_controller.value * kl).sum(1).mean()
        stats = {
            "objective/kl": sequence_kl,
            # TRL's definition: the sampled tokens' negative log-probs, summed per response (no vocabulary pass)
            "objective/entropy": (-out.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": scores.mean() + non_score_reward,
            "objective/scores": scores.mean(),
            "objective/raw_scores": raw_scores.mean(),
            "val/num_eos_tokens": has_stop.float().sum(),
            "val/response_length": lengths.float().mean(),
            # diversity of the completions: distinct token bigrams among all (a collapsed policy goes to ~0)
            "val/distinct_2": distinct_n([r[:n] for r, n in zip(responses.tolist(), lengths.tolist())]),
        }
        return Rollout(
            query_responses, attention_mask, context_length, mask, out.logprobs, out.values * mask, advantages,
            returns, stats, list(batch["prompts"]), completions, scores, kl, rewards,
        )

    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor, context_length: int) -> Tensor:
        """Log-probs of the responses under the reference: the separate model, or the adapter-free policy."""
        temperature = self.sampling.temperature
        if self.reference is not None:
            return response_forward(self.reference, input_ids, attention_mask, context_length, temperature).logprobs
        return self.policy.reference_logprobs(input_ids, attention_mask, context_length, temperature)

    def score(self, prompts: list[str], completions: list[str], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """One finite score per completion, from the reward model or the reward function."""
        if self.reward_model is not None:
            scores = self.reward_model(prompts, completions, input_ids, attention_mask)
            source = f"reward.model_name_or_path={self.reward_config.model_name_or_path!r}"
        else:
            raw = self.reward_function(prompts, completions)
            source = f"reward.function={self.reward_config.function!r}"
            try:
                scores = torch.as_tensor(raw, dtype=torch.float32).flatten()
            except (TypeError, ValueError, RuntimeError) as err:
                raise ConfigError(f"{source} must return a list of numbers, one per completion; got {_describe(raw)}") from err
            if scores.numel() != len(completions):
                raise ConfigError(f"{source} returned {scores.numel()} scores for {len(completions)} completions")
        if not torch.isfinite(scores).all():
            raise ConfigError(f"{source} returned non-finite scores (NaN or inf): {scores.tolist()}")
        return scores.to(self.device, torch.float32)

    def ppo_update(self, rollout: Rollout) -> dict[str, Tensor]:
        """``ppo_epochs`` passes of shuffled minibatches over the rollout, one optimizer step each."""
        hp = self.ppo_config
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        # training mode, where transformers applies gradient checkpointing; dropout is off if disable_dropout
        # (configure_model set its probabilities to 0)
        self.policy.train()
        batch_size = rollout.mask.shape[0]
        minibatch_size, micro_size = self._minibatch_sizes(batch_size)
        history: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(hp.ppo_epochs):
            epoch_approx_kl = []
            order = torch.randperm(batch_size, device=rollout.mask.device)
            for minibatch in order.split(minibatch_size):
                losses = []
                micros = minibatch.split(micro_size)
                for position, micro in enumerate(micros):
                    loss, stats = self.ppo_loss(rollout, micro)
                    # under DDP, gradients are averaged across ranks once per minibatch, on its last micro-batch
                    last = position == len(micros) - 1
                    with nullcontext() if last else self._no_gradient_sync():
                        self.manual_backward(loss / hp.gradient_accumulation_steps)
                    losses.append(loss.detach())
                    for name, value in stats.items():
                        history[name].append(value)
                    epoch_approx_kl.append(stats["policy/approxkl_avg"])
                if not self._update_is_finite(torch.stack(losses)):
                    optimizer.zero_grad(set_to_none=True)
                    self._skip_update()
                    continue
                self.consecutive_skips = 0
                optimizer.step()  # gradients are clipped in on_before_optimizer_step, after fp16 unscaling
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            if hp.target_kl is not None:  # decided on the mean over ranks, so all ranks stop together
                if self._mean_over_ranks(torch.stack(epoch_approx_kl).mean()) > hp.target_kl:
                    break
        self.policy.eval()
        return {name: torch.stack(values).mean() for name, values in history.items()}

    def ppo_loss(self, rollout: Rollout, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss + ``vf_coef`` * clipped value loss (- entropy bonus) on rows ``index``."""
        hp = self.ppo_config
        input_ids, attention_mask, context_length = trim_padding(
            rollout.query_responses[index], rollout.attention_mask[index], rollout.context_length
        )
        response_len = input_ids.shape[1] - context_length
        mask = rollout.mask[index, :response_len]
        out = self.policy(
            input_ids, attention_mask, context_length, self.sampling.temperature, with_entropy=True,
            entropy_grad=hp.ent_coef != 0,  # otherwise only a statistic: no graph, no backward through it
        )
        pg_loss, pg_stats = ppo_math.policy_loss(
            out.logprobs, rollout.logprobs[index, :response_len], rollout.advantages[index, :response_len], mask,
            hp.clip_range,
        )
        vf_loss, vf_stats = ppo_math.value_loss(
            out.values, rollout.values[index, :response_len], rollout.returns[index, :response_len], mask,
            hp.clip_range_value,
        )
        entropy = ppo_math.masked_mean(out.entropy, mask)
        loss = pg_loss + hp.vf_coef * vf_loss - hp.ent_coef * entropy
        stats = {
            "policy/approxkl_avg": pg_stats["approx_kl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "loss/policy_avg": pg_loss.detach(),
            "loss/value_avg": vf_loss.detach(),
            "val/clipfrac_avg": vf_stats["clipfrac"],
            "policy/entropy_avg": entropy.detach(),
            "val/ratio": pg_stats["ratio"],
        }
        return loss, stats

    def _update_is_finite(self, losses: Tensor) -> bool:
        """Whether the minibatch's losses and gradients are finite, on every rank.

        Under fp16 the gradient scaler handles inf gradients itself (skipping the step and lowering the
        scale), so only the losses are checked there.
        """
        finite = bool(torch.isfinite(losses).all())
        if finite and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
            finite = bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all()) if grads else True
        return self.trainer.strategy.reduce_boolean_decision(finite, all=True)

    def _skip_update(self) -> None:
        """Count a skipped optimizer step; stop with a checkpoint after too many in a row."""
        from lit_rlhf.callbacks import save_last_checkpoint

        self.skipped_updates += 1
        self.consecutive_skips += 1
        limit = self.ppo_config.max_consecutive_skips
        warnings.warn(
            f"Skipped an optimizer step: non-finite loss or gradient (iteration {self.iteration}, "
            f"{self.consecutive_skips} in a row, {self.skipped_updates} in all)", RuntimeWarning, stacklevel=2,
        )
        if self.consecutive_skips >= limit:
            path = save_last_checkpoint(self.trainer)  # weights and optimizer hold no update from the bad steps
            raise TrainingError(
                f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                f"(ppo.max_consecutive_skips={limit}). The last good state is saved in {path}. Lower "
                "model.optimizer.lr, keep ppo.max_grad_norm set, and check the scale of the reward "
                "(model.reward.normalize / clip) before resuming with --ckpt_path."
            )

    # ----------------------------------------------------------------------------------------------
    # Checks, logging, state
    def _minibatch_sizes(self, batch_size: int) -> tuple[int, int]:
        hp = self.ppo_config
        per_step = hp.num_minibatches * hp.gradient_accumulation_steps
        if batch_size % per_step:
            raise ConfigError(
                f"data.batch_size={batch_size} is not divisible by ppo.num_minibatches={hp.num_minibatches} x "
                f"ppo.gradient_accumulation_steps={hp.gradient_accumulation_steps}: choose values that divide it"
            )
        minibatch_size = batch_size // hp.num_minibatches
        return minibatch_size, minibatch_size // hp.gradient_accumulation_steps

    def _check_sequence_length(self, context_length: int) -> None:
        limit = getattr(self.policy.model.config, "max_position_embeddings", None)
        total = context_length + self.sampling.max_new_tokens
        if limit is not None and total > limit:
            raise ConfigError(
                f"Prompt length {context_length} + generation.max_new_tokens={self.sampling.max_new_tokens}"
                f" = {total} exceeds the model's context of {limit} tokens: lower data.max_prompt_length or "
                "generation.max_new_tokens"
            )

    def log_metrics(self, metrics: dict[str, Any], batch_size: int) -> None:
        """Log every metric; the progress bar shows the score and the KL."""
        progress = {"objective/scores": "score", "objective/kl": "kl"}
        for name, value in metrics.items():  # averaged over ranks under data parallelism
            value = torch.as_tensor(value, dtype=torch.float32, device=self.device)
            self.log(name, value, batch_size=batch_size, prog_bar=False, sync_dist=True)
            if name in progress:
                self.log(progress[name], value, batch_size=batch_size, prog_bar=True, logger=False, sync_dist=True)

    def _all_reduce_sum(self, values: Tensor) -> Tensor:
        """Sum of ``values`` over all ranks (``values`` itself in a single-process run); ``values`` is left as is."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        # the strategy reduces in place: a copy keeps the caller's tensor (and any view of it) unchanged
        return self.trainer.strategy.reduce(values.clone(), reduce_op="sum")

    def _mean_over_ranks(self, value: Tensor) -> Tensor:
        """Mean of ``value`` over all ranks (``value`` itself in a single-process run)."""
        return self._all_reduce_sum(value) / (self.trainer.world_size if self._trainer is not None else 1)

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
        """Whether the strategy shards the weights themselves (FSDP2, DeepSpeed ZeRO-3).

        Then every forward all-gathers weights across ranks, so all ranks must keep calling the model
        during generation until the last one is done (``synced_gpus``), or the collectives hang.
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):
            return True
        return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3

    def _no_gradient_sync(self) -> AbstractContextManager:
        """Skip the cross-rank gradient reduction of the next backward (accumulation micro-batches)."""
        if hasattr(self.policy, "set_requires_gradient_sync"):  # sharded with FSDP2
            return _fsdp_gradient_sync_off(self.policy)
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()

    def _gather(self, values: Tensor) -> Tensor:
        """``values`` of every rank, flattened (just ``values`` outside a distributed run)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values.flatten()
        return self.all_gather(values).flatten()

    def state_dict(self, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        """The weights PPO trains (LoRA and value head) and nothing else.

        The frozen base comes from ``policy.model_name_or_path``: checkpoints (of every strategy) neither
        hold nor gather it. Selected by the state dict's own tensors (``requires_grad``), so wrapper
        prefixes in parameter names cannot drop a trained weight.
        """
        everything = super().state_dict(prefix=prefix, keep_vars=True)
        trained = {
            name: value if keep_vars else value.detach()
            for name, value in everything.items() if isinstance(value, nn.Parameter) and value.requires_grad
        }
        if destination is not None:
            destination.update(trained)
            return destination
        return trained

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the names of the trained weights, so that a resume can tell whether the checkpoint holds all of them
        # even where a strategy loads the weights itself (FSDP2, DeepSpeed) and hands us only the metadata
        checkpoint["trained_weights"] = sorted(self.state_dict())
        checkpoint["kl_controller"] = self.kl_controller.state_dict()
        checkpoint["score_moments"] = self.score_moments.state_dict()
        checkpoint["ppo_progress"] = {"iteration": self.iteration, "skipped_updates": self.skipped_updates}
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        }
        if "loops" in checkpoint and self._trainer is not None:
            _resume_cut_epoch_mid_epoch(checkpoint["loops"], self.trainer.num_training_batches)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_checkpoint_matches_recipe(checkpoint)
        self._check_checkpoint_holds_trained_weights(checkpoint)
        if "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
        if "score_moments" in checkpoint:
            self.score_moments.load_state_dict(checkpoint["score_moments"])
        if "ppo_progress" in checkpoint:
            self.iteration = checkpoint["ppo_progress"]["iteration"]
            self.skipped_updates = checkpoint["ppo_progress"]["skipped_updates"]
        if "rng_states" in checkpoint:  # the resumed run samples exactly what the uninterrupted one would
            rng = checkpoint["rng_states"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(rng["python"])

    def _check_checkpoint_matches_recipe(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint of another recipe (models, LoRA, data); warn about changed
        hyper-parameters (which a user may change on purpose when resuming)."""
        saved_model = checkpoint.get("hyper_parameters") or {}
        changes: dict[str, list[str]] = {"refuse": [], "warn": []}
        for section, value in self.hparams.items():
            if section in saved_model and _plain(saved_model[section]) != _plain(value):
                kind = "refuse" if section in ("policy", "reward", "reference") else "warn"
                changes[kind] += _differences(f"model.{section}", _plain(saved_model[section]), _plain(value))
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
        if datamodule is not None and saved_data:
            for field in _DATA_FIELDS_THAT_MUST_MATCH:
                before, now = saved_data.get(field), datamodule.hparams.get(field)
                if field == "path" and before and now:
                    before, now = os.path.abspath(before), os.path.abspath(now)
                if before != now:
                    changes["refuse"].append(f"data.{field}: {before!r} -> {now!r}")
        if changes["refuse"]:
            raise ConfigError(
                "The checkpoint (--ckpt_path) was written by a run of another recipe: "
                f"{'; '.join(changes['refuse'])}. Resume with the recipe that wrote it, or start a new run without "
                "--ckpt_path"
            )
        if changes["warn"]:
            warnings.warn(f"Resuming with changed settings: {'; '.join(changes['warn'])}", UserWarning, stacklevel=2)

    def _check_checkpoint_holds_trained_weights(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that lacks some of this run's trained weights (or has others): loading it
        would silently restart those weights from their initial values."""
        expected = set(self.state_dict())
        if "state_dict" in checkpoint:
            found = set(checkpoint["state_dict"])
        elif "trained_weights" in checkpoint:
            found = set(checkpoint["trained_weights"])
        else:
            return
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise ConfigError(
                f"The checkpoint does not hold this run's trained weights: {len(missing)} missing (e.g. "
                f"{missing[:3]}), {len(unexpected)} not in this run (e.g. {unexpected[:3]}). Resume with the recipe "
                "that wrote it (same policy, LoRA rank and target modules)"
            )

    def on_train_end(self) -> None:
        """Write the trained adapter (peft format) and value head next to the logs."""
        from lit_rlhf.runs import run_directory

        directory = run_directory(self.trainer) / "policy"  # a collective under DDP: every rank must ask
        self.policy.save_pretrained(directory, is_main_process=self.trainer.is_global_zero)  # gathers if sharded
        if self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(directory)


@contextmanager
def _fsdp_gradient_sync_off(module: Any) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _resume_cut_epoch_mid_epoch(loops: dict[str, Any], batches_per_epoch: float) -> None:
    """Make a checkpoint written at the end of an epoch cut short (``trainer.max_steps``) resume mid-epoch.

    Lightning ends the epoch loop when ``max_steps`` is reached and calls the epoch-end hooks, where
    ``ModelCheckpoint`` saves with the epoch counted as processed. Resumed, Lightning would then start the
    next epoch and the rest of the cut one would never run. Counting the epoch as not yet processed makes
    Lightning resume inside it, where the data module continues from the next unused prompt.
    """
    fit_loop = loops.get("fit_loop", {})
    epoch, batches = fit_loop.get("epoch_progress"), fit_loop.get("epoch_loop.batch_progress")
    if not epoch or not batches:
        return
    inside_epoch_end = epoch["current"]["processed"] == epoch["current"]["completed"] + 1
    cut_short = not batches["is_last_batch"] and batches["current"]["completed"] < batches_per_epoch
    if inside_epoch_end and cut_short:
        for progress in (epoch["total"], epoch["current"]):
            progress["processed"] -= 1


# What decides which prompts a resumed run sees next and how they are encoded.
_DATA_FIELDS_THAT_MUST_MATCH = (
    "path", "prompt_field", "split", "batch_size", "max_prompt_length", "truncate_prompts", "apply_chat_template",
    "shuffle", "seed",
)


def _differences(prefix: str, before: Any, now: Any) -> list[str]:
    """``field: old -> new`` for every leaf that differs between two (nested) dicts."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [line for key in sorted(set(before) | set(now))
                for line in _differences(f"{prefix}.{key}", before.get(key), now.get(key))]
    return [] if before == now else [f"{prefix}: {before!r} -> {now!r}"]


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists (recursively), for YAML that ``yaml.safe_load`` reads."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _describe(value: Any) -> str:
    """A short description of what a reward function returned, e.g. ``list of str ('good', ...)``."""
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"{type(value).__name__} of {' and '.join(kinds) or 'nothing'} ({', '.join(map(repr, value[:3]))}{', ...' if len(value) > 3 else ''})"
    return f"{type(value).__name__} {value!r}"[:200]


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Share of distinct n-grams among all n-grams of ``sequences`` (1: all different; near 0: collapse)."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory on GPU, else peak resident memory of this process, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
