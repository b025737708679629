"""``PPOModule``: one ``training_step`` is one PPO iteration (rollout, rewards, advantages, PPO epochs)."""

from __future__ import annotations

import json
import resource
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)
from torch import Tensor, nn

from lit_rlhf import ppo as ppo_math
from lit_rlhf.advantages import estimate_advantages
from lit_rlhf.checkpoints import ExactResume, plain_hyperparameters
from lit_rlhf.configs import (
    EvaluationConfig,
    OptimizerConfig,
    PPOConfig,
    ReferenceConfig,
    RewardConfig,
    optimizer_and_schedule,
)
from lit_rlhf.errors import ConfigError, TrainingError
from lit_rlhf.host_memory import mmap_large_allocations
from lit_rlhf.models import (
    POLICY_ADAPTER,
    PolicyConfig,
    ResponseOutput,
    SequenceClassifierReward,
    disable_dropout,
    init_value_head_from_reward,
    load_frozen_reference,
    load_generation_config,
    load_policy,
    load_tokenizer,
    model_context_length,
    response_forward,
)
from lit_rlhf.rewards import FunctionReward, HTTPReward, RewardSet
from lit_rlhf.rollout import (
    Samples,
    SamplingConfig,
    response_mask,
    sample_responses,
    stop_token_ids,
    trim_padding,
)
from lit_rlhf.sharding import shard_policy

# Frozen models and the policy are kept in eval mode on purpose: dropout stays off in rollouts and PPO passes.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


@dataclass
class Rollout:
    """One batch of experience; per-token tensors are ``[batch, response_len]``."""

    query_responses: Tensor
    attention_mask: Tensor
    context_length: int
    mask: Tensor
    logprobs: Tensor
    values: Optional[Tensor]  # None without a critic (critic-free estimators)
    advantages: Tensor
    returns: Tensor
    stats: dict[str, Tensor]
    prompts: list[str]
    completions: list[str]
    scores: Tensor
    kl: Tensor
    rewards: Tensor
    ref_logprobs: Optional[Tensor] = None  # kept for ppo.kl_in_loss
    loss_mask: Optional[Tensor] = None  # ``mask`` without the responses that contribute no loss
    token_weights: Optional[Tensor] = None  # truncated importance weights of engine samples (rollout_correction)
    logprobs_from_update: bool = False  # ``logprobs`` are filled in by the (single) update pass, see make_rollout

    def samples(self) -> dict[str, list]:
        """Per-response rows for sample tables: prompt, completion, score, KL and total reward."""
        return {
            "prompt": self.prompts,
            "completion": self.completions,
            "score": self.scores.tolist(),
            "kl": self.kl.sum(1).tolist(),
            "reward": self.rewards.sum(1).tolist(),
        }


