"""Rollout helpers: sampling responses, stop-token masks, padding trims."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import GenerationConfig


@dataclass
class SamplingConfig:
    """How responses are sampled during rollouts."""

    max_new_tokens: int = 32
    """Longest response, in tokens; generation stops earlier once every response hit the stop token."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed from ``logits / temperature`` as well."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 turns this off."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 turns this off."""
    stop_token: Optional[str] = None
    """Token that ends a response; None uses the tokenizer's EOS token."""


def response_mask(responses: Tensor, stop_token_id: int) -> Tensor:
    """1 for tokens up to and including the first stop token, 0 after it (float, ``[batch, len]``).

    Derived from the stop token's position, never from ``ids == pad``: with pad == EOS that would hide
    the EOS itself and shift the reward position.
    """
    is_stop = (responses == stop_token_id).long()
    stops_before = is_stop.cumsum(dim=1) - is_stop
    return (stops_before == 0).float()


@torch.no_grad()
def sample_responses(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, config: SamplingConfig,
    stop_token_id: int, pad_token_id: int, synced_gpus: bool = False,
) -> Tensor:
    """Sample responses to left-padded prompts; returns ``[batch, len]`` padded after the stop token.

    ``synced_gpus`` keeps this rank stepping until every rank has finished (needed when weights are sharded).

    The sampling settings are given in full, so a checkpoint's own ``generation_config`` (repetition
    penalty, default top-k) cannot silently change the distribution the log-probs are computed for.
    """
    generation_config = GenerationConfig(
        do_sample=True, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p, eos_token_id=stop_token_id, pad_token_id=pad_token_id,
    )
    sequences = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
        synced_gpus=synced_gpus,
    )
    responses = sequences[:, input_ids.shape[1] :]
    mask = response_mask(responses, stop_token_id)
    return responses.masked_fill(mask == 0, pad_token_id)


def trim_padding(input_ids: Tensor, attention_mask: Tensor, context_length: int) -> tuple[Tensor, Tensor, int]:
    """Drop columns that are padding in every row: leading prompt pads and trailing response pads."""
    real_columns = attention_mask.bool().any(dim=0)
    first = int(real_columns[:context_length].long().argmax()) if real_columns[:context_length].any() else 0
    last = int(real_columns.nonzero().max()) + 1
    last = max(last, context_length + 1)  # keep at least one response column
    return input_ids[:, first:last], attention_mask[:, first:last], context_length - first
