"""The models of a PPO run: LoRA policy with a value head, the reference, and the reward.

The policy's value head sits on the same backbone as its LM head, so one forward pass yields both the
response log-probs and the values. The reference is, by default, the same backbone with its LoRA
adapter disabled, so no second copy of the weights is held in memory.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
import transformers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast

from lit_rlhf.errors import ConfigError
from lit_rlhf.tiny import BUILTIN_PREFIX, resolve_model_path

# peft (with bitsandbytes) loads in ~1.5 s: it is imported where it is used, not for `lit-rlhf fit --help`.
# (No TYPE_CHECKING import either: jsonargparse executes those blocks when it reads the configs' types.)

DType = Literal["float32", "bfloat16", "float16"]
Quantization = Optional[Literal["4bit", "8bit"]]

# Default LoRA targets per ``config.model_type``: attention and MLP projections.
_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    **{arch: _LLAMA_STYLE for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "granite")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


@dataclass
class ModelConfig:
    """A model that trains: a checkpoint whose LoRA adapter (or, where a stage allows it, every weight)
    learns, optionally quantized."""

    model_name_or_path: str = "builtin:tiny-llama"
    """Hugging Face hub id, local checkpoint folder, or ``builtin:tiny-<arch>`` (built offline)."""
    dtype: DType = "float32"
    """Dtype of the frozen base weights; LoRA (and value-head) weights stay float32."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own modelling code to run (only for checkpoints you trust)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (PPO: only active when ``ppo.disable_dropout`` is false)."""
    lora_target_modules: Optional[list[str]] = None
    """Module names to adapt; None picks the attention and MLP projections of known architectures;
    ``[all-linear]`` adapts every linear layer except the LM head."""
    quantization: Quantization = None
    """Load the frozen base weights in ``4bit`` (nf4, double quantization; QLoRA) or ``8bit`` (bitsandbytes)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: less memory
    for about one more forward."""


@dataclass
class PolicyConfig(ModelConfig):
    """The trained policy: a causal LM with a LoRA adapter and (for PPO) a value head."""

    value_head_init_std: float = 0.0
    """Std of the value head's normal init; 0 starts it at zero (values 0 before any update)."""
    value_head_from_reward: bool = False
    """Initialize the value head from the reward model's score head (hidden sizes must match)."""
    critic: Literal["shared_head", "adapter"] = "shared_head"
    """Where PPO's value function lives (``gae`` only): a head on the policy's own last hidden state
    (``shared_head``), or a second LoRA adapter plus head on the same frozen base (``adapter``): a separate
    critic without a second copy of the base weights."""


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, field: str = "model_name_or_path"
) -> "transformers.PreTrainedTokenizerBase":
    """Load a tokenizer for left-padded generation, falling back to EOS as pad token (with a warning)."""
    path = resolve_model_path(name_or_path, field)
    # Built-in checkpoints carry a word-level tokenizer; AutoTokenizer would swap in the architecture's own
    # class for some model types (qwen2), so load it with the class it was saved with.
    from transformers import AutoTokenizer

    loader = PreTrainedTokenizerFast if name_or_path.startswith(f"{BUILTIN_PREFIX}tiny-") else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Could not load a tokenizer from {name_or_path!r} (model_name_or_path): give an existing local "
            f"folder with tokenizer files, a hub id reachable from this machine, or 'builtin:tiny-llama'. "
            f"Cause: {err}"
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"The tokenizer of {name_or_path!r} has neither a pad nor an EOS token: add a pad token to "
                "the tokenizer (tokenizer.add_special_tokens) and save it next to the model."
            )
        warnings.warn(
            f"The tokenizer of {name_or_path!r} has no pad token; using its EOS token {tokenizer.eos_token!r} "
            "as pad. Masks come from the first stop token, so this is safe.",
            stacklevel=2,
        )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_generation_config(name_or_path: str, trust_remote_code: bool = False):
    """The checkpoint's ``generation_config.json`` (its EOS list), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    except OSError:
        return None


def model_context_length(name_or_path: str, trust_remote_code: bool = False) -> Optional[int]:
    """The longest sequence the model's config allows (``max_position_embeddings``), read without the weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Could not load policy.model_name_or_path={name_or_path!r}: give a local checkpoint folder, a hub id "
            f"reachable from this machine, or a built-in name such as 'builtin:tiny-llama'. Cause: {err}"
        ) from err
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def keep_4bit_layers_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers changed.

    On a CPU with AVX512-BF16, the first forward of a 4-bit layer in eval mode without gradients repacks its
    weights, and from then on every forward, in training too, runs ``gemv_4bit``, which has no backward: the
    gradients through the frozen base (to every LoRA weight below it) come out silently wrong. Without the
    repacking the layer dequantizes and multiplies, differentiably, in every mode.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def _load_pretrained(auto_cls, name_or_path: str, field_name: str, **kwargs) -> "transformers.PreTrainedModel":
    path = resolve_model_path(name_or_path, field_name)
    try:
        model = auto_cls.from_pretrained(path, **kwargs)
        keep_4bit_layers_differentiable(model)
        return model
    except OSError as err:
        hint = "" if os.path.isdir(path) else " (no such local folder)"
        raise ConfigError(
            f"Could not load {field_name}={name_or_path!r}{hint}: give a local checkpoint folder, a hub id "
            f"reachable from this machine, or a built-in name such as 'builtin:tiny-llama'. Cause: {err}"
        ) from err


