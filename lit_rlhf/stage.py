"""What the SFT and reward-model stages share: loading, the optimizer, exact resume, and writing the adapter and
the merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.checkpoints import ExactResume
from lit_rlhf.configs import optimizer_and_schedule
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import add_lora, enable_gradient_checkpointing, load_causal_lm, load_tokenizer


class AdapterStage(ExactResume, L.LightningModule):
    """A stage that trains ``self.model`` (a LoRA adapter, or all weights with ``full_finetune``) and exports it.

    Subclasses set ``self.model``, ``self.tokenizer``, ``self.config`` (a ``ModelConfig``),
    ``self.optimizer_config``, ``self.full_finetune`` and ``self.export_dir``. Checkpoints hold the trained
    weights, the random state and the data position: a resumed run continues exactly where the stopped one was.
    """


    export_name = "model"  # the merged model's folder in the run's folder (unless export_dir)
    sequence_classification = False
    export_use = "model.policy.model_name_or_path"
    config_field = "model.policy"  # the recipe field of ``self.config``, named in errors

    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False  # checkpoints hold only the trained weights (checked in on_load_checkpoint)

    def _check_full_finetune(self, config: Any, full_finetune: bool) -> None:
        if full_finetune and config.quantization is not None:
            raise ConfigError(
                f"model.full_finetune cannot train quantized weights: set {self.config_field}.quantization: null")

    def load_base(self, device: Any) -> Any:
        """The frozen base model of ``self.config`` on ``device``: a causal LM (the reward model loads a
        sequence classifier instead)."""
        cfg = self.config
        return load_causal_lm(cfg.model_name_or_path, cfg.dtype, cfg.trust_remote_code, "policy.model_name_or_path",
                              cfg.quantization, device)

    def configure_model(self) -> None:
        """Load the tokenizer and the base, then add the LoRA adapter (or train every weight)."""
        if self.model is not None:
            return
        cfg = self.config
        device = self._trainer.strategy.root_device if self._trainer is not None else None
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
        base = self.load_base(device)
        if self.full_finetune:
            base.requires_grad_(True)
            self.model = base
        else:  # for SEQ_CLS peft trains the classifier head ("score"/"classifier") in full
            task_type = "SEQ_CLS" if self.sequence_classification else "CAUSAL_LM"
            self.model, _ = add_lora(base, cfg, task_type=task_type, field=self.config_field)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(base)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        return optimizer_and_schedule(params, self.optimizer_config, total)

    def on_train_end(self) -> None:
        """Write ``adapter/`` and the merged model (``export_dir`` or ``<run>/<export_name>``), with the tokenizer."""
        from lit_rlhf.runs import run_directory

        run_dir = run_directory(self.trainer)  # a collective under DDP: every rank must ask
        if not self.trainer.is_global_zero:
            return
        target = Path(self.export_dir) if self.export_dir else run_dir / self.export_name
        if self.full_finetune:
            self.model.save_pretrained(target)
        else:
            from lit_rlhf.export import merge_adapter

            adapter = run_dir / "adapter"
            self.model.save_pretrained(adapter)
            self.tokenizer.save_pretrained(adapter)
            merge_adapter(adapter, target, dtype=self.config.dtype, trust_remote_code=self.config.trust_remote_code,
                          sequence_classification=self.sequence_classification)
        self.tokenizer.save_pretrained(target)
        rank_zero_info(f"Trained model written to {target} (use it as {self.export_use})")
