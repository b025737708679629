"""DPO side by side: lit-rlhf's ``DPOModule`` and TRL's ``DPOTrainer`` (``trl==1.10.0``) on the same model, pairs,
batch order, initial adapter and hyper-parameters; per-step loss and ``rewards/accuracies`` compared, time and
peak memory per step as ratios.

    python benchmarks/dpo_comparison.py                                  # tiny model, sigmoid and ipo
    python benchmarks/dpo_comparison.py --model builtin:smollm2-135m-instruct --steps 10 --batch-size 4
    python benchmarks/dpo_comparison.py --precompute                     # both precompute the reference log-probs

The workload: the text pairs of ``recipes/data/chain_preferences.jsonl`` (TRL gets ``" " + chosen`` so that
``prompt + chosen`` is the text lit-rlhf tokenizes; both append the EOS; the script checks that the token ids
of every pair agree), in the batch order of lit-rlhf's data module for epoch 0 (TRL samples sequentially from
rows put in that order), one LoRA adapter (r 16, alpha 32, no dropout) created once and loaded by both, AdamW
(eps 1e-8, no weight decay, constant learning rate), gradient norm clipped at 1.0, float32 on CPU, no gradient
checkpointing, the reference the policy with its adapter off. Each system runs in its own subprocess (peak
resident memory over the process's own baseline after importing both libraries) and prints one JSON line; the last line holds the
largest loss difference, the steps whose ``rewards/accuracies`` differ, and the ratios lit-rlhf / TRL of the
median seconds per step (forward, backward, clipping and optimizer step) and of the peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ppo_benchmark import current_rss_mb, peak_memory_mb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "recipes" / "data" / "chain_preferences.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--losses", nargs="+", choices=["sigmoid", "ipo"], default=["sigmoid", "ipo"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precompute", action="store_true", help="precompute the reference log-probs (both)")
    parser.add_argument("--worker", choices=["lit-rlhf", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="sigmoid", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def data_module(args: argparse.Namespace):
    from lit_rlhf.reward_modeling import PreferenceDataModule

    data = PreferenceDataModule(str(PAIRS), tokenizer=args.model, batch_size=args.batch_size, max_length=64, seed=0)
    data.setup("fit")
    return data


def batch_order(data) -> list[int]:
    """The pair indices of epoch 0, batch after batch, as lit-rlhf's sampler gives them."""
    return [index for batch in data.train_dataloader().batch_sampler for index in batch]


def create_initial_adapter(model: str, directory: Path) -> None:
    """One LoRA adapter (seeded), saved for both systems to start from."""
    import torch

    from lit_rlhf.models import ModelConfig, add_lora, load_causal_lm

    torch.manual_seed(0)
    config = ModelConfig(model_name_or_path=model, lora_r=16, lora_alpha=32)
    adapted, _ = add_lora(load_causal_lm(model), config)
    adapted.save_pretrained(directory)


def run_lit_rlhf(args: argparse.Namespace, baseline_mb: float) -> dict:
    import lightning as L
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lit_rlhf.configs import OptimizerConfig
    from lit_rlhf.dpo import DPOModule
    from lit_rlhf.models import ModelConfig

    adapter = Path(args.workdir) / "initial_adapter"

    class FromInitialAdapter(DPOModule):
        def configure_model(self) -> None:
            if self.model is None:
                super().configure_model()
                set_peft_model_state_dict(self.model, load_file(adapter / "adapter_model.safetensors"))

        def on_train_end(self) -> None:  # nothing to export here
            pass

    record: dict[str, list] = {"losses": [], "accuracies": [], "step_seconds": []}

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            record["step_seconds"].append(time.perf_counter() - self.started)
            record["losses"].append(float(outputs["loss"]))
            record["accuracies"].append(float(trainer.callback_metrics["rewards/accuracies"]))

    module = FromInitialAdapter(
        policy=ModelConfig(model_name_or_path=args.model, lora_r=16, lora_alpha=32), loss=args.loss, beta=args.beta,
        precompute_ref_logps=args.precompute,
        optimizer=OptimizerConfig(lr=args.lr, eps=1e-8, scheduler="constant"),
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=[Recorder()], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data_module(args))
    return record