class PPOModule(ExactResume, L.LightningModule):
    """PPO for a LoRA policy with a value head, against a frozen reference and a reward."""

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
            release_host_memory: On CPU, have glibc return large freed blocks to the system at once
                (``mallopt`` mmap threshold of 4 MiB); lowers peak resident memory. Process-wide.
        """
        super().__init__()
        reward.terms()  # exactly one source (or a list of them)
        optimizer.check()
        if ppo.num_minibatches < 1 or ppo.gradient_accumulation_steps < 1 or ppo.ppo_epochs < 1:
            raise ConfigError("ppo.ppo_epochs, ppo.num_minibatches and ppo.gradient_accumulation_steps must be >= 1")
        if generation.temperature <= 0:
            raise ConfigError("generation.temperature must be positive (sampling is always on in PPO rollouts)")
        self.save_hyperparameters(plain_hyperparameters(
            policy=policy, reward=reward, reference=reference, generation=generation, ppo=ppo, optimizer=optimizer,
            evaluation=evaluation, release_host_memory=release_host_memory,
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
        self.skipped_updates, self.consecutive_skips = 0, 0
        self.latest_rollout: Optional[Rollout] = None  # for callbacks and debugging
        self.latest_samples: dict[str, list] = {}
        # checkpoints hold only the trained weights (see state_dict); which ones is checked on load
        self.strict_loading = False
        self.policy = None
        self.engine = None  # the vLLM engine (generation.engine: vllm), made in configure_model
        self.sampling_seconds = 0.0  # time in sample() during the current rollout (perf/generate_sec)
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
        sources = []
        for term in reward_cfg.terms():
            if term.model_name_or_path is not None:
                model = SequenceClassifierReward(
                    term.model_name_or_path, self.tokenizer, reward_cfg.label_index, reward_cfg.dtype,
                    policy_cfg.trust_remote_code, reward_cfg.quantization, reward_cfg.batch_size, device,
                )
                self._frozen_models.setdefault("reward", model)  # the first reward model (value-head init)
                self._frozen_models[f"reward:{term.label()}"] = model
                source = _ModelReward(model)
            elif term.url is not None:
                source = HTTPReward(term.url, reward_cfg.timeout, reward_cfg.retries)
            else:
                source = FunctionReward(term.function, term.kwargs)
            sources.append((term.label(), term.weight, source))
        self.rewards = RewardSet(sources)
        if policy_cfg.value_head_from_reward:
            if self.reward_model is None or self.policy.value_head is None:
                raise ConfigError(
                    "policy.value_head_from_reward needs a reward model (reward.model_name_or_path) and a critic "
                    "(ppo.advantage_estimator: gae)"
                )
            init_value_head_from_reward(self.policy.value_head, self.reward_model)
        if self.device_mesh is not None:  # ModelParallelStrategy: shard the policy with FSDP2 over the mesh
            shard_policy(self.policy, self.device_mesh)
        self.engine = self._make_engine(device) if self.sampling.engine == "vllm" else None
        self._engine_iteration = -1  # the iteration whose weights the engine holds

    def _make_engine(self, device: Optional[torch.device]) -> Any:
        """The in-process vLLM engine of this rank, on the policy's base checkpoint."""
        from lit_rlhf.engines import VLLMEngine, engine_context_length, kv_cache_bytes
        from lit_rlhf.tiny import resolve_model_path

        cfg, sampling = self.policy_config, self.sampling
        device = device or torch.device("cpu")
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "hparams", None)
        prompt_length = getattr(data, "max_prompt_length", 512)
        longest = max(new_tokens for _, new_tokens in self._response_budgets())  # the evaluation samples on it too
        context = engine_context_length(self.policy.model.config, prompt_length, longest)
        cache_bytes = int(sampling.kv_cache_gb * 2**30) if sampling.kv_cache_gb is not None else None
        if cache_bytes is None and device.type == "cpu":  # only what the largest batch needs, not a share of RAM
            batch = getattr(data, "batch_size", None) or 64
            rows = max(batch * sampling.num_generations,
                       (getattr(data, "val_batch_size", None) or batch) * self.evaluation.num_samples)
            cache_bytes = kv_cache_bytes(self.policy.model.config, rows, context, getattr(torch, cfg.dtype))
        rank = self._trainer.global_rank if self._trainer is not None else 0
        return VLLMEngine(
            resolve_model_path(cfg.model_name_or_path), cfg.dtype, context, sampling.gpu_memory_utilization,
            sampling.enable_sleep_mode, seed=rank, device=device, trust_remote_code=cfg.trust_remote_code,
            kv_cache_bytes=cache_bytes,
        )

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
        self._check_algorithm()
        for term in self.reward_config.terms():  # importable functions, valid URLs: before any weight loads
            if term.function is not None:
                FunctionReward(term.function, term.kwargs)
            elif term.url is not None:
                HTTPReward(term.url)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "hparams", None)
        if data is not None and getattr(data, "batch_size", None) is not None:
            self._minibatch_sizes(data.batch_size)
            context = model_context_length(policy_cfg.model_name_or_path, policy_cfg.trust_remote_code)
            for field, new_tokens in self._response_budgets():
                total = data.max_prompt_length + new_tokens
                if context is not None and total > context:
                    raise ConfigError(
                        f"data.max_prompt_length={data.max_prompt_length} + {field}={new_tokens} = {total} exceeds the "
                        f"context of policy.model_name_or_path ({context} tokens): lower one of them"
                    )

    def _response_budgets(self) -> list[tuple[str, int]]:
        """The longest responses the run samples, with their fields: training rollouts and evaluation."""
        budgets = [("generation.max_new_tokens", self.sampling.max_new_tokens)]
        if self.evaluation.max_new_tokens is not None:
            budgets.append(("evaluation.max_new_tokens", self.evaluation.max_new_tokens))
        return budgets

    def _check_algorithm(self) -> None:
        """Settings that cannot work together, named with their fields."""
        hp, groups = self.ppo_config, self.sampling.num_generations
        if groups < 1:
            raise ConfigError(f"generation.num_generations must be >= 1, got {groups}")
        if hp.advantage_estimator in ("grpo", "rloo", "reinforce_pp_baseline") and groups < 2:
            raise ConfigError(
                f"ppo.advantage_estimator={hp.advantage_estimator} compares the responses to one prompt: set "
                "generation.num_generations to 2 or more (e.g. 8)"
            )
        if hp.importance_sampling_level == "sequence":
            ppo_math.sequence_level_aggregation(hp.loss_aggregation)  # GSPO averages over responses
        if hp.dynamic_sampling and groups < 2:
            raise ConfigError("ppo.dynamic_sampling drops groups of equal scores: set generation.num_generations >= 2")
        if self.policy_config.critic == "adapter" and self.device_mesh is not None:
            raise ConfigError("policy.critic=adapter is not supported with sharding (ModelParallelStrategy) yet")
        if hp.rollout_correction == "tis" and self.sampling.engine != "vllm":
            raise ConfigError("ppo.rollout_correction=tis corrects for an engine's sampling: it needs generation.engine: vllm")
        if self.sampling.engine == "vllm":
            from lit_rlhf.engines import check_engine_supports

            strategy = type(self._trainer.strategy).__name__ if self._trainer is not None else ""
            check_engine_supports(self.policy_config.quantization, strategy)
        if self.reference_config.model_name_or_path is not None and not self.uses_reference:
            warnings.warn(
                "reference.model_name_or_path is set but ppo.kl_coef is 0 and ppo.kl_in_loss is false: the "
                "reference is not used and not loaded", UserWarning, stacklevel=2,
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
                    "or FSDP2 to shard weights (recipes/llama3.1-8b-fsdp2.yaml)"
                )
            if self.ppo_config.gradient_accumulation_steps > 1:
                raise ConfigError(
                    "ppo.gradient_accumulation_steps > 1 is not supported with the DeepSpeed strategy: use more "
                    "ppo.num_minibatches (smaller minibatches) or the FSDP/DDP strategy"
                )
            if self.ppo_config.max_grad_norm is not None:
                strategy.config.setdefault("gradient_clipping", self.ppo_config.max_grad_norm)

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
    # One PPO iteration
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = self.make_rollout(batch)
        rollout_seconds = time.perf_counter() - start
        train_stats = self.ppo_update(rollout)
        if rollout.logprobs_from_update:  # the statistics that needed the rollout's log-probs
            rollout.stats |= self._log_prob_stats(rollout)
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
        """Sample ``num_generations`` responses per prompt, score them, and compute advantages with the
        configured estimator (GAE on KL-penalized rewards, or a critic-free one)."""
        ppo_cfg = self.ppo_config
        self.policy.eval()
        self.sampling_seconds = 0.0  # sample() adds its time: the engine's share of the rollout
        samples = self.sample(batch)
        raw_scores, each_reward = self.score(samples)
        dynamic_stats: dict[str, float] = {}
        if ppo_cfg.dynamic_sampling:
            samples, raw_scores, each_reward, dynamic_stats = self._dynamic_sampling(samples, raw_scores, each_reward)
        queries, responses, mask = samples.queries, samples.responses, samples.mask
        context_length = queries.shape[1]
        query_responses = torch.cat([queries, responses], dim=1)
        attention_mask = torch.cat([samples.query_mask, mask.long()], dim=1)
        # an engine's log-probs include its top-k / top-p filtering: the trainer's are compared like for like
        sampling = self.sampling
        filtered = samples.engine_logprobs is not None and (sampling.top_k > 0 or sampling.top_p < 1.0)
        from_update = self._logprobs_from_update(samples)
        if from_update:  # one update of the whole rollout: its pass gives the old log-probs (as TRL's GRPO does)
            out = ResponseOutput(torch.zeros_like(mask), None, None)
        else:
            out = self.policy(query_responses, attention_mask, context_length, sampling.temperature,
                              sampling_filter=(sampling.top_k, sampling.top_p) if filtered else None)
        values = out.values * mask if out.values is not None else None
        ref_logprobs = self.reference_logprobs(query_responses, attention_mask, context_length) if self.uses_reference else None

        lengths = mask.sum(1).long()
        has_stop = self._ends_with_stop(responses, lengths)
        scores = self.shape_scores(raw_scores, has_stop, lengths)
        engine_stats, token_weights = {}, None
        if samples.engine_logprobs is not None:
            trainer_logprobs = out.filtered_logprobs if filtered else out.logprobs
            engine_stats = self._engine_agreement(samples.engine_logprobs, trainer_logprobs, mask)
            if ppo_cfg.rollout_correction == "tis":
                token_weights = ppo_math.truncated_importance_weights(
                    trainer_logprobs, samples.engine_logprobs, ppo_cfg.tis_cap) * mask
            self.engine.sleep()  # its memory is the PPO passes' until the next rollout (GPU)
        kl = (ppo_math.kl_penalty(out.logprobs, ref_logprobs, ppo_cfg.kl_estimator) * mask
              if ref_logprobs is not None and not from_update else torch.zeros_like(mask))
        advantages, returns, rewards = self.estimate_advantages(scores, kl, values, mask)
        loss_mask = mask * has_stop.unsqueeze(1).to(mask.dtype) if self.reward_config.mask_truncated else None

        stats = {
            "objective/scores": scores.mean(),
            "objective/raw_scores": raw_scores.mean(),
            "val/num_eos_tokens": has_stop.float().sum(),
            "val/response_length": lengths.float().mean(),
            # diversity of the completions: distinct token bigrams among all (a collapsed policy goes to ~0)
            "val/distinct_2": ppo_math.distinct_n([r[:n] for r, n in zip(responses.tolist(), lengths.tolist())]),
            **{f"reward/{name}": value.mean() for name, value in each_reward.items() if len(each_reward) > 1},
            **dynamic_stats,
            **engine_stats,
            "perf/generate_sec": self.sampling_seconds,
        }
        rollout = Rollout(
            query_responses, attention_mask, context_length, mask, out.logprobs, values, advantages, returns,
            stats, samples.prompts, samples.completions, scores, kl, rewards, ref_logprobs, loss_mask, token_weights,
            from_update,
        )
        if not from_update:
            rollout.stats |= self._log_prob_stats(rollout)
        return rollout

    def _logprobs_from_update(self, samples: Samples) -> bool:
        """Whether the rollout's (old) log-probs can come from the update itself instead of a pass of their own:
        one update of the whole rollout (1 PPO epoch, 1 minibatch), where the ratio is 1 with the gradient of
        the log-probs, and nothing needs them before it (no critic, no KL in the reward, no engine to check)."""
        hp = self.ppo_config
        return (hp.ppo_epochs == 1 and hp.num_minibatches == 1 and not self.uses_critic and hp.kl_coef == 0
                and not hp.adaptive_kl and samples.engine_logprobs is None)

    def _log_prob_stats(self, rollout: Rollout) -> dict[str, Tensor]:
        """The statistics of the rollout's log-probs: the KL to the reference (also in ``rollout.kl``, when the
        update filled in the log-probs), the entropy estimate and the KL part of the reward."""
        mask = rollout.mask
        if rollout.logprobs_from_update and rollout.ref_logprobs is not None:
            rollout.kl = ppo_math.kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.ppo_config.kl_estimator) * mask
        non_score_reward = (-self.kl_controller.value * rollout.kl).sum(1).mean()
        return {
            "objective/kl": rollout.kl.sum(1).mean(),
            # TRL's definition: the sampled tokens' negative log-probs, summed per response (no vocabulary pass)
            "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": rollout.scores.mean() + non_score_reward,
        }

    def _engine_agreement(self, engine_logprobs: Tensor, logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """How far the engine's log-probs of the sampled tokens are from the trainer's, over all ranks: a stale
        or missing weight sync shows here at once."""
        difference = (engine_logprobs - logprobs).abs() * mask
        total = self._all_reduce_sum(torch.stack([difference.sum(), mask.sum()]))
        largest = difference.max()
        if self._trainer is not None and self.trainer.world_size > 1:
            largest = self.trainer.strategy.reduce(largest.clone(), reduce_op="max")
        return {"rollout/logprob_diff_mean": total[0] / total[1].clamp(min=1), "rollout/logprob_diff_max": largest}

    def sample(self, batch: dict[str, Any], sampling: Optional[SamplingConfig] = None) -> Samples:
        """``num_generations`` responses to each prompt of ``batch`` (consecutive rows form a group)."""
        sampling = sampling or self.sampling
        groups = sampling.num_generations
        queries, query_mask = batch["input_ids"], batch["attention_mask"]
        if groups > 1:
            queries, query_mask = queries.repeat_interleave(groups, 0), query_mask.repeat_interleave(groups, 0)
        self._check_sequence_length(queries.shape[1], sampling.max_new_tokens)
        engine_logprobs, start = None, time.perf_counter()
        if self.engine is not None and sampling.temperature > 0:
            responses, engine_logprobs = self._engine_sample(queries, query_mask, sampling)
        else:
            responses = sample_responses(
                self.policy, queries, query_mask, sampling, self.stop_token_ids, self.tokenizer.pad_token_id,
                synced_gpus=self.parameters_are_sharded(),
            )
        self.sampling_seconds += time.perf_counter() - start
        mask = response_mask(responses, self.stop_token_ids)
        lengths = mask.sum(1).long().tolist()
        completions = [self.tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(responses.tolist(), lengths)]
        repeat = lambda values: [v for v in values for _ in range(groups)]  # noqa: E731
        columns = {k: repeat(v) for k, v in (batch.get("columns") or {}).items()}
        return Samples(queries, query_mask, responses, mask, repeat(batch["prompts"]), completions, columns,
                       engine_logprobs * mask if engine_logprobs is not None else None)

    def _engine_sample(self, queries: Tensor, query_mask: Tensor, sampling: SamplingConfig) -> tuple[Tensor, Tensor]:
        """Responses sampled by the vLLM engine, after giving it this iteration's weights (once per iteration).

        Each response gets a seed drawn from torch's generator, whose state checkpoints keep: a resumed run
        samples what the uninterrupted one would have.
        """
        from lit_rlhf.engines import left_unpadded, merged_policy_weights, pad_responses

        if self._engine_iteration != self.iteration:
            # the first sync loads every weight (a tied checkpoint's embedding may not have reached the engine);
            # later ones only the blocks with adapted layers, the rest never changes
            self.engine.sync(merged_policy_weights(self.policy.model, POLICY_ADAPTER, self.engine.version > 0))
            self._engine_iteration = self.iteration
        seeds = torch.randint(0, 2**31 - 1, (queries.shape[0],), device="cpu").tolist()
        tokens, logprobs = self.engine.generate(
            left_unpadded(queries, query_mask), sampling.max_new_tokens, sampling.temperature, sampling.top_k,
            sampling.top_p, self.stop_token_ids, seeds,
        )
        return pad_responses(tokens, logprobs, self.tokenizer.pad_token_id, queries.device)

    def score(self, samples: Samples) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total score of each response, and each reward source's own scores."""
        query_responses = torch.cat([samples.queries, samples.responses], dim=1)
        attention_mask = torch.cat([samples.query_mask, samples.mask.long()], dim=1)
        total, each = self.rewards(samples.prompts, samples.completions, samples.columns, query_responses,
                                   attention_mask)
        return total.to(self.device), {k: v.to(self.device) for k, v in each.items()}

    def shape_scores(self, scores: Tensor, has_stop: Tensor, lengths: Tensor) -> Tensor:
        """Penalties (missing stop token, overlong), then normalization and clipping of the scores."""
        cfg = self.reward_config
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_stop).float()
        if cfg.overlong_penalty is not None:
            scores = scores + ppo_math.overlong_penalty(
                lengths, self.sampling.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty
            ).to(scores.dtype)
        if cfg.normalize == "running":
            self.score_moments.update(self._gather(scores))
            scores = self.score_moments.normalize(scores)
        elif cfg.normalize == "fixed":
            scores = (scores - cfg.shift) / cfg.scale
        if cfg.clip is not None:
            scores = scores.clamp(-cfg.clip, cfg.clip)
        return scores

    def estimate_advantages(
        self, scores: Tensor, kl: Tensor, values: Optional[Tensor], mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Advantages, returns and per-token rewards ``[batch, len]`` of the configured estimator, with the
        statistics of every rank (:func:`lit_rlhf.advantages.estimate_advantages`)."""
        return estimate_advantages(scores, kl, values, mask, self.ppo_config, self.sampling.num_generations,
                                   self.kl_controller.value, self._all_reduce_sum)

    def _dynamic_sampling(
        self, samples: Samples, scores: Tensor, each: dict[str, Tensor]
    ) -> tuple[Samples, Tensor, dict[str, Tensor], dict[str, float]]:
        """DAPO's dynamic sampling: replace groups whose scores are all equal (zero advantage: no signal)
        with groups of new prompts, up to ``dynamic_sampling_max_retries`` rounds; fill what is still
        missing with dropped groups, so the batch keeps its size."""
        groups = self.sampling.num_generations
        wanted = len(samples) // groups
        kept, dropped, kept_scores, dropped_scores = [], [], [], []
        first_dropped, retries = 0, 0
        part, part_scores, part_each = samples, scores, each
        while True:
            informative = ppo_math._groups(part_scores, groups).std(1) > 0 if groups > 1 else torch.ones(len(part), dtype=torch.bool)
            for group, useful in enumerate(informative.tolist()):
                rows = list(range(group * groups, (group + 1) * groups))
                target, target_scores = (kept, kept_scores) if useful else (dropped, dropped_scores)
                target.append(part.select(rows))
                target_scores.append((part_scores[rows], {k: v[rows] for k, v in part_each.items()}))
            if retries == 0:
                first_dropped = len(dropped)
            # decided together: sampling again runs generate, whose collectives (sharded weights) every rank must
            # join, so a rank with enough groups samples along with the one that lacks the most (and keeps its own)
            missing = self._max_over_ranks(wanted - len(kept))
            if missing <= 0 or retries >= self.ppo_config.dynamic_sampling_max_retries:
                break
            retries += 1
            part = self.sample(self._replacement_prompts(missing, retries))
            part_scores, part_each = self.score(part)
        chosen = (kept + dropped)[:wanted]
        chosen_scores = (kept_scores + dropped_scores)[:wanted]
        merged = Samples.concat(chosen, self.tokenizer.pad_token_id)
        total = torch.cat([s for s, _ in chosen_scores])
        merged_each = {k: torch.cat([e[k] for _, e in chosen_scores]) for k in each}
        stats = {
            "dynamic_sampling/dropped_groups": float(first_dropped),
            "dynamic_sampling/retries": float(retries),
            "dynamic_sampling/filled_with_dropped": float(max(wanted - len(kept), 0)),
        }
        return merged, total, merged_each, stats

    def _replacement_prompts(self, count: int, retry: int) -> dict[str, Any]:
        """``count`` prompts for dynamic sampling, drawn from the data by a generator seeded with the
        iteration and the retry (so a resumed run draws the same ones)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "random_batch"):
            raise ConfigError("ppo.dynamic_sampling needs lit-rlhf's PromptDataModule (data:) to draw new prompts")
        seed = (self.iteration * 1_000 + retry) * max(self.trainer.world_size, 1) + self.trainer.global_rank
        batch = datamodule.random_batch(count, seed)
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _ends_with_stop(self, responses: Tensor, lengths: Tensor) -> Tensor:
        """Whether each response ended with a stop token (not cut at ``max_new_tokens``)."""
        if not self.stop_token_ids:
            return torch.zeros(responses.shape[0], dtype=torch.bool, device=responses.device)
        last_tokens = responses.gather(1, (lengths.clamp(min=1) - 1).unsqueeze(1)).squeeze(1)
        stops = torch.as_tensor(self.stop_token_ids, dtype=last_tokens.dtype, device=last_tokens.device)
        return torch.isin(last_tokens, stops) & (lengths > 0)

    @property
    def uses_critic(self) -> bool:
        """Whether the advantages need a value function (``gae``)."""
        return self.ppo_config.advantage_estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        """Whether a reference is computed at all: not with ``kl_coef: 0`` and no ``kl_in_loss``."""
        return self.ppo_config.kl_coef != 0 or self.ppo_config.kl_in_loss

    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor, context_length: int) -> Tensor:
        """Log-probs of the responses under the reference: the separate model, or the adapter-free policy."""
        temperature = self.sampling.temperature
        if self.reference is not None:
            return response_forward(self.reference, input_ids, attention_mask, context_length, temperature).logprobs
        return self.policy.reference_logprobs(input_ids, attention_mask, context_length, temperature)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Evaluation on held-out prompts (``data.val_path``): completions as ``model.evaluation`` says,
        scored by the run's rewards, logged under ``eval/`` (TRL's ``val/`` names mean training statistics)."""
        metrics, prompts = self.evaluate(batch)
        for name, value in metrics.items():
            self.log(name, value, batch_size=prompts, sync_dist=True, prog_bar=name == "eval/score")

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], int]:
        """The ``eval/`` metrics of one batch of held-out prompts, and how many prompts it held; the completions
        go to ``eval_samples.jsonl`` in the run's folder."""
        cfg = self.evaluation
        k = cfg.num_samples
        sampling = replace(self.sampling, temperature=cfg.temperature, num_generations=k,
                           max_new_tokens=cfg.max_new_tokens or self.sampling.max_new_tokens)
        samples = self.sample(batch, sampling)
        scores, each = self.score(samples)
        passed = (scores >= cfg.pass_threshold).float().view(-1, k)
        self._write_eval_samples(samples, scores)
        metrics = {
            "eval/score": scores.mean(),
            "eval/response_length": samples.mask.sum(1).float().mean(),
            "eval/pass@1": passed.mean(),
            **({f"eval/pass@{k}": passed.max(1).values.mean()} if k > 1 else {}),
            **{f"eval/reward/{name}": value.mean() for name, value in each.items() if len(each) > 1},
        }
        return metrics, passed.shape[0]

    def _write_eval_samples(self, samples: Samples, scores: Tensor) -> None:
        """Append the held-out completions, with the iteration they were evaluated at (0: before training)."""
        if self._trainer is None or self.trainer.sanity_checking:
            return
        from lit_rlhf.runs import run_directory

        directory = run_directory(self.trainer)  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / "eval_samples.jsonl", "a") as file:
                for prompt, completion, score in zip(samples.prompts, samples.completions, scores.tolist()):
                    file.write(json.dumps({"iteration": self.iteration, "prompt": prompt, "completion": completion,
                                           "score": score}) + "\n")

    @torch.no_grad()
    def evaluate_before_training(self) -> dict[str, float]:
        """``evaluation.before_training``: the held-out metrics of the policy as it starts, logged at step 0
        (Lightning's validation runs only after training steps), averaged over prompts and ranks."""
        datamodule = getattr(self.trainer, "datamodule", None)
        loaders = datamodule.val_dataloader() if datamodule is not None else []
        totals: dict[str, Tensor] = {}
        prompts = torch.zeros((), device=self.device)
        for loader in loaders if isinstance(loaders, list) else [loaders]:
            for batch in loader:
                metrics, count = self.evaluate(self.transfer_batch_to_device(batch, self.device, 0))
                for name, value in metrics.items():
                    totals[name] = totals.get(name, torch.zeros((), device=self.device)) + value.float() * count
                prompts += count
        if not totals:
            return {}
        names = sorted(totals)
        summed = self._all_reduce_sum(torch.stack([totals[name] for name in names] + [prompts]))
        metrics = {name: float(value / summed[-1]) for name, value in zip(names, summed[:-1])}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=0)
        return metrics

    def ppo_update(self, rollout: Rollout) -> dict[str, Tensor]:
        """``ppo_epochs`` passes of shuffled minibatches over the rollout, one optimizer step each.

        A minibatch's loss is normalized over the whole minibatch on all ranks (its tokens or responses, as
        ``loss_aggregation`` says), so it does not depend on how the minibatch is split into micro-batches
        (``gradient_accumulation_steps``) or ranks.
        """
        hp = self.ppo_config
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        # training mode, where transformers applies gradient checkpointing; dropout is off if disable_dropout
        # (configure_model set its probabilities to 0)
        self.policy.train()
        batch_size = rollout.mask.shape[0]
        minibatch_size, micro_size = self._minibatch_sizes(batch_size // self.sampling.num_generations)
        # strategies average the gradients of the ranks: a rank's part of the global loss is scaled back up
        world_size = self.trainer.world_size if self._trainer is not None else 1
        history: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(hp.ppo_epochs):
            epoch_approx_kl = []
            order = torch.randperm(batch_size, device=rollout.mask.device)
            for minibatch in order.split(minibatch_size):
                losses = []
                micros = minibatch.split(micro_size)
                normalizers = self._loss_normalizers(rollout, minibatch)
                parts: dict[str, list[Tensor]] = defaultdict(list)
                for position, micro in enumerate(micros):
                    loss, stats = self.ppo_loss(rollout, micro, normalizers)
                    # under DDP, gradients are averaged across ranks once per minibatch, on its last micro-batch
                    last = position == len(micros) - 1
                    with nullcontext() if last else self._no_gradient_sync():
                        self.manual_backward(loss * world_size)
                    losses.append(loss.detach())
                    for name, value in stats.items():
                        parts[name].append(value)
                for name, values in parts.items():
                    # a loss is the sum of its micro-batch parts (x ranks: the logged mean over ranks is the
                    # minibatch's loss); other statistics are means over the micro-batches
                    stacked = torch.stack(values)
                    history[name].append(stacked.sum() * world_size if name.startswith("loss/") else stacked.mean())
                epoch_approx_kl.append(history["policy/approxkl_avg"][-1])
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

    def _loss_normalizers(self, rollout: Rollout, rows: Tensor) -> dict[str, Tensor]:
        """What the losses of the minibatch ``rows`` divide by, summed over all ranks: ``policy`` for the policy,
        entropy and KL terms (as ``loss_aggregation`` says), ``tokens`` (its loss tokens) for the value loss."""
        loss_mask = (rollout.loss_mask if rollout.loss_mask is not None else rollout.mask)[rows]
        counts = self._all_reduce_sum(torch.stack([
            ppo_math.aggregation_count(loss_mask, self._loss_aggregation(), self.sampling.max_new_tokens).float(),
            loss_mask.sum().float(),
        ]))
        return {"policy": counts[0], "tokens": counts[1]}

    def _loss_aggregation(self) -> ppo_math.LossAggregation:
        """``ppo.loss_aggregation``, or the per-response mean it stands for under GSPO."""
        hp = self.ppo_config
        if hp.importance_sampling_level == "sequence":
            return ppo_math.sequence_level_aggregation(hp.loss_aggregation)
        return hp.loss_aggregation

    def ppo_loss(
        self, rollout: Rollout, index: Tensor, normalizers: Optional[dict[str, Tensor]] = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss (+ ``vf_coef`` x clipped value loss with a critic, + ``kl_loss_coef`` x k3 KL
        with ``kl_in_loss``, - entropy bonus) on rows ``index``. With ``normalizers`` (``_loss_normalizers``
        of a minibatch) it is these rows' part of the minibatch's loss; without, the rows are the minibatch."""
        hp = self.ppo_config
        input_ids, attention_mask, context_length = trim_padding(
            rollout.query_responses[index], rollout.attention_mask[index], rollout.context_length
        )
        response_len = input_ids.shape[1] - context_length
        mask = rollout.mask[index, :response_len]
        loss_mask = rollout.loss_mask[index, :response_len] if rollout.loss_mask is not None else mask
        normalizers = normalizers or {}
        out = self.policy(
            input_ids, attention_mask, context_length, self.sampling.temperature, with_entropy=True,
            entropy_grad=hp.ent_coef != 0,  # otherwise only a statistic: no graph, no backward through it
        )
        mode, max_new_tokens = self._loss_aggregation(), self.sampling.max_new_tokens
        weights = rollout.token_weights[index, :response_len] if rollout.token_weights is not None else None
        if rollout.logprobs_from_update:  # the only pass over these rows: its log-probs are the old ones
            rollout.logprobs[index, :response_len] = out.logprobs.detach()
        pg_loss, pg_stats = ppo_math.policy_loss(
            out.logprobs, rollout.logprobs[index, :response_len], rollout.advantages[index, :response_len],
            loss_mask, hp.clip_range, hp.clip_range_high, hp.importance_sampling_level == "sequence", mode,
            max_new_tokens, weights, normalizers.get("policy"),
        )
        entropy = ppo_math.masked_mean(out.entropy, mask)
        loss = pg_loss
        if hp.ent_coef:
            loss = loss - hp.ent_coef * ppo_math.aggregate(out.entropy, loss_mask, mode, max_new_tokens,
                                                           normalizers.get("policy"))
        stats = {
            "policy/approxkl_avg": pg_stats["approx_kl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "loss/policy_avg": pg_loss.detach(),
            "policy/entropy_avg": entropy.detach(),
            "val/ratio": pg_stats["ratio"],
        }
        if rollout.values is not None:
            vf_loss, vf_stats = ppo_math.value_loss(
                out.values, rollout.values[index, :response_len], rollout.returns[index, :response_len], loss_mask,
                hp.clip_range_value, normalizers.get("tokens"),
            )
            loss = loss + hp.vf_coef * vf_loss
            stats |= {"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_stats["clipfrac"]}
        if hp.kl_in_loss:
            kl = ppo_math.kl_penalty(out.logprobs, rollout.ref_logprobs[index, :response_len], "k3")
            kl_loss = ppo_math.aggregate(kl, loss_mask, mode, max_new_tokens, normalizers.get("policy"))
            loss = loss + hp.kl_loss_coef * kl_loss
            stats["loss/kl_avg"] = kl_loss.detach()
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
        """Minibatch and micro-batch sizes for ``data.batch_size`` prompts (x ``num_generations`` responses)."""
        hp, groups = self.ppo_config, self.sampling.num_generations
        per_step = hp.num_minibatches * hp.gradient_accumulation_steps
        rows = batch_size * groups
        if rows % per_step:
            times = f" x generation.num_generations={groups} = {rows} responses" if groups > 1 else ""
            raise ConfigError(
                f"data.batch_size={batch_size}{times} is not divisible by ppo.num_minibatches={hp.num_minibatches} "
                f"x ppo.gradient_accumulation_steps={hp.gradient_accumulation_steps}: choose values that divide it"
            )
        minibatch_size = rows // hp.num_minibatches
        return minibatch_size, minibatch_size // hp.gradient_accumulation_steps

    def _check_sequence_length(self, context_length: int, max_new_tokens: int) -> None:
        limit = getattr(self.policy.model.config, "max_position_embeddings", None)
        total = context_length + max_new_tokens
        if limit is not None and total > limit:
            raise ConfigError(
                f"Prompt length {context_length} + {max_new_tokens} new tokens = {total} exceeds the model's context "
                f"of {limit} tokens: lower data.max_prompt_length, generation.max_new_tokens or evaluation.max_new_tokens"
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

    def _max_over_ranks(self, value: int) -> int:
        """The largest of every rank's ``value`` (``value`` itself in a single-process run)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return int(self.trainer.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="max"))

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl_controller.state_dict()
        checkpoint["score_moments"] = self.score_moments.state_dict()
        checkpoint["ppo_progress"] = {"iteration": self.iteration, "skipped_updates": self.skipped_updates}

    def on_train_start(self) -> None:
        super().on_train_start()  # the optimizer follows the recipe (also after a resume)
        if self.evaluation.before_training and self.iteration == 0 and self.trainer.ckpt_path is None:
            self.evaluate_before_training()

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
            self.skipped_updates = checkpoint["ppo_progress"]["skipped_updates"]

    def on_train_end(self) -> None:
        """Write the trained adapter (peft format) and value head next to the logs."""
        from lit_rlhf.runs import run_directory

        directory = run_directory(self.trainer) / "policy"  # a collective under DDP: every rank must ask
        self.policy.save_pretrained(directory, is_main_process=self.trainer.is_global_zero)  # gathers if sharded
        if self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(directory)


class _ModelReward:
    """A reward model as a reward source of :class:`~lit_rlhf.rewards.RewardSet`."""

    def __init__(self, model: SequenceClassifierReward) -> None:
        self.model = model

    def __call__(self, prompts: list[str], completions: list[str], input_ids: Tensor, attention_mask: Tensor,
                 **_: Any) -> Tensor:
        return self.model(prompts, completions, input_ids, attention_mask)


@contextmanager
def _fsdp_gradient_sync_off(module: Any) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory on GPU, else peak resident memory of this process, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