def quantization_kwargs(
    quantization: Quantization, dtype: DType, field_name: str, device: Optional[torch.device] = None
) -> dict:
    """``from_pretrained`` arguments for bitsandbytes 4-bit (nf4, double quantization) or 8-bit weights."""
    if quantization is None:
        return {}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ConfigError(
            f"{field_name}={quantization!r} needs bitsandbytes: pip install 'bitsandbytes>=0.45', or set it to null"
        ) from err
    if device is not None and device.type not in ("cpu", "cuda", "xpu"):
        raise ConfigError(f"{field_name}={quantization!r} is not supported on {device.type}: set it to null")
    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
    elif quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ConfigError(f"{field_name}={quantization!r}: use '4bit', '8bit' or null")
    kwargs = {"quantization_config": config}
    if device is not None and device.type != "cpu":  # quantize straight onto the training device
        kwargs["device_map"] = {"": str(device)}
    return kwargs


def load_causal_lm(
    name_or_path: str, dtype: DType = "float32", trust_remote_code: bool = False, field_name: str = "model",
    quantization: Quantization = None, device: Optional[torch.device] = None,
) -> "transformers.PreTrainedModel":
    """``AutoModelForCausalLM.from_pretrained`` with a clear error for paths that do not load."""
    from transformers import AutoModelForCausalLM

    return _load_pretrained(
        AutoModelForCausalLM, name_or_path, field_name, dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        **quantization_kwargs(quantization, dtype, field_name.rsplit(".", 1)[0] + ".quantization", device),
    )


def load_frozen_reference(
    name_or_path: str, dtype: DType, trust_remote_code: bool, quantization: Quantization, device: Optional[torch.device],
) -> "transformers.PreTrainedModel":
    """A separate frozen reference model (``reference.model_name_or_path``) on ``device``: it lives outside the
    module tree, so no strategy moves it (a quantized one is loaded onto the device)."""
    reference = freeze(load_causal_lm(name_or_path, dtype, trust_remote_code, "reference.model_name_or_path",
                                      quantization, device))
    return reference.to(device) if device is not None and not quantization else reference


def default_lora_targets(model: "transformers.PreTrainedModel") -> list[str]:
    """The LoRA targets for ``model``'s architecture, or an error listing the module names it has."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in DEFAULT_LORA_TARGETS:
        return DEFAULT_LORA_TARGETS[model_type]
    output = model.get_output_embeddings()
    names = sorted({
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if module is not output and type(module).__name__ in ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")
    })
    raise ConfigError(
        f"No default LoRA targets for architecture {model_type!r}: set policy.lora_target_modules to some of its "
        f"linear modules {names}, or to [all-linear]"
    )


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients and dropout for a model that is never trained."""
    model.requires_grad_(False)
    return model.eval()


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a (possibly peft-wrapped) causal LM into its transformer backbone and LM head."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.base_model, model.get_output_embeddings()