def run_trl(args: argparse.Namespace, baseline_mb: float) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lit_rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path

    data = data_module(args)
    rows = [json.loads(line) for line in open(PAIRS)]
    if len(rows) != len(data.train_pairs):
        raise RuntimeError("the data module dropped pairs: the rows and pairs do not line up")
    order = batch_order(data)[: args.steps * args.batch_size]
    dataset = Dataset.from_list([{"prompt": rows[i]["prompt"], "chosen": " " + rows[i]["chosen"],
                                  "rejected": " " + rows[i]["rejected"]} for i in order])
    path = resolve_model_path(args.model, "model")
    model = PeftModel.from_pretrained(load_causal_lm(args.model), str(Path(args.workdir) / "initial_adapter"),
                                      is_trainable=True)
    record: dict[str, list] = {"losses": [], "accuracies": [], "step_seconds": []}

    class Recording(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(float(loss.detach()))
            record["accuracies"].append(self._metrics["train"]["rewards/accuracies"][-1])
            return loss

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            record["step_seconds"].append(time.perf_counter() - self.started)

    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, loss_type=[args.loss],
        precompute_ref_log_probs=args.precompute, logging_steps=1, report_to=[], bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=False, train_sampling_strategy="sequential", save_strategy="no",
        max_length=None, seed=0, dataloader_drop_last=True, disable_tqdm=True,
    )
    trainer = Recording(model=model, args=config, train_dataset=dataset, processing_class=load_tokenizer(path),
                        callbacks=[Timer()])
    ours = [data.train_pairs[i] for i in order]
    theirs = trainer.train_dataset
    mismatched = sum(
        theirs[n]["prompt_ids"] + theirs[n]["chosen_ids"] != pair[0].ids
        or theirs[n]["prompt_ids"] + theirs[n]["rejected_ids"] != pair[1].ids for n, pair in enumerate(ours))
    if mismatched:
        raise RuntimeError(f"{mismatched} of {len(ours)} pairs tokenize differently in TRL and lit-rlhf")
    torch.manual_seed(0)
    trainer.train()
    return record


def worker(args: argparse.Namespace) -> None:
    import lightning  # noqa: F401  (both systems import everything first: the baseline holds the libraries)
    import trl  # noqa: F401

    import lit_rlhf.dpo  # noqa: F401

    baseline = current_rss_mb()
    record = (run_lit_rlhf if args.worker == "lit-rlhf" else run_trl)(args, baseline)
    record["peak_rss_over_baseline_mb"] = round(peak_memory_mb("cpu") - baseline, 1)
    record["median_step_seconds"] = statistics.median(record["step_seconds"][2:] or record["step_seconds"])
    print(json.dumps({"system": args.worker, "loss": args.loss, **record}))


def compare(lit: dict, trl: dict) -> dict:
    differences = [abs(a - b) for a, b in zip(lit["losses"], trl["losses"])]
    return {
        "loss": lit["loss"], "steps": len(differences),
        "max_abs_loss_difference": max(differences),
        "max_relative_loss_difference": max(d / abs(b) for d, b in zip(differences, trl["losses"])),
        "steps_where_accuracies_differ": [[step, a, b] for step, (a, b) in enumerate(zip(lit["accuracies"],
                                                                                           trl["accuracies"])) if a != b],
        "first_last_loss_lit": [lit["losses"][0], lit["losses"][-1]],
        "first_last_loss_trl": [trl["losses"][0], trl["losses"][-1]],
        "time_ratio": round(lit["median_step_seconds"] / trl["median_step_seconds"], 3),
        "memory_ratio": round(lit["peak_rss_over_baseline_mb"] / trl["peak_rss_over_baseline_mb"], 3),
        "median_step_seconds": [round(lit["median_step_seconds"], 4), round(trl["median_step_seconds"], 4)],
        "peak_rss_over_baseline_mb": [lit["peak_rss_over_baseline_mb"], trl["peak_rss_over_baseline_mb"]],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="dpo_comparison_") as workdir:
        create_initial_adapter(args.model, Path(workdir) / "initial_adapter")
        for loss in args.losses:
            results = {}
            for system in ("lit-rlhf", "trl"):
                command = [sys.executable, __file__, "--worker", system, "--loss", loss, "--workdir", workdir,
                           "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                           "--beta", str(args.beta), "--lr", str(args.lr), *(["--precompute"] if args.precompute else [])]
                result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                if result.returncode != 0:
                    raise RuntimeError(f"{system} failed:\n{result.stderr[-3000:]}")
                results[system] = json.loads(result.stdout.strip().splitlines()[-1])
                print(json.dumps(results[system]), flush=True)
            print(json.dumps(compare(results["lit-rlhf"], results["trl"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
