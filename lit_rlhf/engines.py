"""Rollout engines: Hugging Face ``generate`` (``hf``) or an in-process vLLM engine (``vllm``).

The vLLM engine runs in this process (one per rank, tensor parallel 1) on the policy's base checkpoint.
Before every rollout it receives the policy's current weights in memory, with no round trip through disk:
the LoRA deltas are merged into the adapted layers' base weights and reloaded in place (vLLM's
``reload_weights``; the whole model at the first sync, then the blocks that hold adapted layers), so the
engine samples without LoRA kernels. Whether the engine really runs the
trained weights is checked on every rollout: its log-probs of the sampled tokens are compared with the
trainer's (``rollout/logprob_diff_mean``, ``rollout/logprob_diff_max``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lit_rlhf.errors import ConfigError

MISSING_VLLM = (
    "generation.engine=vllm needs vLLM: pip install 'lit-rlhf[vllm]' on a GPU machine, or the CPU build (see the "
    "README's vLLM section); or set generation.engine: hf"
)


def merged_policy_weights(
    model: nn.Module, adapter: str = "default", only_adapted_blocks: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """The weights of the policy's causal LM under the base checkpoint's own names
    (``model.layers.0.self_attn.q_proj.weight``), with ``adapter``'s LoRA delta merged into the adapted layers.

    All of them, or with ``only_adapted_blocks`` the weights of the blocks (decoder layers) that hold an adapted
    layer: the only ones that change in training. Whole blocks, because vLLM fuses projections (q, k and v into
    one kernel) and re-processes a fused layer from all of its parts; the vocabulary-sized embedding and LM
    head, frozen and not adapted, stay as loaded. Yields one tensor at a time, so at most one merged copy
    exists at once.
    """
    from peft.tuners.lora import LoraLayer

    from lit_rlhf.sharding import full_tensor

    base = model.get_base_model()
    adapted = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    blocks = {adapted_block(name) for name in adapted}
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
        if only_adapted_blocks and adapted_block(owner) not in blocks:
            continue
        tensor = full_tensor(param).detach()
        layer = adapted.get(owner)
        if layer is not None and leaf == "weight" and adapter in layer.lora_A:
            delta = full_tensor(layer.get_delta_weight(adapter)).float()
            tensor = (tensor.float() + delta).to(tensor.dtype)
        yield f"{owner}.{leaf}" if owner else leaf, tensor


def adapted_block(module_name: str) -> str:
    """The numbered block a module belongs to (``model.layers.3`` for ``model.layers.3.mlp.up_proj``), or the
    module itself outside numbered blocks (``lm_head``)."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", module_name)
    return match.group(1) if match else module_name


@contextlib.contextmanager
def run_random_state_kept(device: torch.device) -> Iterator[None]:
    """Restore Python's, NumPy's and torch's random state after the block: creating a vLLM engine re-seeds
    them all, which would make every run of a recipe sample alike whatever its ``seed_everything``."""
    import random

    import numpy as np

    state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