def position_ids_from(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


_CHUNK_ELEMENTS = 2**22  # logits elements per chunk of the vocabulary-wide statistics (16 MiB in float32)


def _rows_per_chunk(elements_per_row: int) -> int:
    """Rows of a ``[rows, len, vocab]`` tensor per chunk of at most ``_CHUNK_ELEMENTS`` elements."""
    return max(1, _CHUNK_ELEMENTS // max(elements_per_row, 1))


def _logprob_grad(logits: Tensor, log_normalizer: Tensor, tokens: Tensor, grad: Tensor) -> Tensor:
    """``grad * d logp[tokens] / d logits`` in float32: ``grad * (onehot(tokens) - softmax(logits))``."""
    grad_logits = (logits.to(log_normalizer.dtype) - log_normalizer.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
    return grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))


class _TokenLogprobs(torch.autograd.Function):
    """``log softmax(logits)[tokens]``, computed in float32 in row chunks with a lean backward.

    Neither direction materializes a full-size log-softmax or float32 copy of the logits: the only
    ``[.., vocab]`` buffer besides the logits themselves is their gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        chunks = logits.split(_rows_per_chunk(logits[0].numel()))
        log_normalizer = torch.cat([chunk.to(dtype).logsumexp(-1) for chunk in chunks])
        ctx.save_for_backward(logits, tokens, log_normalizer)
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).to(dtype) - log_normalizer

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, tokens, log_normalizer = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        rows = _rows_per_chunk(logits[0].numel())
        for out, chunk, token, lse, g in zip(grad_logits.split(rows), logits.split(rows), tokens.split(rows),
                                             log_normalizer.split(rows), grad.split(rows)):
            out.copy_(_logprob_grad(chunk, lse, token, g))
        return grad_logits, None


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[tokens]`` in float32, without materializing the full log-softmax."""
    return _TokenLogprobs.apply(logits, tokens)


class LogitTransform(NamedTuple):
    """What a model does to its LM head's output before the softmax: ``softcap * tanh(scale * z / softcap)``.

    Gemma 2/3 soft-cap their logits (``final_logit_softcapping``), Granite divides them (``logits_scaling``),
    Cohere multiplies them (``logit_scale``). Log-probs must use the same logits that ``generate`` samples from.
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def of(cls, config) -> "LogitTransform":
        """The transform a ``transformers`` config asks for (the identity for most architectures)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = 1.0
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        if getattr(config, "logit_scale", None):
            scale *= float(config.logit_scale)
        softcap = getattr(config, "final_logit_softcapping", None)
        return cls(scale, float(softcap) if softcap else None)

    def apply(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def backward(self, grad: Tensor, transformed: Tensor) -> Tensor:
        """The gradient with respect to the raw head output, given the one with respect to ``apply``'s result."""
        if self.softcap is not None:
            grad = grad * (1 - (transformed / self.softcap) ** 2)
        return grad * self.scale if self.scale != 1.0 else grad


IDENTITY = LogitTransform()


def _head_logits(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], transform: LogitTransform = IDENTITY
) -> Tensor:
    """The model's logits (before temperature) in at least float32."""
    # a 2-D matmul: on a strided 3-D slice, linear would fall back to a batched matmul with copies of the weight
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    logits = logits.view(*hidden.shape[:-1], -1).to(torch.promote_types(logits.dtype, torch.float32))
    return transform.apply(logits)


def _with_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits / temperature if temperature != 1.0 else logits


class _HeadTokenLogprobs(torch.autograd.Function):
    """LM head + ``log softmax(logits / temperature)[tokens]`` (and optionally the entropy) in row chunks.

    The ``[batch, len, vocab]`` logits are never held at once: each chunk's logits are computed, reduced
    and freed, and recomputed in the backward pass (one extra matmul) instead of being saved.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, with_entropy, transform):
        from lit_rlhf.ppo import entropy_from_logits

        rows = _rows_per_chunk(hidden.shape[1] * weight.shape[0])
        logprobs, normalizers, entropies = [], [], []
        for h, t in zip(hidden.split(rows), tokens.split(rows)):
            logits = _with_temperature(_head_logits(h, weight, bias, transform), temperature)
            lse = logits.logsumexp(-1)
            logprobs.append(logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse)
            normalizers.append(lse)
            if with_entropy:
                entropies.append(entropy_from_logits(logits))
        device = hidden.device.type
        ctx.rows, ctx.temperature, ctx.transform = rows, temperature, transform
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(hidden, weight, bias, tokens, torch.cat(normalizers))
        entropy = torch.cat(entropies) if with_entropy else hidden.new_zeros(0)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logprobs), entropy

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        hidden, weight, bias, tokens, normalizers = ctx.saved_tensors
        device, autocast_enabled, autocast_dtype = ctx.autocast
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_bias else None
        rows = ctx.rows
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_enabled):
            for index, (h, t, lse, g) in enumerate(zip(hidden.split(rows), tokens.split(rows),
                                                       normalizers.split(rows), grad.split(rows))):
                transformed = _head_logits(h, weight, bias, ctx.transform)
                grad_logits = _logprob_grad(_with_temperature(transformed, ctx.temperature), lse, t, g)
                if ctx.temperature != 1.0:  # through "/ temperature"
                    grad_logits /= ctx.temperature
                grad_logits = ctx.transform.backward(grad_logits, transformed)  # through the model's own transform
                if need_hidden:
                    part = torch.matmul(grad_logits.to(weight.dtype), weight)
                    grad_hidden[index * rows : index * rows + h.shape[0]] = part.to(hidden.dtype)
                if need_weight:
                    grad_weight += grad_logits.flatten(0, -2).T.to(accumulate) @ h.reshape(-1, h.shape[-1]).to(accumulate)
                if need_bias:
                    grad_bias += grad_logits.flatten(0, -2).sum(0)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def head_logprobs(
    hidden: Tensor, lm_head: nn.Module, tokens: Tensor, temperature: float, with_entropy: bool = False,
    entropy_grad: bool = False, transform: LogitTransform = IDENTITY,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs of ``tokens`` under ``transform(lm_head(hidden)) / temperature``, optionally the entropy.

    A plain linear head goes through the chunked :class:`_HeadTokenLogprobs`; other heads (quantized,
    adapted) materialize the logits. The entropy has a graph only with ``entropy_grad`` (an entropy bonus).
    """
    from lit_rlhf.ppo import entropy_from_logits

    if type(lm_head) is nn.Linear and not (with_entropy and entropy_grad):
        logprobs, entropy = _HeadTokenLogprobs.apply(
            hidden, lm_head.weight, lm_head.bias, tokens, temperature, with_entropy, transform
        )
        return logprobs, entropy if with_entropy else None
    logits = _with_temperature(transform.apply(lm_head(hidden)), temperature)
    logprobs = token_logprobs(logits, tokens)
    if not with_entropy:
        return logprobs, None
    if entropy_grad and torch.is_grad_enabled():
        return logprobs, entropy_from_logits(logits.float())
    with torch.no_grad():  # a statistic: in row chunks, so its [rows, len, vocab] temporaries stay small
        chunks = logits.detach().split(_rows_per_chunk(logits[0].numel()))
        return logprobs, torch.cat([entropy_from_logits(chunk.float()) for chunk in chunks])


class ResponseOutput(NamedTuple):
    """Per-response-token outputs of a forward pass, each ``[batch, response_len]``."""

    logprobs: Tensor
    values: Optional[Tensor]
    entropy: Optional[Tensor]
    filtered_logprobs: Optional[Tensor] = None  # under top-k / top-p filtering, when asked for (no gradient)


def response_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, context_length: int) -> Tensor:
    """The backbone's last hidden states at the positions that predict the response tokens."""
    backbone, _ = backbone_and_head(model)
    return backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
        use_cache=False,
    ).last_hidden_state[:, context_length - 1 : -1]


