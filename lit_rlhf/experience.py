"""Producing a :class:`Rollout` from a batch of prompts: sample (Hugging Face ``generate`` or the vLLM engine),
score, shape the scores, check the engine against the trainer, DAPO's dynamic sampling, then the forward passes
(old log-probs, values, reference) and the advantages.

A producer is called with a batch and returns a ``Rollout``; :class:`SingleTurnProducer` answers each prompt
once, :class:`lit_rlhf.multiturn.MultiTurnProducer` plays whole conversations with an environment. Both read
the models and settings of the :class:`~lit_rlhf.module.PPOModule` they serve (its ``host``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from lit_rlhf import ppo as ppo_math
from lit_rlhf.advantages import estimate_advantages
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import POLICY_ADAPTER, ResponseOutput
from lit_rlhf.rollout import Samples, SamplingConfig, response_mask, sample_responses

if TYPE_CHECKING:
    from lit_rlhf.module import PPOModule


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
    logprobs_from_update: bool = False  # ``logprobs`` are filled in by the (single) update pass, see assemble
    conversations: Optional[list[list[dict[str, str]]]] = None  # multi-turn: each trajectory's messages

    def samples(self) -> dict[str, list]:
        """Per-response rows for sample tables: prompt, completion, score, KL and total reward (and the whole
        conversation of a multi-turn trajectory)."""
        rows = {
            "prompt": self.prompts,
            "completion": self.completions,
            "score": self.scores.tolist(),
            "kl": self.kl.sum(1).tolist(),
            "reward": self.rewards.sum(1).tolist(),
        }
        if self.conversations is not None:
            rows["conversation"] = self.conversations
        return rows


class RolloutProducer:
    """What every producer shares: sampling, scoring, score shaping, and turning samples into a ``Rollout``."""

    def __init__(self, host: PPOModule) -> None:
        self.host = host
        self.engine_iteration = -1  # the iteration whose weights the engine holds
        self.sampling_seconds = 0.0  # time in sample() during the current rollout (perf/generate_sec)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> Rollout:
        """Sample ``num_generations`` responses (or trajectories) per prompt, score them, and compute advantages
        with the configured estimator (GAE on KL-penalized rewards, or a critic-free one)."""
        host = self.host
        host.policy.eval()
        self.sampling_seconds = 0.0  # sample() adds its time: the engine's share of the rollout
        samples = self.sample(batch)
        raw_scores, each_reward = self.score(samples)
        stats: dict[str, Any] = self.sample_stats()
        if host.ppo_config.dynamic_sampling:
            samples, raw_scores, each_reward, dynamic_stats = self.dynamic_sampling(samples, raw_scores, each_reward)
            stats = {**dynamic_stats, **stats}
        return self.assemble(samples, raw_scores, each_reward, stats)

    def sample_stats(self) -> dict[str, float]:
        """Statistics of the last ``sample`` call beyond the usual ones (a multi-turn producer's ``env/``)."""
        return {}

    # ----------------------------------------------------------------------------------------------
    # Sampling
    def sample(self, batch: dict[str, Any], sampling: Optional[SamplingConfig] = None) -> Samples:
        """``num_generations`` responses to each prompt of ``batch`` (consecutive rows form a group)."""
        host = self.host
        sampling = sampling or host.sampling
        groups = sampling.num_generations
        queries, query_mask = batch["input_ids"], batch["attention_mask"]
        if groups > 1:
            queries, query_mask = queries.repeat_interleave(groups, 0), query_mask.repeat_interleave(groups, 0)
        responses, engine_logprobs = self.sample_tokens(queries, query_mask, sampling)
        mask = response_mask(responses, host.stop_token_ids)
        lengths = mask.sum(1).long().tolist()
        completions = [host.tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(responses.tolist(), lengths)]
        repeat = lambda values: [v for v in values for _ in range(groups)]  # noqa: E731
        columns = {k: repeat(v) for k, v in (batch.get("columns") or {}).items()}
        return Samples(queries, query_mask, responses, mask, repeat(batch["prompts"]), completions, columns,
                       engine_logprobs * mask if engine_logprobs is not None else None)

    def sample_tokens(self, queries: Tensor, query_mask: Tensor, sampling: SamplingConfig) -> tuple[Tensor, Optional[Tensor]]:
        """Responses ``[rows, len]`` to left-padded ``queries`` (padded after their first stop token), and the
        engine's log-probs of the sampled tokens (None with Hugging Face ``generate``)."""
        host = self.host
        host.check_sequence_length(queries.shape[1], sampling.max_new_tokens)
        engine_logprobs, start = None, time.perf_counter()
        if host.engine is not None and sampling.temperature > 0:
            responses, engine_logprobs = self._engine_sample(queries, query_mask, sampling)
        else:
            responses = sample_responses(
                host.policy, queries, query_mask, sampling, host.stop_token_ids, host.tokenizer.pad_token_id,
                synced_gpus=host.parameters_are_sharded(),
            )
        self.sampling_seconds += time.perf_counter() - start
        return responses, engine_logprobs

    def _engine_sample(self, queries: Tensor, query_mask: Tensor, sampling: SamplingConfig) -> tuple[Tensor, Tensor]:
        """Responses sampled by the vLLM engine, after giving it this iteration's weights (once per iteration).

        Each response gets a seed drawn from torch's generator, whose state checkpoints keep: a resumed run
        samples what the uninterrupted one would have.
        """
        from lit_rlhf.engines import left_unpadded, merged_policy_weights, pad_responses

        host = self.host
        if self.engine_iteration != host.iteration:
            # the first sync loads every weight (a tied checkpoint's embedding may not have reached the engine);
            # later ones only the blocks with adapted layers, the rest never changes
            host.engine.sync(merged_policy_weights(host.policy.model, POLICY_ADAPTER, host.engine.version > 0))
            self.engine_iteration = host.iteration
        seeds = torch.randint(0, 2**31 - 1, (queries.shape[0],), device="cpu").tolist()
        tokens, logprobs = host.engine.generate(
            left_unpadded(queries, query_mask), sampling.max_new_tokens, sampling.temperature, sampling.top_k,
            sampling.top_p, host.stop_token_ids, seeds,
        )
        return pad_responses(tokens, logprobs, host.tokenizer.pad_token_id, queries.device)

    # ----------------------------------------------------------------------------------------------
    # Scores
    def score(self, samples: Samples) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total score of each response, and each reward source's own scores."""
        query_responses = torch.cat([samples.queries, samples.responses], dim=1)
        attention_mask = torch.cat([samples.query_mask, samples.attention.long()], dim=1)
        total, each = self.host.rewards(samples.prompts, samples.completions, samples.columns, query_responses,
                                        attention_mask)
        device = self.host.device
        return total.to(device), {k: v.to(device) for k, v in each.items()}

    def shape_scores(self, scores: Tensor, has_stop: Tensor, lengths: Tensor) -> Tensor:
        """Penalties (missing stop token, overlong), then normalization and clipping of the scores."""
        host = self.host
        cfg = host.reward_config
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_stop).float()
        if cfg.overlong_penalty is not None:
            scores = scores + ppo_math.overlong_penalty(
                lengths, host.sampling.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty
            ).to(scores.dtype)
        if cfg.normalize == "running":
            host.score_moments.update(host.ranks.gather(scores))
            scores = host.score_moments.normalize(scores)
        elif cfg.normalize == "fixed":
            scores = (scores - cfg.shift) / cfg.scale
        if cfg.clip is not None:
            scores = scores.clamp(-cfg.clip, cfg.clip)
        return scores

    def ends_with_stop(self, responses: Tensor, lengths: Tensor) -> Tensor:
        """Whether each response ended with a stop token (not cut at ``max_new_tokens``)."""
        stop_ids = self.host.stop_token_ids
        if not stop_ids:
            return torch.zeros(responses.shape[0], dtype=torch.bool, device=responses.device)
        last_tokens = responses.gather(1, (lengths.clamp(min=1) - 1).unsqueeze(1)).squeeze(1)
        stops = torch.as_tensor(stop_ids, dtype=last_tokens.dtype, device=last_tokens.device)
        return torch.isin(last_tokens, stops) & (lengths > 0)

    # ----------------------------------------------------------------------------------------------
    # From samples to a rollout
    def assemble(self, samples: Samples, raw_scores: Tensor, each_reward: dict[str, Tensor],
                 extra_stats: dict[str, Any]) -> Rollout:
        """The forward passes over the sampled tokens (old log-probs, values, reference), the engine check, the
        shaped scores, the KL and the advantages of the configured estimator."""
        host = self.host
        ppo_cfg, sampling = host.ppo_config, host.sampling
        queries, responses, mask = samples.queries, samples.responses, samples.mask
        context_length = queries.shape[1]
        query_responses = torch.cat([queries, responses], dim=1)
        attention_mask = torch.cat([samples.query_mask, samples.attention.long()], dim=1)
        # an engine's log-probs include its top-k / top-p filtering: the trainer's are compared like for like
        filtered = samples.engine_logprobs is not None and (sampling.top_k > 0 or sampling.top_p < 1.0)
        from_update = self.logprobs_from_update(samples)
        if from_update:  # one update of the whole rollout: its pass gives the old log-probs (as TRL's GRPO does)
            out = ResponseOutput(torch.zeros_like(mask), None, None)
        else:
            out = host.policy(query_responses, attention_mask, context_length, sampling.temperature,
                              sampling_filter=(sampling.top_k, sampling.top_p) if filtered else None)
        values = out.values * mask if out.values is not None else None
        ref_logprobs = (host.reference_logprobs(query_responses, attention_mask, context_length)
                        if host.uses_reference else None)

        lengths = mask.sum(1).long()
        has_stop = samples.ended if samples.ended is not None else self.ends_with_stop(responses, lengths)
        scores = self.shape_scores(raw_scores, has_stop, lengths)
        engine_stats, token_weights = {}, None
        if samples.engine_logprobs is not None:
            trainer_logprobs = out.filtered_logprobs if filtered else out.logprobs
            engine_stats = self.engine_agreement(samples.engine_logprobs, trainer_logprobs, mask)
            if ppo_cfg.rollout_correction == "tis":
                token_weights = ppo_math.truncated_importance_weights(
                    trainer_logprobs, samples.engine_logprobs, ppo_cfg.tis_cap) * mask
            host.engine.sleep()  # its memory is the PPO passes' until the next rollout (GPU)
        kl = (ppo_math.kl_penalty(out.logprobs, ref_logprobs, ppo_cfg.kl_estimator) * mask
              if ref_logprobs is not None and not from_update else torch.zeros_like(mask))
        advantages, returns, rewards = estimate_advantages(
            scores, kl, values, mask, ppo_cfg, sampling.num_generations, host.kl_controller.value, host.ranks.sum,
            samples.step_rewards)
        loss_mask = mask * has_stop.unsqueeze(1).to(mask.dtype) if host.reward_config.mask_truncated else None

        model_tokens = [[t for t, m in zip(r, row_mask) if m] for r, row_mask in zip(responses.tolist(), mask.tolist())]
        stats = {
            "objective/scores": scores.mean(),
            "objective/raw_scores": raw_scores.mean(),
            "val/num_eos_tokens": has_stop.float().sum(),
            "val/response_length": lengths.float().mean(),
            # diversity of the completions: distinct token bigrams among all (a collapsed policy goes to ~0)
            "val/distinct_2": ppo_math.distinct_n(model_tokens),
            **{f"reward/{name}": value.mean() for name, value in each_reward.items() if len(each_reward) > 1},
            **extra_stats,
            **engine_stats,
            "perf/generate_sec": self.sampling_seconds,
        }
        rollout = Rollout(
            query_responses, attention_mask, context_length, mask, out.logprobs, values, advantages, returns,
            stats, samples.prompts, samples.completions, scores, kl, rewards, ref_logprobs, loss_mask, token_weights,
            from_update, samples.conversations,
        )
        if not from_update:
            rollout.stats |= self.log_prob_stats(rollout)
        return rollout

    def logprobs_from_update(self, samples: Samples) -> bool:
        """Whether the rollout's (old) log-probs can come from the update itself instead of a pass of their own:
        one update of the whole rollout (1 PPO epoch, 1 minibatch), where the ratio is 1 with the gradient of
        the log-probs, and nothing needs them before it (no critic, no KL in the reward, no engine to check)."""
        host = self.host
        hp = host.ppo_config
        return (hp.ppo_epochs == 1 and hp.num_minibatches == 1 and not host.uses_critic and hp.kl_coef == 0
                and not hp.adaptive_kl and samples.engine_logprobs is None)

    def log_prob_stats(self, rollout: Rollout) -> dict[str, Tensor]:
        """The statistics of the rollout's log-probs: the KL to the reference (also in ``rollout.kl``, when the
        update filled in the log-probs), the entropy estimate and the KL part of the reward."""
        host = self.host
        mask = rollout.mask
        if rollout.logprobs_from_update and rollout.ref_logprobs is not None:
            rollout.kl = ppo_math.kl_penalty(rollout.logprobs, rollout.ref_logprobs, host.ppo_config.kl_estimator) * mask
        non_score_reward = (-host.kl_controller.value * rollout.kl).sum(1).mean()
        return {
            "objective/kl": rollout.kl.sum(1).mean(),
            # TRL's definition: the sampled tokens' negative log-probs, summed per response (no vocabulary pass)
            "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": rollout.scores.mean() + non_score_reward,
        }

    def engine_agreement(self, engine_logprobs: Tensor, logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """How far the engine's log-probs of the sampled tokens are from the trainer's, over all ranks: a stale
        or missing weight sync shows here at once."""
        ranks = self.host.ranks
        difference = (engine_logprobs - logprobs).abs() * mask
        total = ranks.sum(torch.stack([difference.sum(), mask.sum()]))
        largest = ranks.max_tensor(difference.max())
        return {"rollout/logprob_diff_mean": total[0] / total[1].clamp(min=1), "rollout/logprob_diff_max": largest}


    def dynamic_sampling(
        self, samples: Samples, scores: Tensor, each: dict[str, Tensor]
    ) -> tuple[Samples, Tensor, dict[str, Tensor], dict[str, float]]:
        """DAPO's dynamic sampling: replace groups whose scores are all equal (zero advantage: no signal)
        with groups of new prompts, up to ``dynamic_sampling_max_retries`` rounds; fill what is still
        missing with dropped groups, so the batch keeps its size."""
        host = self.host
        groups = host.sampling.num_generations
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
            missing = host.ranks.max(wanted - len(kept), host.device)
            if missing <= 0 or retries >= host.ppo_config.dynamic_sampling_max_retries:
                break
            retries += 1
            part = self.sample(self.replacement_prompts(missing, retries))
            part_scores, part_each = self.score(part)
        chosen = (kept + dropped)[:wanted]
        chosen_scores = (kept_scores + dropped_scores)[:wanted]
        merged = Samples.concat(chosen, host.tokenizer.pad_token_id)
        total = torch.cat([s for s, _ in chosen_scores])
        merged_each = {k: torch.cat([e[k] for _, e in chosen_scores]) for k in each}
        stats = {
            "dynamic_sampling/dropped_groups": float(first_dropped),
            "dynamic_sampling/retries": float(retries),
            "dynamic_sampling/filled_with_dropped": float(max(wanted - len(kept), 0)),
        }
        return merged, total, merged_each, stats

    def replacement_prompts(self, count: int, retry: int) -> dict[str, Any]:
        """``count`` prompts for dynamic sampling, drawn from the data by a generator seeded with the
        iteration and the retry (so a resumed run draws the same ones)."""
        host = self.host
        datamodule = getattr(host.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "random_batch"):
            raise ConfigError("ppo.dynamic_sampling needs lit-rlhf's PromptDataModule (data:) to draw new prompts")
        ranks = host.ranks
        seed = (host.iteration * 1_000 + retry) * max(ranks.world_size, 1) + ranks.rank
        batch = datamodule.random_batch(count, seed)
        return {k: v.to(host.device) if isinstance(v, Tensor) else v for k, v in batch.items()}


class SingleTurnProducer(RolloutProducer):
    """One response per prompt and sample: ``num_generations`` of them, scored by the run's rewards."""
