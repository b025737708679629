"""The ``lit-rlhf`` command: LightningCLI over ``PPOModule`` and ``PromptDataModule``."""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf.data import PromptDataModule
from lit_rlhf.module import PPOModule


class PPOCLI(LightningCLI):
    """``lit-rlhf fit --config recipe.yaml``; the data module's tokenizer follows the policy."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.policy.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.policy.trust_remote_code", "data.trust_remote_code")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}


def main(args: Optional[list[str]] = None) -> None:
    """``lit-rlhf fit ...`` trains (LightningCLI); ``lit-rlhf export ...`` merges a trained adapter."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from jsonargparse import CLI

        from lit_rlhf.export import export_policy

        CLI(export_policy, args=argv[1:], as_positional=False)
        return
    if not torch.cuda.is_available():
        # DeepSpeed (imported when a recipe names its strategy) would print a warning to stdout on machines
        # without a GPU, corrupting `--print_config` output; naming its accelerator keeps it quiet.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        PPOCLI(
            PPOModule, PromptDataModule, args=args, seed_everything_default=0, auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
        )
    except SIGTERMException:
        print("Stopped by SIGTERM after saving a checkpoint; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
