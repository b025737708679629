"""Rollout helpers: sampling responses, stop-token masks, padding trims."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lit_rlhf.errors import ConfigError


@dataclass
class SamplingConfig:
    """How responses are sampled during rollouts."""

    max_new_tokens: int = 32
    """Longest response, in tokens; generation stops earlier once every response hit the stop token."""
    num_generations: int = 1
    """Responses sampled per prompt (a group): the rollout holds ``data.batch_size x num_generations``."""
    engine: Literal["hf", "vllm"] = "hf"
    """Who samples the rollouts: Hugging Face ``generate`` (``hf``), or an in-process vLLM engine fed the
    policy's current weights before each rollout (``vllm``; its sync is checked by ``rollout/logprob_diff_*``)."""
    gpu_memory_utilization: float = 0.3
    """vLLM: share of the GPU's memory (on a CPU: of the host's) the engine may take for weights and KV cache."""
    kv_cache_gb: Optional[float] = None
    """vLLM: the engine's KV cache in GiB. None: on a GPU what ``gpu_memory_utilization`` leaves after the
    weights; on a CPU what the largest rollout or evaluation batch needs (sized from the model's config)."""
    enable_sleep_mode: bool = True
    """vLLM on GPU: free the engine's memory during the PPO passes, reload it for the next rollout."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed from ``logits / temperature`` as well (0: greedy, for
    evaluation only)."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 turns this off."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 turns this off."""
    stop_tokens: Optional[list[str]] = None
    """Tokens that end a response (any of them); None uses the tokenizer's EOS token plus the end-of-turn
    tokens of the checkpoint's ``generation_config`` (e.g. Llama 3's ``<|eot_id|>`` and ``<|eom_id|>``);
    ``[]``: no stop token, every response is ``max_new_tokens`` long."""


def stop_token_ids(tokenizer, stop_tokens: Optional[Sequence[str]], checkpoint_eos: object = None) -> list[int]:
    """The ids of ``stop_tokens``, or by default (None) the tokenizer's EOS plus the checkpoint's own EOS list.

    ``checkpoint_eos`` is a ``generation_config.eos_token_id`` (an id, a list of ids or None). An empty list
    means no stop token: every response is ``max_new_tokens`` long (TRL's PPO default).
    """
    if stop_tokens is not None and len(stop_tokens) == 0:
        return []
    if stop_tokens:
        ids = []
        for token in stop_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
                raise ConfigError(f"generation.stop_tokens: {token!r} is not a token of the policy's tokenizer")
            ids.append(token_id)
    else:
        extra = checkpoint_eos if isinstance(checkpoint_eos, (list, tuple)) else [checkpoint_eos]
        ids = [tokenizer.eos_token_id, *extra]
    ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
    if not ids:
        raise ConfigError("The policy's tokenizer has no EOS token: set generation.stop_tokens")
    return ids


def response_mask(responses: Tensor, stop_token_ids: int | Sequence[int]) -> Tensor:
    """1 for tokens up to and including the first stop token, 0 after it (float, ``[batch, len]``).

    Derived from the stop token's position, never from ``ids == pad``: with pad == EOS that would hide
    the EOS itself and shift the reward position. Any of ``stop_token_ids`` ends a response.
    """
    is_stop = torch.isin(responses, torch.as_tensor(stop_token_ids, dtype=responses.dtype, device=responses.device)).long()
    stops_before = is_stop.cumsum(dim=1) - is_stop
    return (stops_before == 0).float()


@torch.no_grad()
def filtered_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits / temperature`` in float32 with every token outside the top-k and the top-p nucleus at -inf.

    Top-p keeps the most likely tokens whose cumulative probability reaches ``top_p`` (at least one), as
    Hugging Face's ``TopPLogitsWarper`` and vLLM's sampler do. Works on any leading shape.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


@torch.no_grad()
def sampling_distribution(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Next-token probabilities ``[batch, vocab]`` after temperature, top-k and top-p (nucleus) filtering."""
    return filtered_logits(logits, temperature, top_k, top_p).softmax(-1)


def sample_categorical(probs: Tensor) -> Tensor:
    """One draw per row of ``probs`` ``[batch, vocab]`` by inverse CDF: one uniform number per row.

    The same distribution as ``torch.multinomial(probs, 1)``, which on CPU draws an exponential variate for
    every vocabulary entry and dominates the time of a decoding step for small models.
    """
    cdf = probs.cumsum(-1)
    uniform = 1.0 - torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype)  # in (0, 1]
    return torch.searchsorted(cdf, uniform * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)


class _SampleNextToken(LogitsProcessor):
    """Draws the next token itself and returns scores whose argmax is that token.

    Run inside a greedy ``generate`` this samples from :func:`sampling_distribution` while Hugging Face
    keeps doing everything else (KV cache, stop tokens, padding of finished rows, synced ranks).
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.config.temperature == 0:  # greedy (evaluation only): generate takes the argmax
            return scores
        probs = sampling_distribution(scores, self.config.temperature, self.config.top_k, self.config.top_p)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, sample_categorical(probs), 0.0)


