"""FSDP2 for the policy: ``fully_shard`` per decoder layer, then the policy as the root unit.

Lightning's ``ModelParallelStrategy`` calls ``PPOModule.configure_model``, which shards the policy here.
Unlike FSDP1 (Lightning's ``FSDPStrategy``), nothing wraps ``training_step``: PPO's manual backward
passes run outside any wrapped forward. LoRA and base weights of a layer share one unit (FSDP2 keeps
frozen and trained parameters apart by ``requires_grad``); only the LoRA and value-head weights get
gradients, which are reduce-scattered per unit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from lit_rlhf.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from lit_rlhf.models import PolicyWithValueHead

# Entry points of the policy other than ``forward``: FSDP2 gathers the root's weights around them too.
FORWARD_METHODS = ("reference_logprobs", "generate")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a ``transformers`` model: the classes it names in ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ConfigError(
            f"Cannot shard {type(model).__name__}: its transformers class names no decoder-layer class "
            "(_no_split_modules). Use the DDP strategy for this model"
        )
    return layers


def shard_policy(policy: PolicyWithValueHead, mesh: DeviceMesh) -> None:
    """Shard every decoder layer and then the rest of the policy (embeddings, LM head, value head).

    ``mesh`` is Lightning's 2-D device mesh: weights are sharded over its second dimension and
    replicated over its first (HSDP). With ``ModelParallelStrategy``'s defaults that is: shard within
    a node, replicate across nodes.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in decoder_layers(policy.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    for method in FORWARD_METHODS:
        register_fsdp_forward_method(policy, method)


def full_tensor(value: Tensor) -> Tensor:
    """The whole tensor of a sharded ``DTensor`` (a collective: every rank must call it), else ``value``."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