class VLLMEngine:
    """A colocated, in-process vLLM engine sampling with the policy's current weights.

    ``sync`` loads the policy's merged weights; ``generate`` samples token ids and returns the engine's own
    log-probs of them (after temperature, as the trainer computes them). On GPU the engine can sleep while
    the PPO passes run (``enable_sleep_mode``), giving its KV cache memory back.
    """

    def __init__(
        self, model_path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float,
        enable_sleep_mode: bool, seed: int, device: torch.device, trust_remote_code: bool = False,
        kv_cache_bytes: Optional[int] = None,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must live in this process
        try:
            from vllm import LLM
        except ImportError as err:
            raise ConfigError(MISSING_VLLM) from err
        self.device = device
        self.sleep_mode = enable_sleep_mode and device.type == "cuda"
        with run_random_state_kept(device):  # vLLM re-seeds Python, NumPy and torch with its own seed
            self.llm = LLM(
                model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode,
                logprobs_mode="processed_logprobs", enforce_eager=device.type != "cuda",
                trust_remote_code=trust_remote_code, enable_prefix_caching=False,
                kv_cache_memory_bytes=kv_cache_bytes,
            )
        self.awake = True
        self.version = 0  # syncs so far

    def sync(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load ``weights`` (the policy's merged weights in checkpoint format, all or whole layers of them) into
        the engine, in memory; layers left out keep what they hold.

        vLLM warns on every sync about each layer given no weights (the LM head tied to the embedding, the layers
        a partial sync leaves out): those warnings are silenced. The log-prob comparison is the check.
        """
        self.wake_up()
        pairs = ((name, tensor.to(self.device)) for name, tensor in weights)
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{part}") for part in ("layerwise", "inplace")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        try:  # vLLM's in-place reload: checkpoint-format weights, re-processed into the engine's kernel layout
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs, "is_checkpoint_format": True})
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
        self.version += 1

    def generate(
        self, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
        stop_token_ids: Sequence[int], seeds: Sequence[int],
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Sampled token ids per prompt and the engine's log-probs of each (``seeds``: one per prompt)."""
        from vllm import SamplingParams

        self.wake_up()
        params = [
            SamplingParams(
                temperature=temperature, top_k=top_k if top_k > 0 else -1, top_p=top_p, max_tokens=max_new_tokens,
                stop_token_ids=list(stop_token_ids), ignore_eos=True, logprobs=0, seed=int(seed),
                skip_special_tokens=False, detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        tokens, logprobs = [], []
        for output in outputs:
            sample = output.outputs[0]
            tokens.append(list(sample.token_ids))
            logprobs.append([entry[token].logprob for token, entry in zip(sample.token_ids, sample.logprobs)])
        return tokens, logprobs

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) during the PPO passes."""
        if self.sleep_mode and self.awake:
            self.llm.sleep(level=1)
            self.awake = False

    def wake_up(self) -> None:
        if self.sleep_mode and not self.awake:
            self.llm.wake_up()
            self.awake = True


def pad_responses(tokens: Sequence[list[int]], logprobs: Sequence[list[float]], pad_token_id: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """``[batch, len]`` responses (``pad_token_id`` after each) and their log-probs (0 after each)."""
    width = max(1, max(len(t) for t in tokens))
    ids = torch.full((len(tokens), width), pad_token_id, dtype=torch.long)
    values = torch.zeros((len(tokens), width), dtype=torch.float32)
    for row, (t, lp) in enumerate(zip(tokens, logprobs)):
        ids[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        values[row, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return ids.to(device), values.to(device)


def left_unpadded(queries: Tensor, query_mask: Tensor) -> list[list[int]]:
    """The prompt token ids of each row of a left-padded batch."""
    return [row[mask.bool()].tolist() for row, mask in zip(queries, query_mask)]


def engine_context_length(config: Any, prompt_length: int, max_new_tokens: int) -> int:
    """The engine's ``max_model_len``: the recipe's prompt + response budget, within the model's context."""
    limit = getattr(config, "max_position_embeddings", None)
    wanted = prompt_length + max_new_tokens
    return min(wanted, limit) if limit else wanted


def kv_cache_bytes(config: Any, rows: int, max_model_len: int, dtype: torch.dtype, block_size: int = 128) -> int:
    """Bytes of KV cache for ``rows`` sequences of up to ``max_model_len`` tokens (each rounded up to whole
    blocks, plus one block per row of headroom), every layer with full attention (an upper bound)."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    blocks_per_row = -(-max_model_len // block_size) + 1
    return rows * blocks_per_row * block_size * per_token


def check_engine_supports(quantization: Optional[str], strategy_name: str) -> None:
    """Refuse what the vLLM engine cannot run, naming the alternative (before any weight loads)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(MISSING_VLLM)
    if quantization is not None:
        raise ConfigError(
            "generation.engine=vllm with policy.quantization: the engine would need the same bitsandbytes base and "
            "the merged LoRA layers cannot be quantized again. Use generation.engine: hf for QLoRA, or an "
            "unquantized policy"
        )
    if strategy_name in ("ModelParallelStrategy", "DeepSpeedStrategy"):
        raise ConfigError(
            f"generation.engine=vllm with {strategy_name}: not supported yet (each rank's engine holds the whole "
            "model). Use DDP, or generation.engine: hf"
        )


def make_engine(policy: Any, model_config: Any, sampling: Any, evaluation_samples: int, longest_response: int,
                data: Any, device: Optional[torch.device], rank: int) -> VLLMEngine:
    """The in-process vLLM engine of a rank, on the policy's base checkpoint (``policy``: its ``PolicyConfig``),
    with a context for the longest prompt (``data.max_prompt_length``) plus ``longest_response`` tokens."""
    from lit_rlhf.tiny import resolve_model_path

    device = device or torch.device("cpu")
    prompt_length = getattr(data, "max_prompt_length", 512)
    context = engine_context_length(model_config, prompt_length, longest_response)
    cache_bytes = int(sampling.kv_cache_gb * 2**30) if sampling.kv_cache_gb is not None else None
    if cache_bytes is None and device.type == "cpu":  # only what the largest batch needs, not a share of RAM
        batch = getattr(data, "batch_size", None) or 64
        rows = max(batch * sampling.num_generations, (getattr(data, "val_batch_size", None) or batch) * evaluation_samples)
        cache_bytes = kv_cache_bytes(model_config, rows, context, getattr(torch, policy.dtype))
    return VLLMEngine(
        resolve_model_path(policy.model_name_or_path), policy.dtype, context, sampling.gpu_memory_utilization,
        sampling.enable_sleep_mode, seed=rank, device=device, trust_remote_code=policy.trust_remote_code,
        kv_cache_bytes=cache_bytes,
    )
