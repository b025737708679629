"""Reward-model training, the stage between SFT and PPO: a sequence classifier learns from preference pairs
to score the chosen answer above the rejected one (Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``).

``lit-rlhf fit --config recipes/reward-model.yaml`` (the recipe's ``model.class_path`` picks this stage). At
the end the run writes ``reward_model/``: the adapter merged into the classifier, with its trained score head,
tokenizer and chat template, a checkpoint that a PPO recipe's ``model.reward.model_name_or_path`` takes as is.
A pair is tokenized as PPO's rollouts are (prompt, then the completion up to its first stop token, see
``lit_rlhf.pairs``), so the model scores PPO's responses at the position it was trained on.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn import functional as F

from lit_rlhf.checkpoints import as_config, plain_hyperparameters
from lit_rlhf.configs import OptimizerConfig
from lit_rlhf.data import load_table, require_column
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import (
    DType,
    ModelConfig,
    Quantization,
    _load_pretrained,
    load_tokenizer,
    quantization_kwargs,
    sequence_scores,
)
from lit_rlhf.pairs import (
    Encoded,
    PairsDataModule,
    encode,
    fit_length,
    padded_pairs,
    split_messages,
)
from lit_rlhf.stage import AdapterStage


def load_sequence_classifier(
    name_or_path: str, dtype: DType = "float32", trust_remote_code: bool = False, quantization: Quantization = None,
    device: Optional[torch.device] = None, tokenizer_dir: Optional[str] = None,
) -> torch.nn.Module:
    """A one-label ``AutoModelForSequenceClassification`` from any checkpoint (a causal LM gets a new score
    head), its ``pad_token_id`` set so that plain ``transformers`` can score padded batches."""
    from transformers import AutoModelForSequenceClassification

    model = _load_pretrained(
        AutoModelForSequenceClassification, name_or_path, "model.backbone.model_name_or_path", num_labels=1,
        dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
        **quantization_kwargs(quantization, dtype, "model.backbone.quantization", device),
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(tokenizer_dir or name_or_path, trust_remote_code).pad_token_id
    return model


class PreferenceDataModule(PairsDataModule):
    """Preference pairs: a prompt with a chosen and a rejected completion (or two chat conversations that
    differ in their last, assistant turn), and an optional margin."""

    FIELDS_THAT_MUST_MATCH = ("path", "prompt_field", "chosen_field", "rejected_field", "margin_field", "split",
                              "apply_chat_template", "max_length", "overlong", "batch_size", "seed")

    def __init__(
        self,
        path: str,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        margin_field: Optional[str] = None,
        split: str = "train",
        apply_chat_template: bool = False,
        max_length: int = 512,
        overlong: Literal["drop", "truncate"] = "drop",
        batch_size: int = 8,
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
            prompt_field: Column of the prompts (text pairs; chat pairs carry their prompt in the conversation).
            chosen_field: Column of the preferred completions (text, or a chat conversation).
            rejected_field: Column of the other completions (text, or a chat conversation).
            margin_field: Optional column of margins: the loss is ``-log sigmoid(r_c - r_r - margin)``.
            split: Split to read from a data set with several.
            apply_chat_template: Format text pairs as a user and an assistant turn.
            max_length: Longest prompt + completion in tokens.
            overlong: ``drop`` longer pairs or ``truncate`` their completions (counts are reported).
            batch_size: Pairs per batch (per device).
            val_path: Held-out pairs: ``val/accuracy`` and ``val/loss``.
            val_split: Split of ``val_path`` (default: ``split``).
            seed: Seed of the batch order.
            num_workers: DataLoader worker processes.
            tokenizer: Tokenizer to use; the CLI sets it to the model's ``model_name_or_path``.
            trust_remote_code: Allow the tokenizer's own code to run.
        """
        super().__init__()
        self.save_hyperparameters()
        self._check_sizes()

    def _pairs(self, tokenizer: Any, path: str, split: str) -> list[tuple[Encoded, Encoded, float]]:
        hp = self.hparams
        table = load_table(path, split)
        for field in (hp.chosen_field, hp.rejected_field):
            if field not in table:
                raise ConfigError(f"data: column {field!r} is not in data.path={path!r}; its columns are {sorted(table)}")
        chat = table[hp.chosen_field] and isinstance(table[hp.chosen_field][0], list)
        margins = None
        if hp.margin_field:
            margins = require_column(table, hp.margin_field, path, object)
            for row, margin in enumerate(margins, 1):
                if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                    raise ConfigError(f"data.path={path!r}, row {row}: margin column {hp.margin_field!r} holds "
                                      f"{margin!r}, not a number")
        if chat:
            chosen = [split_messages(m, f"data.path={path!r}, row {i}") for i, m in enumerate(table[hp.chosen_field], 1)]
            rejected = [split_messages(m, f"data.path={path!r}, row {i}") for i, m in enumerate(table[hp.rejected_field], 1)]
            rows = [(c[0], c[1], r[1]) for c, r in zip(chosen, rejected)]
        else:
            prompts = require_column(table, hp.prompt_field, path)
            rows = list(zip(prompts, require_column(table, hp.chosen_field, path),
                            require_column(table, hp.rejected_field, path)))
        pairs, same, empty, overlong = [], 0, 0, 0
        for index, (prompt, good, bad) in enumerate(rows):
            if not good.strip() or not bad.strip():
                empty += 1
                continue
            if good.strip() == bad.strip():
                same += 1
                continue
            encoded = [encode(tokenizer, prompt, text, chat or hp.apply_chat_template, self.stop_ids)
                       for text in (good, bad)]
            fitted = [fit_length(e, hp.max_length, hp.overlong) for e in encoded]
            overlong += any(f is not e for f, e in zip(fitted, encoded))
            if None in fitted:
                continue
            pairs.append((fitted[0], fitted[1], float(margins[index]) if margins else 0.0))
        if same or empty or overlong:
            rank_zero_warn(
                f"data.path={path!r}: dropped {same} pairs whose chosen and rejected completions are the same and "
                f"{empty} with an empty completion; {overlong} pairs longer than data.max_length={hp.max_length} "
                f"tokens {'dropped' if hp.overlong == 'drop' else 'truncated'}"
            )
        if not pairs:
            raise ConfigError(f"data.path={path!r} has no usable preference pairs")
        return pairs

    def collate(self, pairs: list[tuple[Encoded, Encoded, float]]) -> dict[str, Tensor]:
        """Chosen rows first, then rejected ones, right-padded together (one forward scores both); the
        completion mask marks each row's completion tokens (what DPO's log-probs sum over)."""
        batch = padded_pairs([p[0] for p in pairs] + [p[1] for p in pairs], self.pad_token_id)
        return {**batch, "margin": torch.tensor([p[2] for p in pairs])}

    def _length(self, pair: tuple[Encoded, Encoded, float]) -> int:
        return max(len(pair[0]), len(pair[1]))


