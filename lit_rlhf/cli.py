"""The ``lit-rlhf`` command: ``fit`` (LightningCLI over ``PPOModule`` and ``PromptDataModule``) and ``export``.

Heavy imports (torch, Lightning, transformers) happen only once a subcommand needs them, so ``lit-rlhf
--help`` and ``--version`` answer at once. Errors from lit-rlhf's own checks print as one line and exit 2;
``--debug`` (or ``LIT_RLHF_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Optional

from lit_rlhf import __version__

USAGE = """usage: lit-rlhf [--version] [--debug] {fit,export} ...

RLHF with PPO for LoRA-adapted causal language models, on PyTorch Lightning.

commands:
  fit      train: lit-rlhf fit --config recipes/quickstart.yaml [--field.name=value ...]
           (--print_config shows the resolved recipe, --help every field)
  export   merge a trained adapter into its base model: lit-rlhf export --adapter_dir RUN/policy
           --output_dir merged/ (or --checkpoint RUN/checkpoints/last.ckpt)

options:
  --version  print the version and exit
  --debug    show tracebacks for lit-rlhf's own errors (also LIT_RLHF_DEBUG=1)
"""


def main(args: Optional[list[str]] = None) -> None:
    """``lit-rlhf fit ...`` trains (LightningCLI); ``lit-rlhf export ...`` merges a trained adapter."""
    argv = list(sys.argv[1:] if args is None else args)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["LIT_RLHF_DEBUG"] = "1"  # also seen by the processes a distributed strategy launches
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    if argv[0] == "--version":
        print(f"lit-rlhf {__version__}")
        return
    if argv[0] not in ("fit", "export"):
        print(USAGE, end="", file=sys.stderr)
        print(f"lit-rlhf: error: unknown command {argv[0]!r}: use fit or export", file=sys.stderr)
        sys.exit(2)

    import logging

    from lit_rlhf.errors import LitRLHFError

    # bitsandbytes announces at import that an optional CPU kernel could not be fetched from the hub: noise here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    try:
        if argv[0] == "export":
            _export(argv[1:])
        else:
            _fit(argv)
    except LitRLHFError as err:
        if os.environ.get("LIT_RLHF_DEBUG"):
            raise
        print(f"lit-rlhf: error: {err}", file=sys.stderr)
        sys.exit(2)


def _export(argv: list[str]) -> None:
    from jsonargparse import CLI

    from lit_rlhf.export import export_policy

    CLI(export_policy, args=argv, as_positional=False, prog="lit-rlhf export")


def _fit(argv: list[str]) -> None:
    import torch
    from jsonargparse import ArgumentError, set_parsing_settings
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_rlhf.callbacks import RunConfig
    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.errors import ConfigError
    from lit_rlhf.module import PPOModule
    from lit_rlhf.runs import prepare_fit_config, recipe_error

    if not torch.cuda.is_available():
        # DeepSpeed (imported when a recipe names its strategy) would print a warning to stdout on machines
        # without a GPU, corrupting `--print_config` output; naming its accelerator keeps it quiet.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the configs' field docs in --help
    # main() passes the arguments it has read (without --debug) on purpose
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")

    stage = _stage_class(argv)
    model_class, data_class = (PPOModule, PromptDataModule) if stage is None else (stage, stage.datamodule_class)
    prefix = "" if stage is None else "init_args."
    source = getattr(model_class, "tokenizer_source", "policy")

    class StageCLI(LightningCLI):
        """``lit-rlhf fit --config recipe.yaml``; the data module's tokenizer follows the trained model."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments(f"model.{prefix}{source}.model_name_or_path", f"data.{prefix}tokenizer")
            parser.link_arguments(f"model.{prefix}{source}.trust_remote_code", f"data.{prefix}trust_remote_code")
            parser.add_argument(
                "--cpu_threads", type=Optional[int], default=None,
                help="Threads of each training process on CPU (None: the cores this process may use, divided by "
                     "the processes per machine; OMP_NUM_THREADS, when set, decides instead)",
            )

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

        def parse_arguments(self, parser, args) -> None:
            """Parse; a misspelled or mistyped field is one line naming it (and the field meant, if close)."""
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                raise ConfigError(recipe_error(str(err), parser)) from None

        def _parse_ckpt_path(self) -> None:
            """Keep the recipe of the command line. (Lightning would replace its ``model`` section by the
            checkpoint's hyper-parameters: ``--ckpt_path`` of another recipe would silently train that one, and
            changed settings would be dropped.) The module refuses a checkpoint of another recipe when it loads."""

        def before_instantiate_classes(self) -> None:
            prepare_fit_config(self.config[self.subcommand])

    try:
        StageCLI(
            model_class, data_class, args=argv, seed_everything_default=0,
            auto_configure_optimizers=False, save_config_callback=RunConfig, save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "lit-rlhf", "exit_on_error": False, "fit": {"exit_on_error": False}},
            subclass_mode_model=stage is not None, subclass_mode_data=stage is not None,
        )
    except SIGTERMException:
        print("Stopped by SIGTERM after saving a checkpoint; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except SystemExit as exit_:
        from lit_rlhf.callbacks import PreemptionCheckpoint

        if exit_.code == 1 and PreemptionCheckpoint.interrupted:  # Lightning exits 1 after a graceful Ctrl-C
            print("Stopped by Ctrl-C after saving a checkpoint; resume with --ckpt_path last", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        raise


def _stage_class(argv: list[str]) -> Optional[type]:
    """The stage a recipe asks for with ``model.class_path`` (SFT, reward model), or None for PPO.

    Read from the ``--config`` files and ``--model``/``--model.class_path`` arguments, in order (the last wins),
    before LightningCLI builds its parser: PPO recipes need no ``class_path``.
    """
    import importlib

    import yaml

    class_path = None
    for index, arg in enumerate(argv):
        value = argv[index + 1] if index + 1 < len(argv) else None
        if arg in ("--config", "-c") or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else value
            if path and os.path.isfile(path):
                with open(path) as file:
                    recipe = yaml.safe_load(file) or {}
                model = recipe.get("model") if isinstance(recipe, dict) else None
                if isinstance(model, dict) and model.get("class_path"):
                    class_path = model["class_path"]
        elif arg.startswith(("--model.class_path=", "--model=")):
            class_path = arg.split("=", 1)[1]
        elif arg in ("--model.class_path", "--model") and value:
            class_path = value
    if class_path is None or class_path.rsplit(".", 1)[-1] == "PPOModule":
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        stage = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        from lit_rlhf.errors import ConfigError

        raise ConfigError(f"model.class_path={class_path!r} cannot be imported ({err}): use "
                          "lit_rlhf.sft.SFTModule, lit_rlhf.reward_modeling.RewardModelModule, lit_rlhf.dpo.DPOModule or none (PPO)") from err
    if not hasattr(stage, "datamodule_class"):
        from lit_rlhf.errors import ConfigError

        raise ConfigError(f"model.class_path={class_path!r} is not a lit-rlhf stage (it names no datamodule_class)")
    return stage


if __name__ == "__main__":
    main()