@torch.no_grad()
def filtered_head_logprobs(
    hidden: Tensor, lm_head: nn.Module, tokens: Tensor, temperature: float, top_k: int, top_p: float,
    transform: LogitTransform = IDENTITY,
) -> Tensor:
    """Log-probs of ``tokens`` under the distribution sampling draws from with top-k / top-p: the renormalized
    ``logits / temperature`` of the kept tokens (what vLLM reports as ``processed_logprobs``), in row chunks.
    A token outside the kept set gets a log-prob of -1e4 rather than -inf."""
    from lit_rlhf.rollout import filtered_logits

    linear = type(lm_head) is nn.Linear
    vocab = lm_head.weight.shape[0] if linear else lm_head(hidden[:1, :1]).shape[-1]
    rows, values = _rows_per_chunk(hidden.shape[1] * vocab), []
    for h, t in zip(hidden.split(rows), tokens.split(rows)):
        raw = _head_logits(h, lm_head.weight, lm_head.bias, transform) if linear else transform.apply(lm_head(h).float())
        logprobs = filtered_logits(raw, temperature, top_k, top_p).log_softmax(-1)
        values.append(logprobs.gather(-1, t.unsqueeze(-1)).squeeze(-1).clamp(min=-1e4))
    return torch.cat(values)