@contextlib.contextmanager
def neutral_generation_defaults(model: nn.Module) -> Iterator[None]:
    """Hide the checkpoint's own ``generation_config`` from ``generate`` inside this block.

    ``generate`` fills every field left unset with the checkpoint's value: a ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``min_new_tokens``, ``bad_words_ids``, ``suppress_tokens``, ``stop_strings``
    or prompt-lookup setting there would silently change what is sampled away from the distribution
    the log-probs are computed for. With the library defaults in its place only our settings count.
    """
    saved = [(m, m.generation_config) for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    for module, _ in saved:
        module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for module, config in saved:
            module.generation_config = config


def sample_responses(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, config: SamplingConfig,
    stop_token_ids: Sequence[int], pad_token_id: int, synced_gpus: bool = False,
) -> Tensor:
    """Sample responses to left-padded prompts; returns ``[batch, len]`` padded after the first stop token.

    ``synced_gpus`` keeps this rank stepping until every rank has finished (needed when weights are sharded).
    Nothing of the checkpoint's own ``generation_config`` applies (see :func:`neutral_generation_defaults`).
    """
    generation_config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=config.max_new_tokens, eos_token_id=list(stop_token_ids) or None,
        pad_token_id=pad_token_id, repetition_penalty=1.0, num_return_sequences=1, use_cache=True,
    )
    with neutral_generation_defaults(model):
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
            logits_processor=LogitsProcessorList([_SampleNextToken(config)]), synced_gpus=synced_gpus,
        )
    responses = sequences[:, input_ids.shape[1] :]
    mask = response_mask(responses, stop_token_ids)
    return responses.masked_fill(mask == 0, pad_token_id)


def trim_padding(input_ids: Tensor, attention_mask: Tensor, context_length: int) -> tuple[Tensor, Tensor, int]:
    """Drop columns that are padding in every row: leading prompt pads and trailing response pads."""
    real_columns = attention_mask.bool().any(dim=0)
    first = int(real_columns[:context_length].long().argmax()) if real_columns[:context_length].any() else 0
    last = int(real_columns.nonzero().max()) + 1
    last = max(last, context_length + 1)  # keep at least one response column
    return input_ids[:, first:last], attention_mask[:, first:last], context_length - first


@dataclass
class Samples:
    """Responses sampled for a batch of prompts, before any forward pass (rows: one response each).

    ``queries`` are left-padded, ``responses`` padded after their first stop token; ``columns`` holds the
    data set's other columns, one value per row, for the reward functions.
    """

    queries: Tensor
    query_mask: Tensor
    responses: Tensor
    mask: Tensor
    prompts: list[str]
    completions: list[str]
    columns: dict[str, list]
    engine_logprobs: Optional[Tensor] = None  # the sampling engine's log-probs of the sampled tokens (vLLM)
    # multi-turn trajectories: ``responses`` also hold the environment's tokens, which ``mask`` leaves out
    response_attention: Optional[Tensor] = None  # 1 on every real token of ``responses`` (None: ``mask``)
    ended: Optional[Tensor] = None  # whether each trajectory ended by itself, not cut by a budget (None: stop token)
    conversations: Optional[list[list[dict[str, str]]]] = None  # each trajectory's messages
    step_rewards: Optional[Tensor] = None  # each environment step's reward, on the last token of its turn

    def __len__(self) -> int:
        return self.responses.shape[0]

    @property
    def attention(self) -> Tensor:
        """The attention mask of ``responses``: their real tokens, the model's and the environment's."""
        return self.mask if self.response_attention is None else self.response_attention

    def select(self, rows: Sequence[int]) -> "Samples":
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.responses.device)
        return Samples(
            self.queries[index], self.query_mask[index], self.responses[index], self.mask[index],
            [self.prompts[i] for i in rows], [self.completions[i] for i in rows],
            {k: [v[i] for i in rows] for k, v in self.columns.items()},
            self.engine_logprobs[index] if self.engine_logprobs is not None else None,
            self.response_attention[index] if self.response_attention is not None else None,
            self.ended[index] if self.ended is not None else None,
            [self.conversations[i] for i in rows] if self.conversations is not None else None,
            self.step_rewards[index] if self.step_rewards is not None else None,
        )

    @staticmethod
    def concat(parts: Sequence["Samples"], pad_token_id: int) -> "Samples":
        """One batch of several, queries re-padded on the left and responses on the right to common widths."""
        if len(parts) == 1:
            return parts[0]
        context = max(p.queries.shape[1] for p in parts)
        length = max(p.responses.shape[1] for p in parts)

        def pad(t: Tensor, width: int, value: float, left: bool) -> Tensor:
            extra = width - t.shape[1]
            return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

        return Samples(
            torch.cat([pad(p.queries, context, pad_token_id, True) for p in parts]),
            torch.cat([pad(p.query_mask, context, 0, True) for p in parts]),
            torch.cat([pad(p.responses, length, pad_token_id, False) for p in parts]),
            torch.cat([pad(p.mask, length, 0.0, False) for p in parts]),
            [x for p in parts for x in p.prompts], [x for p in parts for x in p.completions],
            {k: [x for p in parts for x in p.columns[k]] for k in parts[0].columns},
            torch.cat([pad(p.engine_logprobs, length, 0.0, False) for p in parts])
            if parts[0].engine_logprobs is not None else None,
            torch.cat([pad(p.response_attention, length, 0.0, False) for p in parts])
            if parts[0].response_attention is not None else None,
            torch.cat([p.ended for p in parts]) if parts[0].ended is not None else None,
            [c for p in parts for c in p.conversations] if parts[0].conversations is not None else None,
            torch.cat([pad(p.step_rewards, length, 0.0, False) for p in parts]) if parts[0].step_rewards is not None
            else None,
        )
