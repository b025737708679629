"""Evaluation on held-out prompts (``data.val_path``): completions as ``model.evaluation`` says, scored by the
run's rewards, as ``eval/`` metrics (TRL's ``val/`` names mean training statistics) and ``eval_samples.jsonl``."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lit_rlhf.rollout import Samples

if TYPE_CHECKING:
    from lit_rlhf.module import PPOModule


@torch.no_grad()
def evaluate(host: PPOModule, batch: dict[str, Any]) -> tuple[dict[str, Tensor], int]:
    """The ``eval/`` metrics of one batch of held-out prompts, and how many prompts it held; the completions
    go to ``eval_samples.jsonl`` in the run's folder."""
    cfg = host.evaluation
    k = cfg.num_samples
    sampling = replace(host.sampling, temperature=cfg.temperature, num_generations=k,
                       max_new_tokens=cfg.max_new_tokens or host.sampling.max_new_tokens)
    samples = host.producer.sample(batch, sampling)
    scores, each = host.producer.score(samples)
    passed = (scores >= cfg.pass_threshold).float().view(-1, k)
    write_eval_samples(host, samples, scores)
    metrics = {
        "eval/score": scores.mean(),
        "eval/response_length": samples.mask.sum(1).float().mean(),
        "eval/pass@1": passed.mean(),
        **({f"eval/pass@{k}": passed.max(1).values.mean()} if k > 1 else {}),
        **{f"eval/reward/{name}": value.mean() for name, value in each.items() if len(each) > 1},
        # multi-turn: the environment's statistics of the held-out conversations (eval/env/turns, tool_calls...)
        **{f"eval/{name}": torch.tensor(float(value), device=host.device)
           for name, value in host.producer.sample_stats().items()},
    }
    return metrics, passed.shape[0]


def write_eval_samples(host: PPOModule, samples: Samples, scores: Tensor) -> None:
    """Append the held-out completions, with the iteration they were evaluated at (0: before training)."""
    if host._trainer is None or host.trainer.sanity_checking:
        return
    from lit_rlhf.runs import run_directory

    directory = run_directory(host.trainer)  # a collective under DDP: every rank asks
    if host.trainer.is_global_zero:
        directory.mkdir(parents=True, exist_ok=True)
        conversations = samples.conversations or [None] * len(samples)
        with open(directory / "eval_samples.jsonl", "a") as file:
            for prompt, completion, score, conversation in zip(samples.prompts, samples.completions, scores.tolist(),
                                                               conversations):
                row = {"iteration": host.iteration, "prompt": prompt, "completion": completion, "score": score}
                if conversation is not None:
                    row["conversation"] = conversation
                file.write(json.dumps(row) + "\n")


@torch.no_grad()
def evaluate_before_training(host: PPOModule) -> dict[str, float]:
    """``evaluation.before_training``: the held-out metrics of the policy as it starts, logged at step 0
    (Lightning's validation runs only after training steps), averaged over prompts and ranks."""
    datamodule = getattr(host.trainer, "datamodule", None)
    loaders = datamodule.val_dataloader() if datamodule is not None else []
    totals: dict[str, Tensor] = {}
    prompts = torch.zeros((), device=host.device)
    for loader in loaders if isinstance(loaders, list) else [loaders]:
        for batch in loader:
            metrics, count = evaluate(host, host.transfer_batch_to_device(batch, host.device, 0))
            for name, value in metrics.items():
                totals[name] = totals.get(name, torch.zeros((), device=host.device)) + value.float() * count
            prompts += count
    if not totals:
        return {}
    names = sorted(totals)
    summed = host.ranks.sum(torch.stack([totals[name] for name in names] + [prompts]))
    metrics = {name: float(value / summed[-1]) for name, value in zip(names, summed[:-1])}
    for logger in host.trainer.loggers:
        logger.log_metrics(metrics, step=0)
    return metrics