def response_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    context_length: int,
    temperature: float,
    value_head: Optional[nn.Module] = None,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    sampling_filter: Optional[tuple[int, float]] = None,
) -> ResponseOutput:
    """Log-probs (of ``logits / temperature``), values and entropy of the tokens after the prompt.

    The LM head runs on the response positions only, and the value head on the same hidden states. The
    entropy (a full pass over the vocabulary) is computed without a graph unless ``entropy_grad``. With
    ``sampling_filter`` ``(top_k, top_p)`` the log-probs under that filtering come along too (no gradient).
    """
    _, lm_head = backbone_and_head(model)
    hidden = response_hidden(model, input_ids, attention_mask, context_length)
    tokens, transform = input_ids[:, context_length:], LogitTransform.of(model.config)
    logprobs, entropy = head_logprobs(hidden, lm_head, tokens, temperature, with_entropy, entropy_grad, transform)
    values = None
    if value_head is not None:
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    filtered = None
    if sampling_filter is not None:
        filtered = filtered_head_logprobs(hidden, lm_head, tokens, temperature, *sampling_filter, transform)
    return ResponseOutput(logprobs, values, entropy, filtered)


POLICY_ADAPTER, CRITIC_ADAPTER = "default", "critic"


class PolicyWithValueHead(nn.Module):
    """A LoRA-adapted causal LM plus a scalar value head (None for critic-free training).

    The value head reads the policy's own last hidden state, or, with ``critic_adapter``, the hidden state
    of the same frozen base under a second LoRA adapter (a separate critic, no second copy of the base).
    Every use of the weights goes through one of three entry points (``forward``, ``reference_logprobs``,
    ``generate``), so that a strategy sharding this module (FSDP2) can gather its weights around each.
    """

    def __init__(self, model: nn.Module, value_head: Optional[nn.Linear], critic_adapter: bool = False) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.critic_adapter = critic_adapter

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, context_length: int, temperature: float,
        with_entropy: bool = False, entropy_grad: bool = False, sampling_filter: Optional[tuple[int, float]] = None,
    ) -> ResponseOutput:
        """Log-probs, values (None without a value head) and entropy of the response tokens (and their log-probs
        under ``sampling_filter``'s top-k / top-p, see :func:`response_forward`)."""
        shared_head = self.value_head if not self.critic_adapter else None
        out = response_forward(
            self.model, input_ids, attention_mask, context_length, temperature, shared_head, with_entropy,
            entropy_grad, sampling_filter,
        )
        if self.critic_adapter:
            with self._adapter(CRITIC_ADAPTER):
                hidden = response_hidden(self.model, input_ids, attention_mask, context_length)
            out = out._replace(values=self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float())
        return out

    @contextlib.contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        """Run the LoRA adapter ``name`` inside this block."""
        with self._trainable_kept():
            self.model.base_model.set_adapter(name)
            try:
                yield
            finally:
                self.model.base_model.set_adapter(POLICY_ADAPTER)

    @contextlib.contextmanager
    def _trainable_kept(self) -> Iterator[None]:
        """peft's ``set_adapter`` (also called when adapters are re-enabled) makes the active adapter the only
        one that trains: keep what trains as it was (both adapters with a critic adapter)."""
        trainable = [p.requires_grad for p in self.model.parameters()]
        try:
            yield
        finally:
            for parameter, flag in zip(self.model.parameters(), trainable):
                parameter.requires_grad_(flag)

    def reference_logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, context_length: int, temperature: float
    ) -> Tensor:
        """Log-probs of the response tokens under the frozen base model: the default reference policy."""
        with self.adapter_disabled():
            return response_forward(self.model, input_ids, attention_mask, context_length, temperature).logprobs

    def generate(self, **kwargs) -> Tensor:
        """``generate`` of the adapted causal LM."""
        return self.model.generate(**kwargs)

    def train(self, mode: bool = True) -> "PolicyWithValueHead":
        """Set training mode everywhere except in bitsandbytes' quantized layers, which stay in eval mode.

        Those pick their matmul by mode on CPU (int8 activations in eval, dequantized weights in training):
        rollouts run in eval mode, and the PPO passes must compute the very same log-probs. They hold no
        trained weights, and dropout is off by probability (:func:`disable_dropout`), not by mode.
        """
        super().train(mode)
        for module in self.modules():
            if type(module).__module__.startswith("bitsandbytes"):
                module.training = False
        return self

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run the frozen base model (the default reference policy) inside this block."""
        with self._trainable_kept(), self.model.disable_adapter():
            yield

    def save_pretrained(self, directory: str | os.PathLike, is_main_process: bool = True) -> None:
        """Save the adapter in peft format and the value head as ``value_head.safetensors``.

        Sharded weights are gathered first, so under FSDP2 every rank must call this; only the main
        process writes.
        """
        from safetensors.torch import save_file

        from lit_rlhf.sharding import full_tensor

        def gathered(state: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: full_tensor(v).detach().contiguous().cpu() for k, v in state.items()}

        adapter = gathered({
            k: v for k, v in self.model.state_dict().items() if "lora_" in k and f".{CRITIC_ADAPTER}." not in k
        })
        head = gathered(self.value_head.state_dict()) if self.value_head is not None else None
        if is_main_process:
            self.model.save_pretrained(directory, state_dict=adapter, selected_adapters=[POLICY_ADAPTER])
            if head is not None:
                save_file(head, os.path.join(directory, "value_head.safetensors"))


_STOCHASTIC_SETTINGS = ("dropout", "pdrop", "layerdrop", "jitter")  # dropout, GPT-2's *_pdrop, OPT, Mixtral


def disable_dropout(model: nn.Module) -> int:
    """Turn off everything random in ``model``'s forward while leaving it in training mode.

    Zeroes dropout modules and every float setting named like dropout, layer drop or router jitter, on the
    modules and on their configs (Falcon reads its dropout from the config at each forward). Unlike
    ``eval()``, this keeps training mode, where ``transformers`` applies gradient checkpointing. Returns
    how many settings were non-zero.
    """
    changed = 0
    owners = list(model.modules()) + list({id(c): c for m in model.modules() if (c := vars(m).get("config")) is not None}.values())
    for owner in owners:
        if isinstance(owner, nn.Dropout):
            changed += owner.p != 0
            owner.p = 0.0
        for name, value in list(vars(owner).items()):
            if any(key in name for key in _STOCHASTIC_SETTINGS) and type(value) is float:
                changed += value != 0
                setattr(owner, name, 0.0)
    return changed


def add_lora(base: nn.Module, config: ModelConfig, task_type: str = "CAUSAL_LM",
             modules_to_save: Optional[list[str]] = None, field: str = "policy") -> tuple[nn.Module, object]:
    """Wrap ``base`` with a LoRA adapter on ``config.lora_target_modules`` (by default the architecture's
    attention and MLP projections); ``modules_to_save`` are trained in full (e.g. a reward model's head)."""
    from peft import LoraConfig, get_peft_model

    if config.lora_r <= 0:
        raise ConfigError(f"{field}.lora_r must be positive: the adapter is what trains")
    targets = config.lora_target_modules or default_lora_targets(base)
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type=task_type,
        modules_to_save=modules_to_save,
    )
    try:
        model = get_peft_model(base, lora)
    except ValueError as err:
        raise ConfigError(f"{field}.lora_target_modules={targets}: {err}") from err
    # the adapter names its base as the recipe does (a hub id, builtin:..., a path as given), not a cache folder
    # of this machine: a saved adapter (policy/, adapter/) then merges and loads elsewhere too
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = config.model_name_or_path
    return model, lora


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass; non-reentrant, so it works with a frozen base (no
    input that requires grad) and with sharded weights."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_policy(
    config: PolicyConfig, device: Optional[torch.device] = None, value_head: bool = True
) -> PolicyWithValueHead:
    """Load the base causal LM (quantized if asked), add the LoRA adapter and (for PPO) a fresh value head,
    on the policy's hidden state or on a critic adapter of its own (``config.critic``)."""
    if config.lora_r <= 0:
        raise ConfigError("policy.lora_r must be positive: lit-rlhf trains a LoRA adapter on a frozen base model")
    base = load_causal_lm(
        config.model_name_or_path, config.dtype, config.trust_remote_code, field_name="policy.model_name_or_path",
        quantization=config.quantization, device=device,
    )
    model, lora = add_lora(base, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    check_logprobs_match_model(model, config.model_name_or_path)
    if not value_head:
        return PolicyWithValueHead(model, None)
    critic_adapter = config.critic == "adapter"
    if critic_adapter:
        model.add_adapter(CRITIC_ADAPTER, lora)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)  # both adapters train; the base stays frozen
    elif config.critic != "shared_head":
        raise ConfigError(f"policy.critic={config.critic!r}: use shared_head or adapter")
    head = nn.Linear(base.get_output_embeddings().in_features, 1)
    if config.value_head_init_std > 0:
        nn.init.normal_(head.weight, std=config.value_head_init_std)
    else:
        nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return PolicyWithValueHead(model, head, critic_adapter)


