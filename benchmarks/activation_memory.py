"""Activation memory of one PPO forward, with and without ``model.policy.gradient_checkpointing``.

    python benchmarks/activation_memory.py                 # the benchmark workload and one Llama-3.1-8B layer

Counts the bytes autograd keeps for the backward pass of a policy forward (log-probs and values of the
response tokens, as in a PPO minibatch): every tensor saved for backward, each storage once, weights
excluded. That is the memory gradient checkpointing trades for recomputation, independent of the allocator
and of the device, so it is measured here exactly on a CPU. Two shapes:

- the benchmark workload of ``ppo_benchmark.py`` (hidden 256, 4 layers, 32k vocabulary, 16 x (16 + 32) tokens);
- one decoder layer of Llama-3.1-8B (hidden 4096, MLP 14336, 32 heads, 8 KV heads, bf16 weights, LoRA r=16),
  per token, from which the activation memory of the 8B recipes follows (32 layers, tokens per minibatch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import contextmanager

import torch


@contextmanager
def count_saved_bytes(module: torch.nn.Module):
    """Yields a dict whose ``bytes`` is the size of the distinct non-weight storages saved for backward."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()
    counter = {"bytes": 0}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counter["bytes"] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter


def policy_activation_bytes(config, batch: int, prompt: int, response: int, checkpointing: bool, dtype: str) -> int:
    """Saved-for-backward bytes of one PPO forward of a LoRA policy built from ``config`` (random weights)."""
    from transformers import AutoModelForCausalLM

    from lit_rlhf.models import PolicyConfig, load_policy

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).save_pretrained(directory)
        policy = load_policy(PolicyConfig(directory, dtype=dtype, gradient_checkpointing=checkpointing))
    policy.train()
    ids = torch.randint(4, config.vocab_size, (batch, prompt + response))
    mask = torch.ones_like(ids)
    with count_saved_bytes(policy) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = policy(ids, mask, prompt, temperature=1.0)
    (out.logprobs.sum() + out.values.sum()).backward()  # the graph really trains
    return counter["bytes"]


def main(argv=None) -> None:
    from transformers import LlamaConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    workload = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    results = {}
    for checkpointing in (False, True):
        key = "with" if checkpointing else "without"
        results[f"workload_{key}_mb"] = policy_activation_bytes(workload, 16, 16, 32, checkpointing, "float32") / 2**20
        # Llama-3.1-8B decoder layers: the difference between 2 layers and 1 is one layer's share (a small
        # vocabulary keeps the rest cheap; the LM head's own share is the hidden states it keeps, see README)
        layers = []
        for num_layers in (1, 2):
            config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers,
                                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
            layers.append(policy_activation_bytes(config, 1, 128, 128, checkpointing, "bfloat16"))
        results[f"llama8b_layer_{key}_kib_per_token"] = (layers[1] - layers[0]) / 256 / 2**10
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
