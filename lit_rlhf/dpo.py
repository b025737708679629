"""Direct preference optimization, a stage after SFT: the policy learns from preference pairs directly, with no
reward model and no sampling. Losses ``sigmoid`` (DPO, Rafailov et al., 2023; with ``label_smoothing``: the
conservative cDPO), ``ipo`` (Azar et al., 2023) and ``simpo`` (reference-free and length-normalized, Meng et al.,
2024).

``lit-rlhf fit --config recipes/dpo.yaml`` (the recipe's ``model.class_path`` picks this stage). The pairs come
from the reward-model stage's :class:`~lit_rlhf.reward_modeling.PreferenceDataModule` and end at their first stop
token as PPO's responses do (see ``lit_rlhf.pairs``). At the end the run writes ``adapter/`` and ``model/`` (the
adapter merged into the base: a plain checkpoint that ``model.policy.model_name_or_path`` takes as is).
Metrics use TRL's names (``rewards/chosen``, ``rewards/accuracies``, ``logps/rejected``, ...; ``val/`` for the
held-out pairs), so dashboards of both compare.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from lit_rlhf.checkpoints import as_config, plain_hyperparameters
from lit_rlhf.configs import OptimizerConfig, ReferenceConfig
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import ModelConfig, load_frozen_reference, next_token_logprobs
from lit_rlhf.models import disable_dropout as zero_dropout
from lit_rlhf.reward_modeling import PreferenceDataModule
from lit_rlhf.stage import AdapterStage

PreferenceLoss = Literal["sigmoid", "ipo", "simpo"]


class PreferenceTerms(NamedTuple):
    """One loss per pair, and the implicit rewards whose statistics are logged."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def sequence_logps(token_logprobs: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each row's completion tokens and how many there are.

    ``token_logprobs`` ``[rows, len - 1]`` holds ``log p(token_t | tokens_<t)`` for t = 1..; ``completion_mask``
    ``[rows, len]`` marks the completion tokens (the stop token included, padding excluded).
    """
    mask = completion_mask[:, 1:].to(token_logprobs.dtype)
    return (token_logprobs * mask).sum(1), mask.sum(1)


def preference_loss(
    loss: PreferenceLoss, beta: float, chosen_logps: Tensor, rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None,
    chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
    label_smoothing: float = 0.0, gamma: float = 0.0, margin: Optional[Tensor] = None,
) -> PreferenceTerms:
    """The loss of each preference pair, from the policy's (and the reference's) summed completion log-probs.

    - ``sigmoid``: ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` with ``z = beta * (log-ratio chosen -
      log-ratio rejected) - margin``, a log-ratio being ``log pi - log pi_ref`` (eps 0: DPO; eps > 0: cDPO).
    - ``ipo``: ``(h - 1 / (2 beta))^2`` with ``h`` the difference of the per-token log-ratios (each divided by
      its completion's length, as TRL and the IPO authors do).
    - ``simpo``: the sigmoid form with ``z = beta * (mean log-prob chosen - mean log-prob rejected) - gamma -
      margin``: no reference.

    The implicit rewards are ``beta`` times the log-ratios (``simpo``: times the mean log-probs).
    """
    if loss == "simpo":
        chosen_rewards = beta * chosen_logps / chosen_lengths.clamp(min=1)
        rejected_rewards = beta * rejected_logps / rejected_lengths.clamp(min=1)
        logits = chosen_rewards - rejected_rewards - gamma
    else:
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        if loss == "ipo":
            difference = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
            losses = (difference - 1 / (2 * beta)) ** 2
            return PreferenceTerms(losses, chosen_rewards.detach(), rejected_rewards.detach())
        logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin.to(logits.dtype)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceTerms(losses, chosen_rewards.detach(), rejected_rewards.detach())


class DPOModule(AdapterStage):
    """Preference optimization of a causal LM (LoRA, QLoRA or every weight) on chosen/rejected pairs."""

    tokenizer_source = "policy"  # the data module tokenizes with this model's tokenizer
    datamodule_class = PreferenceDataModule
    MODEL_SECTIONS_THAT_MUST_MATCH = ("policy", "full_finetune", "reference", "loss")

    def __init__(
        self,
        policy: ModelConfig = ModelConfig(),
        full_finetune: bool = False,
        loss: PreferenceLoss = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        gamma: float = 0.5,
        reference: ReferenceConfig = ReferenceConfig(),
        precompute_ref_logps: bool = False,
        disable_dropout: bool = True,
        optimizer: OptimizerConfig = OptimizerConfig(lr=5e-6, scheduler="linear"),
        export_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            policy: The model to optimize (usually the SFT model), its dtype, LoRA settings, quantization (QLoRA)
                and gradient checkpointing.
            full_finetune: Train every weight instead of a LoRA adapter (no quantization).
            loss: ``sigmoid`` (DPO; cDPO with ``label_smoothing``), ``ipo`` or ``simpo`` (no reference).
            beta: Strength of the tie to the reference (DPO/IPO: 0.01-0.5, IPO's tau); SimPO's reward scale (2-10).
            label_smoothing: Probability that a pair's preference is flipped (cDPO, e.g. 0.1; ``sigmoid`` and
                ``simpo``); 0 is plain DPO.
            gamma: SimPO's target reward margin (``simpo`` only; the paper's gamma/beta is about 0.5).
            reference: The frozen reference of ``sigmoid`` and ``ipo``: by default the policy with its adapter off
                (no second copy of the weights); ``model_name_or_path`` loads a separate checkpoint.
            precompute_ref_logps: Compute the reference's log-probs of every pair once, before training (no
                reference forward per step).
            disable_dropout: Turn off dropout (LoRA's too) in the policy and the reference, as TRL does: the
                log-probs of a pair are then the same in every pass, and the reference's are exactly the policy's
                before the first update.
            optimizer: Optimizer and learning-rate schedule.
            export_dir: Where to write the merged model at the end (default: ``model/`` in the run's folder).
        """
        super().__init__()
        policy, optimizer = as_config(ModelConfig, policy), as_config(OptimizerConfig, optimizer)
        reference = as_config(ReferenceConfig, reference)
        optimizer.check("model.init_args.optimizer")
        self._check_full_finetune(policy, full_finetune)
        self._check_loss(loss, beta, label_smoothing, reference, precompute_ref_logps)
        self.save_hyperparameters(plain_hyperparameters(
            policy=policy, full_finetune=full_finetune, loss=loss, beta=beta, label_smoothing=label_smoothing,
            gamma=gamma, reference=reference, precompute_ref_logps=precompute_ref_logps,
            disable_dropout=disable_dropout, optimizer=optimizer,
            export_dir=export_dir))
        self.config, self.full_finetune, self.loss = policy, full_finetune, loss
        self.beta, self.label_smoothing, self.gamma = beta, label_smoothing, gamma
        self.reference_config, self.precompute_ref_logps = reference, precompute_ref_logps
        self.disable_dropout = disable_dropout
        self.optimizer_config, self.export_dir = optimizer, export_dir
        self.model = None
        # the separate reference lives outside the module tree: no strategy wraps it, no checkpoint holds it
        self._frozen: dict[str, torch.nn.Module] = {}
        self._ref_logps: dict[tuple[int, ...], float] = {}

    @staticmethod
    def _check_loss(loss: str, beta: float, label_smoothing: float, reference: ReferenceConfig,
                    precompute: bool) -> None:
        field = "model.init_args"
        problems = [
            (beta <= 0, f"{field}.beta={beta} must be positive (e.g. 0.1 for DPO, 2.0 for SimPO)"),
            (not 0 <= label_smoothing < 0.5, f"{field}.label_smoothing={label_smoothing} must be in [0, 0.5) "
                                             "(the probability that a preference is flipped)"),
            (loss == "ipo" and label_smoothing > 0, f"{field}.label_smoothing={label_smoothing} has no meaning for "
                                                    "loss ipo: set it to 0 or use loss sigmoid (cDPO)"),
            (loss == "simpo" and reference.model_name_or_path is not None,
             f"{field}.reference.model_name_or_path is set but loss simpo uses no reference: remove it"),
            (loss == "simpo" and precompute, f"{field}.precompute_ref_logps has no effect with loss simpo (no "
                                             "reference): set it to false"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)

    @property
    def uses_reference(self) -> bool:
        return self.loss != "simpo"

    def setup(self, stage: str) -> None:
        """Refuse data this loss cannot use (before any weight loads)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.loss == "ipo" and datamodule is not None and datamodule.hparams.get("margin_field"):
            raise ConfigError("data.init_args.margin_field is set but loss ipo has no margin term: remove it or use "
                              "loss sigmoid or simpo (the margin is subtracted from their logits)")

    def configure_model(self) -> None:
        """The trained model (see ``AdapterStage``), and the separate reference when there is one: the checkpoint
        ``reference.model_name_or_path``, or a frozen copy of the base when every weight trains."""
        if self.model is not None:
            return
        super().configure_model()
        if self.disable_dropout:
            zero_dropout(self.model)
        if not self.uses_reference:
            return
        ref_cfg, cfg = self.reference_config, self.config
        if ref_cfg.model_name_or_path is not None or self.full_finetune:
            device = self._trainer.strategy.root_device if self._trainer is not None else None
            self._frozen["reference"] = load_frozen_reference(ref_cfg.model_name_or_path or cfg.model_name_or_path,
                                                              cfg.dtype, cfg.trust_remote_code, ref_cfg.quantization,
                                                              device)

    def completion_logps(self, model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed log-probs of every row's completion under ``model``, and the completions' lengths."""
        logprobs = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        return sequence_logps(logprobs, batch["completion_mask"])

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Tensor]) -> Tensor:
        """The reference's summed completion log-probs: precomputed, the separate model, or the adapter-free
        policy."""
        if self.precompute_ref_logps and self._ref_logps:
            keys = self._keys(batch)
            missing = [key for key in keys if key not in self._ref_logps]
            if missing:
                raise RuntimeError(f"{len(missing)} pairs of this batch have no precomputed reference log-probs")
            return torch.tensor([self._ref_logps[key] for key in keys], device=batch["input_ids"].device,
                                dtype=torch.float32)
        return self._reference_forward(batch)

    @torch.no_grad()
    def _reference_forward(self, batch: dict[str, Tensor]) -> Tensor:
        reference = self._frozen.get("reference")
        if reference is not None:
            return self.completion_logps(reference, batch)[0].float()
        with self.model.disable_adapter():
            return self.completion_logps(self.model, batch)[0].float()

    @staticmethod
    def _keys(batch: dict[str, Tensor]) -> list[tuple[int, ...]]:
        """A key per row: its tokens, with the prompt's length (where the completion starts) in front."""
        keys = []
        for ids, mask, completion in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                         batch["completion_mask"].tolist()):
            length = sum(mask)
            keys.append((completion.index(1), *ids[:length]))
        return keys

    def on_fit_start(self) -> None:
        """``precompute_ref_logps``: the reference's log-probs of every training and held-out pair, once."""
        if not (self.precompute_ref_logps and self.uses_reference) or self._ref_logps:
            return
        datamodule = self.trainer.datamodule
        pairs = datamodule.train_pairs + datamodule.val_pairs
        size = datamodule.hparams.batch_size
        for start in range(0, len(pairs), size):
            batch = {k: v.to(self.device) for k, v in datamodule.collate(pairs[start : start + size]).items()}
            self._ref_logps.update(zip(self._keys(batch), self._reference_forward(batch).tolist()))

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        ref_chosen = ref_rejected = None
        if self.uses_reference:
            ref_chosen, ref_rejected = self.reference_logps(batch).chunk(2)
        logps, lengths = self.completion_logps(self.model, batch)
        chosen_logps, rejected_logps = logps.float().chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        margin = batch["margin"] if self.loss != "ipo" else None
        terms = preference_loss(self.loss, self.beta, chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                                chosen_lengths, rejected_lengths, self.label_smoothing, self.gamma, margin)
        loss = terms.losses.mean()
        prefix = "" if stage == "train" else "val/"
        size, sync = chosen_logps.shape[0], stage == "val"
        metrics = {
            f"{stage}/loss": loss,
            f"{prefix}rewards/chosen": terms.chosen_rewards.mean(),
            f"{prefix}rewards/rejected": terms.rejected_rewards.mean(),
            f"{prefix}rewards/accuracies": (terms.chosen_rewards > terms.rejected_rewards).float().mean(),
            f"{prefix}rewards/margins": (terms.chosen_rewards - terms.rejected_rewards).mean(),
            f"{prefix}logps/chosen": chosen_logps.detach().mean(),
            f"{prefix}logps/rejected": rejected_logps.detach().mean(),
        }
        for name, value in metrics.items():
            self.log(name, value, batch_size=size, sync_dist=sync,
                     prog_bar=name in (f"{stage}/loss", f"{prefix}rewards/accuracies"))
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            self._step(batch, "val")