@torch.no_grad()
def check_logprobs_match_model(model: nn.Module, name: str, length: int = 8) -> float:
    """Compare :func:`response_forward`'s log-probs with ``log_softmax`` of the model's own logits.

    The model's forward is what ``generate`` samples from; lit-rlhf computes log-probs from the backbone's
    hidden states and the LM head (plus the :class:`LogitTransform` its config names). An architecture
    that transforms its logits some other way would make the PPO ratio, the KL and the entropy refer
    to another distribution than the sampled one: refuse it at load time. Returns the largest difference.
    """
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    vocab = embeddings.num_embeddings
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (1, length), generator=generator, device="cpu").to(device)
    attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        context = length // 2
        expected = logits[:, context - 1 : -1].log_softmax(-1).gather(-1, input_ids[:, context:, None]).squeeze(-1)
        ours = response_forward(model, input_ids, attention_mask, context, temperature=1.0).logprobs
    finally:
        model.train(was_training)
    difference = float((ours - expected).abs().max())
    full_precision = embeddings.weight.dtype == torch.float32 and not getattr(model, "is_quantized", False)
    tolerance = 1e-3 if full_precision else 0.25
    if not difference <= tolerance:
        raise ConfigError(
            f"policy.model_name_or_path={name!r}: its logits differ from what lit-rlhf computes from its hidden "
            f"states and LM head by up to {difference:.3g} nats (architecture {model.config.model_type!r}), so "
            "PPO would train on another distribution than the one it samples. This architecture transforms its "
            "logits in a way lit-rlhf does not know yet: please report it"
        )
    return difference