class RewardModelModule(AdapterStage):
    """A reward model: a sequence classifier (LoRA, score head trained in full) fit to preference pairs."""

    tokenizer_source = "backbone"  # the data module tokenizes with this model's tokenizer
    datamodule_class = PreferenceDataModule
    export_name = "reward_model"
    sequence_classification = True
    export_use = "model.reward.model_name_or_path"
    config_field = "model.backbone"
    MODEL_SECTIONS_THAT_MUST_MATCH = ("backbone", "full_finetune")

    def __init__(
        self,
        backbone: ModelConfig = ModelConfig(),
        full_finetune: bool = False,
        center_coef: float = 0.0,
        optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, scheduler="cosine"),
        export_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            backbone: The checkpoint to start from (often the SFT model; a causal LM gets a new score head), its
                dtype, LoRA settings and quantization.
            full_finetune: Train every weight instead of a LoRA adapter and the score head.
            center_coef: Reward centering (Eisenstein et al., 2023): adds ``center_coef * (r_c + r_r)^2``,
                keeping scores near 0 on average (e.g. 0.01).
            optimizer: Optimizer and learning-rate schedule.
            export_dir: Where to write the merged reward model (default: ``reward_model/`` in the run's folder).
        """
        super().__init__()
        backbone, optimizer = as_config(ModelConfig, backbone), as_config(OptimizerConfig, optimizer)
        optimizer.check("model.init_args.optimizer")
        self._check_full_finetune(backbone, full_finetune)
        self.save_hyperparameters(plain_hyperparameters(backbone=backbone, full_finetune=full_finetune,
                                                        center_coef=center_coef, optimizer=optimizer,
                                                        export_dir=export_dir))
        self.config, self.full_finetune, self.center_coef = backbone, full_finetune, center_coef
        self.optimizer_config, self.export_dir = optimizer, export_dir
        self.model = None

    def load_base(self, device: Any) -> Any:
        cfg = self.config
        return load_sequence_classifier(cfg.model_name_or_path, cfg.dtype, cfg.trust_remote_code, cfg.quantization,
                                        device)

    def pair_scores(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        scores = sequence_scores(self.model, batch["input_ids"], batch["attention_mask"])
        return scores.chunk(2)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        chosen, rejected = self.pair_scores(batch)
        difference = chosen - rejected
        loss = -F.logsigmoid(difference - batch["margin"].to(difference.dtype)).mean()
        if self.center_coef:
            loss = loss + self.center_coef * ((chosen + rejected) ** 2).mean()
        size = chosen.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=size, sync_dist=stage == "val")
        self.log(f"{stage}/accuracy", (difference > 0).float().mean(), prog_bar=True, batch_size=size,
                 sync_dist=stage == "val")
        self.log(f"{stage}/margin", difference.mean(), batch_size=size, sync_dist=stage == "val")
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
