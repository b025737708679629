"""Supervised fine-tuning, the stage before PPO: a LoRA (or fully trained) causal LM learns to answer prompts
with their completions; the loss is on the completion tokens only unless ``loss_on: all``.

``lit-rlhf fit --config recipes/sft.yaml`` (the recipe's ``model.class_path`` picks this stage). At the end
the run writes ``adapter/`` (peft) and ``model/`` (the adapter merged into the base: a plain transformers
checkpoint that a PPO recipe's ``model.policy.model_name_or_path`` takes as is).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_rlhf.checkpoints import as_config, plain_hyperparameters
from lit_rlhf.configs import OptimizerConfig
from lit_rlhf.data import load_table, require_column
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import (
    ModelConfig,
    next_token_logprobs,
)
from lit_rlhf.pairs import (
    PairsDataModule,
    encode,
    fit_length,
    padded_pairs,
    split_messages,
)
from lit_rlhf.stage import AdapterStage


class SFTDataModule(PairsDataModule):
    """Prompt/completion pairs (or chat conversations) for supervised fine-tuning, batched by length."""

    FIELDS_THAT_MUST_MATCH = ("path", "prompt_field", "completion_field", "messages_field", "split",
                              "apply_chat_template", "max_length", "overlong", "batch_size", "group_by_length", "seed")

    def __init__(
        self,
        path: str,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        messages_field: str = "messages",
        split: str = "train",
        apply_chat_template: bool = False,
        max_length: int = 512,
        overlong: Literal["drop", "truncate"] = "drop",
        batch_size: int = 8,
        group_by_length: bool = True,
        val_path: Optional[str] = None,
        val_split: Optional[str] = None,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: Optional[str] = None,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            path: A .jsonl/.json/.parquet/.csv file, a ``save_to_disk`` folder or a hub data set.
            prompt_field: Column of the prompts (with ``completion_field``).
            completion_field: Column of the answers to learn.
            messages_field: Column of chat conversations (lists of ``{role, content}``) whose last, assistant
                turn is learnt; used instead of prompt/completion when the data has it.
            split: Split to read from a data set with several.
            apply_chat_template: Format prompt/completion pairs as a user and an assistant turn.
            max_length: Longest prompt + completion in tokens.
            overlong: ``drop`` longer pairs or ``truncate`` their completions (counts are reported).
            batch_size: Pairs per batch (per device).
            group_by_length: Batch pairs of similar length together (less padding).
            val_path: Held-out pairs: validation loss and perplexity.
            val_split: Split of ``val_path`` (default: ``split``).
            seed: Seed of the batch order.
            num_workers: DataLoader worker processes.
            tokenizer: Tokenizer to use; the CLI sets it to the model's ``model_name_or_path``.
            trust_remote_code: Allow the tokenizer's own code to run.
        """
        super().__init__()
        self.save_hyperparameters()
        self._check_sizes()

    def _pairs(self, tokenizer: Any, path: str, split: str) -> list:
        hp = self.hparams
        table = load_table(path, split)
        chat = hp.messages_field in table
        if chat:
            conversations = require_column(table, hp.messages_field, path, list)
            rows = [split_messages(m, f"data.path={path!r}, row {i}") for i, m in enumerate(conversations, 1)]
        else:
            rows = list(zip(require_column(table, hp.prompt_field, path), require_column(table, hp.completion_field, path)))
        pairs, empty, overlong = [], 0, 0
        for prompt, completion in rows:
            if not completion.strip():
                empty += 1
                continue
            pair = encode(tokenizer, prompt, completion, chat or hp.apply_chat_template, self.stop_ids)
            fitted = fit_length(pair, hp.max_length, hp.overlong)
            overlong += fitted is not pair
            if fitted is not None:
                pairs.append(fitted)
        if empty or overlong:
            rank_zero_warn(
                f"data.path={path!r}: {empty} pairs with an empty completion dropped; {overlong} pairs longer than "
                f"data.max_length={hp.max_length} tokens {'dropped' if hp.overlong == 'drop' else 'truncated'}"
            )
        if not pairs:
            raise ConfigError(f"data.path={path!r} has no usable pairs (empty or too long for data.max_length)")
        return pairs

    def collate(self, pairs: list) -> dict[str, Tensor]:
        return padded_pairs(pairs, self.pad_token_id)

    def _window_batches(self, shuffle: bool) -> int:
        return 50 if self.hparams.group_by_length or not shuffle else 1


class SFTModule(AdapterStage):
    """Supervised fine-tuning of a causal LM: next-token cross-entropy on the completions."""

    tokenizer_source = "policy"  # the data module tokenizes with this model's tokenizer
    datamodule_class = SFTDataModule
    MODEL_SECTIONS_THAT_MUST_MATCH = ("policy", "full_finetune")

    def __init__(
        self,
        policy: ModelConfig = ModelConfig(),
        full_finetune: bool = False,
        loss_on: Literal["completion", "all"] = "completion",
        optimizer: OptimizerConfig = OptimizerConfig(lr=2e-4, scheduler="cosine"),
        export_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            policy: The model to fine-tune (checkpoint, dtype, LoRA settings, quantization for QLoRA).
            full_finetune: Train every weight instead of a LoRA adapter (no quantization; keep dtype float32).
            loss_on: ``completion``: learn the completions only; ``all``: the prompts too.
            optimizer: Optimizer and learning-rate schedule.
            export_dir: Where to write the merged model at the end (default: ``model/`` in the run's folder).
        """
        super().__init__()
        policy, optimizer = as_config(ModelConfig, policy), as_config(OptimizerConfig, optimizer)
        optimizer.check("model.init_args.optimizer")
        self._check_full_finetune(policy, full_finetune)
        self.save_hyperparameters(plain_hyperparameters(policy=policy, full_finetune=full_finetune, loss_on=loss_on,
                                                        optimizer=optimizer, export_dir=export_dir))
        self.config, self.full_finetune, self.loss_on = policy, full_finetune, loss_on
        self.optimizer_config, self.export_dir = optimizer, export_dir
        self.model = None
        self._val_sums: Optional[Tensor] = None

    def completion_nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed negative log-likelihood of the learnt tokens, and how many there are."""
        logprobs = next_token_logprobs(self.model, batch["input_ids"], batch["attention_mask"])
        learnt = batch["completion_mask"] if self.loss_on == "completion" else batch["attention_mask"]
        weights = (learnt[:, 1:] * batch["attention_mask"][:, 1:]).to(logprobs.dtype)
        return -(logprobs * weights).sum(), weights.sum()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        nll, tokens = self.completion_nll(batch)
        loss = nll / tokens.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tokens", tokens, reduce_fx="sum", batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        nll, tokens = self.completion_nll(batch)
        self._val_sums += torch.stack([nll.detach(), tokens]).double()

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums.clone(), reduce_op="sum")
        loss = sums[0] / sums[1].clamp(min=1)
        self.log("val/loss", loss.float(), prog_bar=True)
        self.log("val/perplexity", loss.exp().float())