class SequenceClassifierReward(nn.Module):
    """A frozen sequence-classification reward model, scored at the last real token of each text.

    When its tokenizer differs from the policy's, completions are decoded to text and re-tokenized, with
    the reward model's own chat template when it has one. Scoring runs in batches of ``batch_size``.
    """

    def __init__(
        self, name_or_path: str, policy_tokenizer: "transformers.PreTrainedTokenizerBase", label_index: Optional[int] = None,
        dtype: DType = "float32", trust_remote_code: bool = False, quantization: Quantization = None,
        batch_size: Optional[int] = None, device: Optional[torch.device] = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        super().__init__()
        self.model = freeze(_load_pretrained(
            AutoModelForSequenceClassification, name_or_path, "reward.model_name_or_path",
            dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            **quantization_kwargs(quantization, dtype, "reward.quantization", device),
        ))
        if device is not None and quantization is None:  # outside the module tree: no strategy moves it
            self.model.to(device)
        num_labels = self.model.config.num_labels
        if label_index is None:
            if num_labels != 1:
                raise ConfigError(
                    f"reward.model_name_or_path={name_or_path!r} has {num_labels} labels: set reward.label_index "
                    "to the label whose logit is the reward"
                )
            label_index = 0
        if not 0 <= label_index < num_labels:
            raise ConfigError(f"reward.label_index={label_index} is out of range for {num_labels} labels")
        self.label_index = label_index
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        self.tokenizer.padding_side = "right"
        self.shares_tokenizer = self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()

    @property
    def score_head(self) -> Optional[nn.Linear]:
        """The linear head of decoder-style classifiers (None for encoders that pool their own way)."""
        head = getattr(self.model, "score", None)
        return head if isinstance(head, nn.Linear) else None

    def texts_for_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        """Prompt and completion as the reward model reads them: its chat template, or plain text."""
        if self.tokenizer.chat_template is None:
            return [f"{p} {c}" for p, c in zip(prompts, completions)]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
            )
            for p, c in zip(prompts, completions)
        ]

    @torch.no_grad()
    def forward(
        self, prompts: Sequence[str], completions: Sequence[str], input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """Scores ``[batch]``; the policy's token ids are used directly when the tokenizers match."""
        device = input_ids.device
        if not self.shares_tokenizer:
            encoded = self.tokenizer(
                self.texts_for_reward(prompts, completions), return_tensors="pt", padding=True,
                add_special_tokens=self.tokenizer.chat_template is None,
            )
            input_ids, attention_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        chunk = self.batch_size or input_ids.shape[0]
        return torch.cat([
            self._score(ids, mask) for ids, mask in zip(input_ids.split(chunk), attention_mask.split(chunk))
        ])

    def _score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return sequence_scores(self.model, input_ids, attention_mask, self.label_index)


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, label_index: int = 0) -> Tensor:
    """A sequence classifier's score of each row ``[batch]``, at the last real token (left or right padding).

    Decoder classifiers (a linear ``score`` head, peft-wrapped or not) are pooled here, so that padding on
    either side gives the same score; encoder classifiers pool on their own.
    """
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    head = getattr(inner, "score", None)
    if head is None:  # encoder classifiers pool on their own first token
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, label_index].float()
    hidden = inner.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
        use_cache=False,
    ).last_hidden_state
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weight = head.weight if isinstance(head, nn.Linear) else next(head.parameters())
    return head(pooled.to(weight.dtype))[:, label_index].float()


