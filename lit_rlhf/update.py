"""The PPO update over a :class:`~lit_rlhf.experience.Rollout`: ``ppo_epochs`` passes of shuffled minibatches,
micro-batches for gradient accumulation, the clipped losses, and what happens to a non-finite step (skipped,
counted, and after too many in a row a checkpoint and a stop)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import nullcontext
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lit_rlhf import ppo as ppo_math
from lit_rlhf.errors import TrainingError
from lit_rlhf.experience import Rollout
from lit_rlhf.rollout import trim_padding

if TYPE_CHECKING:
    from lit_rlhf.module import PPOModule


class PPOUpdate:
    """Optimizes the policy (and value head) of ``host`` on rollouts; keeps the skipped-step counts."""

    def __init__(self, host: PPOModule) -> None:
        self.host = host
        self.skipped_updates, self.consecutive_skips = 0, 0

    def __call__(self, rollout: Rollout) -> dict[str, Tensor]:
        """``ppo_epochs`` passes of shuffled minibatches over the rollout, one optimizer step each.

        A minibatch's loss is normalized over the whole minibatch on all ranks (its tokens or responses, as
        ``loss_aggregation`` says), so it does not depend on how the minibatch is split into micro-batches
        (``gradient_accumulation_steps``) or ranks.
        """
        host = self.host
        hp = host.ppo_config
        optimizer, scheduler = host.optimizers(), host.lr_schedulers()
        # training mode, where transformers applies gradient checkpointing; dropout is off if disable_dropout
        # (configure_model set its probabilities to 0)
        host.policy.train()
        batch_size = rollout.mask.shape[0]
        minibatch_size, micro_size = host.minibatch_sizes(batch_size // host.sampling.num_generations)
        # strategies average the gradients of the ranks: a rank's part of the global loss is scaled back up
        world_size = host.ranks.world_size
        history: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(hp.ppo_epochs):
            epoch_approx_kl = []
            order = torch.randperm(batch_size, device=rollout.mask.device)
            for minibatch in order.split(minibatch_size):
                losses = []
                micros = minibatch.split(micro_size)
                normalizers = self.loss_normalizers(rollout, minibatch)
                parts: dict[str, list[Tensor]] = defaultdict(list)
                for position, micro in enumerate(micros):
                    loss, stats = self.loss(rollout, micro, normalizers)
                    # under DDP, gradients are averaged across ranks once per minibatch, on its last micro-batch
                    last = position == len(micros) - 1
                    with nullcontext() if last else host.no_gradient_sync():
                        host.manual_backward(loss * world_size)
                    losses.append(loss.detach())
                    for name, value in stats.items():
                        parts[name].append(value)
                for name, values in parts.items():
                    # a loss is the sum of its micro-batch parts (x ranks: the logged mean over ranks is the
                    # minibatch's loss); other statistics are means over the micro-batches
                    stacked = torch.stack(values)
                    history[name].append(stacked.sum() * world_size if name.startswith("loss/") else stacked.mean())
                epoch_approx_kl.append(history["policy/approxkl_avg"][-1])
                if not self.is_finite(torch.stack(losses)):
                    optimizer.zero_grad(set_to_none=True)
                    self.skip()
                    continue
                self.consecutive_skips = 0
                optimizer.step()  # gradients are clipped in on_before_optimizer_step, after fp16 unscaling
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            if hp.target_kl is not None:  # decided on the mean over ranks, so all ranks stop together
                if host.ranks.mean(torch.stack(epoch_approx_kl).mean()) > hp.target_kl:
                    break
        host.policy.eval()
        return {name: torch.stack(values).mean() for name, values in history.items()}

    def loss_normalizers(self, rollout: Rollout, rows: Tensor) -> dict[str, Tensor]:
        """What the losses of the minibatch ``rows`` divide by, summed over all ranks: ``policy`` for the policy,
        entropy and KL terms (as ``loss_aggregation`` says), ``tokens`` (its loss tokens) for the value loss."""
        host = self.host
        loss_mask = (rollout.loss_mask if rollout.loss_mask is not None else rollout.mask)[rows]
        counts = host.ranks.sum(torch.stack([
            ppo_math.aggregation_count(loss_mask, self.loss_aggregation(), host.sampling.max_new_tokens).float(),
            loss_mask.sum().float(),
        ]))
        return {"policy": counts[0], "tokens": counts[1]}

    def loss_aggregation(self) -> ppo_math.LossAggregation:
        """``ppo.loss_aggregation``, or the per-response mean it stands for under GSPO."""
        hp = self.host.ppo_config
        if hp.importance_sampling_level == "sequence":
            return ppo_math.sequence_level_aggregation(hp.loss_aggregation)
        return hp.loss_aggregation

    def loss(
        self, rollout: Rollout, index: Tensor, normalizers: Optional[dict[str, Tensor]] = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss (+ ``vf_coef`` x clipped value loss with a critic, + ``kl_loss_coef`` x k3 KL
        with ``kl_in_loss``, - entropy bonus) on rows ``index``. With ``normalizers`` (``loss_normalizers``
        of a minibatch) it is these rows' part of the minibatch's loss; without, the rows are the minibatch."""
        host = self.host
        hp = host.ppo_config
        input_ids, attention_mask, context_length = trim_padding(
            rollout.query_responses[index], rollout.attention_mask[index], rollout.context_length
        )
        response_len = input_ids.shape[1] - context_length
        mask = rollout.mask[index, :response_len]
        loss_mask = rollout.loss_mask[index, :response_len] if rollout.loss_mask is not None else mask
        normalizers = normalizers or {}
        out = host.policy(
            input_ids, attention_mask, context_length, host.sampling.temperature, with_entropy=True,
            entropy_grad=hp.ent_coef != 0,  # otherwise only a statistic: no graph, no backward through it
        )
        mode, max_new_tokens = self.loss_aggregation(), host.sampling.max_new_tokens
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

    def is_finite(self, losses: Tensor) -> bool:
        """Whether the minibatch's losses and gradients are finite, on every rank.

        Under fp16 the gradient scaler handles inf gradients itself (skipping the step and lowering the
        scale), so only the losses are checked there.
        """
        host = self.host
        finite = bool(torch.isfinite(losses).all())
        if finite and getattr(host.trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in host.policy.parameters() if p.grad is not None]
            finite = bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all()) if grads else True
        return host.trainer.strategy.reduce_boolean_decision(finite, all=True)

    def skip(self) -> None:
        """Count a skipped optimizer step; stop with a checkpoint after too many in a row."""
        from lit_rlhf.callbacks import save_last_checkpoint

        host = self.host
        self.skipped_updates += 1
        self.consecutive_skips += 1
        limit = host.ppo_config.max_consecutive_skips
        warnings.warn(
            f"Skipped an optimizer step: non-finite loss or gradient (iteration {host.iteration}, "
            f"{self.consecutive_skips} in a row, {self.skipped_updates} in all)", RuntimeWarning, stacklevel=2,
        )
        if self.consecutive_skips >= limit:
            path = save_last_checkpoint(host.trainer)  # weights and optimizer hold no update from the bad steps
            raise TrainingError(
                f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                f"(ppo.max_consecutive_skips={limit}). The last good state is saved in {path}. Lower "
                "model.optimizer.lr, keep ppo.max_grad_norm set, and check the scale of the reward "
                "(model.reward.normalize / clip) before resuming with --ckpt_path."
            )