def next_token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``log p(token_t | tokens_<t)`` for t = 1.. of each row ``[batch, len - 1]`` (right padding), through the
    chunked LM head: the ``[batch, len, vocab]`` logits are never held at once."""
    _, lm_head = backbone_and_head(model)
    hidden = response_hidden(model, input_ids, attention_mask, context_length=1)
    logprobs, _ = head_logprobs(hidden, lm_head, input_ids[:, 1:], 1.0, transform=LogitTransform.of(model.config))
    return logprobs


def init_value_head_from_reward(value_head: nn.Linear, reward: SequenceClassifierReward) -> None:
    """Copy the reward model's score-head row (``label_index``) into the value head."""
    head = reward.score_head
    if head is None or head.in_features != value_head.in_features:
        found = "no linear score head" if head is None else f"a score head over {head.in_features} features"
        raise ConfigError(
            f"policy.value_head_from_reward needs a reward model whose score head reads {value_head.in_features} "
            f"features like the policy's; it has {found}. Set policy.value_head_from_reward=false"
        )
    with torch.no_grad():
        value_head.weight.copy_(head.weight[reward.label_index : reward.label_index + 1].float())
        value_head.bias.zero_()
        if head.bias is not None:
            value_head.bias.copy_(head.bias[reward.label_index].float())
