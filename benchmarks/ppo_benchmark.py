"""One PPO workload, five systems: lit-rlhf sampling with Hugging Face ``generate`` and with its vLLM engine,
TRL's PPOTrainer, and the two ceilings for rollouts, a bare ``model.generate`` loop and bare vLLM ``generate``.

    python benchmarks/ppo_benchmark.py                      # default workload, all systems, ratios
    python benchmarks/ppo_benchmark.py --systems lit-rlhf generate --iterations 3
    python benchmarks/ppo_benchmark.py --grid               # 256/4 and 768/6 Llamas x 4k and 32k vocabularies

Every system gets the same randomly initialized Llama-style policy, reward model, tokenizer, prompts and
settings (built once into a temporary folder), and runs in its own subprocess so that its peak memory is
its own. Each prints one JSON line: medians over the timed iterations (after warm-up) of the seconds per
PPO iteration, of its rollout and optimization phases, of the sampling alone (``generation_s``; lit-rlhf's
includes the vLLM engine's weight sync; the rollout adds scoring and the log-prob and value passes), of
the response tokens per rollout second and per sampling second, and the peak memory (resident set on CPU,
CUDA allocator peak on GPU). A last line gives the ratios lit-rlhf / TRL and lit-rlhf / bare generate
(rollout and sampling alone), and the same for lit-rlhf on vLLM against bare vLLM. The vLLM systems
(``lit-rlhf-vllm``, ``vllm``) need vLLM installed (see the README) and are left out when it is not.

TRL's peer is ``trl.experimental.ppo.PPOTrainer`` from ``trl==1.10.0`` (``pip install -e ".[bench]"``).
It trains a separate value model (its design; lit-rlhf puts the value head on the policy's backbone),
which is built from the reward model's checkpoint as in TRL's examples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEMS = ("lit-rlhf", "lit-rlhf-vllm", "trl", "generate", "vllm")
VLLM_SYSTEMS = ("lit-rlhf-vllm", "vllm")
# --grid: (hidden size, layers, heads, intermediate size) x vocabulary sizes
GRID_MODELS = ((256, 4, 4, 688), (768, 6, 12, 2048))
GRID_VOCABULARIES = (4096, 32000)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None,
                        help="default: all (the vLLM ones only when vLLM is installed)")
    parser.add_argument("--grid", action="store_true",
                        help="run the workload at every model size and vocabulary of the grid, then a summary table")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--num-minibatches", type=int, default=1)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="lit-rlhf: recompute activations in the backward pass (model.policy.gradient_checkpointing)")
    parser.add_argument("--warmup", type=int, default=2, help="iterations run before timing starts")
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations (medians are reported)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: bf16 mixed precision for training, bf16 weights for generate")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workdir", help="reuse (or keep) the built workload here")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# The workload: models, tokenizer and prompts, saved with save_pretrained like any checkpoint
def build_workload(args: argparse.Namespace, directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from lit_rlhf.tiny import SPECIAL_TOKENS, build_word_tokenizer

    spec = {k: getattr(args, k) for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                          "vocab_size", "batch_size", "prompt_tokens", "response_tokens",
                                          "warmup", "iterations")}
    if (directory / "workload.json").exists() and json.loads((directory / "workload.json").read_text()) == spec:
        return  # built by an earlier run with the same settings
    directory.mkdir(parents=True, exist_ok=True)
    words = list(SPECIAL_TOKENS) + [f"w{i}" for i in range(args.vocab_size - len(SPECIAL_TOKENS))]
    tokenizer = build_word_tokenizer(words=words)
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
        max_position_embeddings=max(512, args.prompt_tokens + args.response_tokens), pad_token_id=0,
        eos_token_id=1, bos_token_id=2, tie_word_embeddings=False, num_labels=1,
    )
    for name, model_class, seed in (("policy", LlamaForCausalLM, 0), ("reward", LlamaForSequenceClassification, 1)):
        torch.manual_seed(seed)
        model_class(config).save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
    generator = torch.Generator().manual_seed(2)
    num_prompts = args.batch_size * (args.warmup + args.iterations)
    ids = torch.randint(len(SPECIAL_TOKENS), args.vocab_size, (num_prompts, args.prompt_tokens), generator=generator)
    with open(directory / "prompts.jsonl", "w") as file:
        for row in ids.tolist():
            file.write(json.dumps({"prompt": " ".join(words[i] for i in row)}) + "\n")
    (directory / "workload.json").write_text(json.dumps(spec))


def read_prompts(directory: Path) -> list[str]:
    with open(directory / "prompts.jsonl") as file:
        return [json.loads(line)["prompt"] for line in file]


# ------------------------------------------------------------------------------------------------
# Measurements shared by the workers
def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def response_tokens(responses, eos_token_id: int) -> int:
    """Tokens up to and including the first EOS of each row of ``[batch, len]`` responses (what PPO trains on)."""
    from lit_rlhf.rollout import response_mask

    return int(response_mask(responses, eos_token_id).sum())


def summarize(system: str, args, iterations: list[dict], baseline_mb: float) -> dict:
    timed = iterations[args.warmup:]
    seconds = [it["seconds"] for it in timed]
    result = {
        "system": system,
        "s_per_iteration": round(statistics.median(seconds), 4),
        "rollout_s": round(statistics.median(it["rollout"] for it in timed), 4),
        "optimization_s": round(statistics.median(it["optimization"] for it in timed), 4),
        "response_tokens_per_s": round(statistics.median(it["tokens"] / it["rollout"] for it in timed), 1),
        "peak_memory_mb": round(peak_memory_mb(args.device), 1),
        "memory_kind": "cuda_max_allocated" if args.device == "cuda" else "peak_rss",
        "iterations_timed": len(timed),
    }
    if all("generation" in it for it in timed):  # the sampling alone (lit-rlhf: engine sync included)
        result["generation_s"] = round(statistics.median(it["generation"] for it in timed), 4)
        result["generation_tokens_per_s"] = round(
            statistics.median(it["tokens"] / it["generation"] for it in timed), 1)
    if system in ("generate", "vllm"):
        result["optimization_s"] = 0.0
    if args.device == "cpu":
        result["peak_rss_over_imports_mb"] = round(result["peak_memory_mb"] - baseline_mb, 1)
    return result


def set_up_torch(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# lit-rlhf: the package's own LightningModule and data module, through a Lightning Trainer
def run_lit_rlhf(args, directory: Path, engine: str = "hf") -> dict:
    import lightning as L

    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.models import PolicyConfig
    from lit_rlhf.module import OptimizerConfig, PPOConfig, PPOModule, RewardConfig
    from lit_rlhf.rollout import SamplingConfig

    baseline = current_rss_mb()
    set_up_torch(args)
    iterations: list[dict] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            iterations.append({
                "seconds": time.perf_counter() - self.start,
                "rollout": float(metrics["perf/rollout_sec"]),
                "generation": float(metrics["perf/generate_sec"]),
                "optimization": float(metrics["perf/train_sec"]),
                "tokens": int(pl_module.latest_rollout.mask.sum()),
            })

    module = PPOModule(
        policy=PolicyConfig(str(directory / "policy"), dtype="float32", lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                            gradient_checkpointing=args.gradient_checkpointing),
        reward=RewardConfig(model_name_or_path=str(directory / "reward")),
        generation=SamplingConfig(max_new_tokens=args.response_tokens, temperature=1.0, engine=engine),
        ppo=PPOConfig(ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches),
        optimizer=OptimizerConfig(lr=1e-5, scheduler="constant"),
    )
    data = PromptDataModule(
        str(directory / "prompts.jsonl"), tokenizer=str(directory / "policy"), batch_size=args.batch_size,
        max_prompt_length=args.prompt_tokens + 8, shuffle=False,
    )
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.dtype == "bfloat16" else "32-true",
        max_epochs=1, limit_train_batches=args.warmup + args.iterations, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(directory / "lit_rlhf_run"),
        callbacks=[Timer()],
    )
    trainer.fit(module, data)
    return summarize("lit-rlhf" if engine == "hf" else f"lit-rlhf-{engine}", args, iterations, baseline)


# ------------------------------------------------------------------------------------------------
# TRL: trl.experimental.ppo.PPOTrainer with a LoRA policy (reference = adapter disabled)
def run_trl(args, directory: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from lit_rlhf.models import DEFAULT_LORA_TARGETS

    baseline = current_rss_mb()
    set_up_torch(args)
    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(directory / "policy", dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(directory / "reward", dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(directory / "reward", dtype=torch.float32)
    prompts = read_prompts(directory)
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    config = PPOConfig(
        output_dir=str(directory / "trl_run"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_ppo_epochs=args.ppo_epochs, num_mini_batches=args.num_minibatches,
        response_length=args.response_tokens, temperature=1.0, total_episodes=len(prompts), learning_rate=1e-5,
        local_rollout_forward_batch_size=args.batch_size, stop_token="eos", num_sample_generations=0,
        report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0,
        use_cpu=args.device == "cpu", bf16=dtype == torch.bfloat16, kl_coef=0.05, lr_scheduler_type="constant",
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=DEFAULT_LORA_TARGETS["llama"], task_type="CAUSAL_LM")
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
        value_model=value, train_dataset=dataset, eval_dataset=dataset.select(range(args.batch_size)),
        peft_config=lora,
    )

    iterations: list[dict] = []
    marks = {"start": None, "optimization": None, "tokens": 0}
    accumulate = trainer.accelerator.accumulate

    def timed_accumulate(*models):  # the first accumulate() of an iteration starts its optimization phase
        if marks["optimization"] is None:
            marks["optimization"] = time.perf_counter()
        return accumulate(*models)

    trainer.accelerator.accumulate = timed_accumulate
    batch_generation = trl_ppo.batch_generation

    def counted_batch_generation(model, queries, *rest, **kwargs):
        query_responses, logits = batch_generation(model, queries, *rest, **kwargs)
        marks["tokens"] += response_tokens(query_responses[:, queries.shape[1]:], tokenizer.eos_token_id)
        return query_responses, logits

    trl_ppo.batch_generation = counted_batch_generation

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            iterations.append({
                "seconds": now - marks["start"], "rollout": marks["optimization"] - marks["start"],
                "optimization": now - marks["optimization"], "tokens": marks["tokens"],
            })
            marks.update(start=now, optimization=None, tokens=0)

    trainer.add_callback(Timer())
    trainer.train()
    return summarize("trl", args, iterations, baseline)


# ------------------------------------------------------------------------------------------------
# The ceiling: model.generate on the same policy (no adapter), batch and sampling settings
def run_generate(args, directory: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    baseline = current_rss_mb()
    set_up_torch(args)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    model = AutoModelForCausalLM.from_pretrained(directory / "policy", dtype=dtype).to(device).eval()
    generation_config = GenerationConfig(
        do_sample=True, max_new_tokens=args.response_tokens, temperature=1.0, top_k=0, top_p=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    prompts = read_prompts(directory)
    iterations = []
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer(prompts[start:start + args.batch_size], return_tensors="pt", padding=True).to(device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.inference_mode():
            sequences = model.generate(**batch, generation_config=generation_config)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        tokens = response_tokens(sequences[:, batch["input_ids"].shape[1]:], tokenizer.eos_token_id)
        iterations.append({"seconds": seconds, "rollout": seconds, "generation": seconds, "optimization": 0.0,
                           "tokens": tokens})
    return summarize("generate", args, iterations, baseline)


# ------------------------------------------------------------------------------------------------
# The vLLM ceiling: the same engine lit-rlhf drives, generating from the same prompts with the same settings
def run_vllm(args, directory: Path) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM, SamplingParams

    from lit_rlhf.engines import kv_cache_bytes

    baseline = current_rss_mb()
    set_up_torch(args)
    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    context = args.prompt_tokens + 8 + args.response_tokens
    cache = (kv_cache_bytes(AutoConfig.from_pretrained(directory / "policy"), args.batch_size, context,
                            getattr(torch, args.dtype)) if args.device == "cpu" else None)
    llm = LLM(model=str(directory / "policy"), dtype=args.dtype, seed=0, max_model_len=context,
              enforce_eager=args.device == "cpu", enable_prefix_caching=False, kv_cache_memory_bytes=cache,
              gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=1.0, top_k=-1, top_p=1.0, max_tokens=args.response_tokens,
                            stop_token_ids=[tokenizer.eos_token_id], ignore_eos=True, detokenize=False)
    prompts = read_prompts(directory)
    iterations = []
    for start in range(0, len(prompts), args.batch_size):
        batch = [{"prompt_token_ids": tokenizer(p)["input_ids"]} for p in prompts[start:start + args.batch_size]]
        began = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - began
        tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
        iterations.append({"seconds": seconds, "rollout": seconds, "generation": seconds, "optimization": 0.0,
                           "tokens": tokens})
    return summarize("vllm", args, iterations, baseline)


WORKERS = {
    "lit-rlhf": run_lit_rlhf,
    "lit-rlhf-vllm": lambda args, directory: run_lit_rlhf(args, directory, engine="vllm"),
    "trl": run_trl,
    "generate": run_generate,
    "vllm": run_vllm,
}


def ratios(results: dict[str, dict]) -> dict:
    """lit-rlhf (each engine) against TRL's PPO, and its rollouts against the bare engine it samples with."""
    out = {}
    trl = results.get("trl")
    for ours_name, ceiling_name in (("lit-rlhf", "generate"), ("lit-rlhf-vllm", "vllm")):
        ours, ceiling, key = results.get(ours_name), results.get(ceiling_name), ours_name.replace("-", "_")
        if ours and trl:
            out[f"time_{key}_over_trl"] = round(ours["s_per_iteration"] / trl["s_per_iteration"], 3)
            out[f"memory_{key}_over_trl"] = round(ours["peak_memory_mb"] / trl["peak_memory_mb"], 3)
            if "peak_rss_over_imports_mb" in ours:
                out[f"memory_over_imports_{key}_over_trl"] = round(
                    ours["peak_rss_over_imports_mb"] / trl["peak_rss_over_imports_mb"], 3)
        if ours and ceiling:
            out[f"rollout_tokens_per_s_{key}_over_{ceiling_name}"] = round(
                ours["response_tokens_per_s"] / ceiling["response_tokens_per_s"], 3)
            out[f"generation_tokens_per_s_{key}_over_{ceiling_name}"] = round(
                ours["generation_tokens_per_s"] / ceiling["generation_tokens_per_s"], 3)
    if results.get("lit-rlhf") and results.get("lit-rlhf-vllm"):
        out["rollout_tokens_per_s_vllm_engine_over_hf_engine"] = round(
            results["lit-rlhf-vllm"]["response_tokens_per_s"] / results["lit-rlhf"]["response_tokens_per_s"], 3)
    return out


def run_workload(args: argparse.Namespace, argv: list[str]) -> tuple[dict, dict]:
    """Every system on one workload, each in its own process; prints and returns the results and ratios."""
    keep = args.workdir is not None
    directory = Path(args.workdir or tempfile.mkdtemp(prefix="lit_rlhf_bench_"))
    build_workload(args, directory)
    workload = {k: v for k, v in vars(args).items() if k not in ("systems", "worker", "workdir", "grid")}
    print(json.dumps({"workload": workload}), flush=True)
    results: dict[str, dict] = {}
    for system in args.systems:
        command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", system, "--workdir", str(directory)]
        env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("BENCHMARK_RESULT ")]
        if completed.returncode != 0 or not lines:
            print(json.dumps({"system": system, "error": completed.stderr[-3000:]}), flush=True)
            raise SystemExit(1)
        results[system] = json.loads(lines[-1][len("BENCHMARK_RESULT "):])
        print(json.dumps(results[system]), flush=True)
    out = ratios(results)
    print(json.dumps({"ratios": out}), flush=True)
    if not keep:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    return results, out


def grid_argv(argv: list[str], hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> list[str]:
    """``argv`` without ``--grid``, ``--workdir`` and the model-shape options, plus one grid point's shape."""
    shape_options = {"--hidden-size", "--num-layers", "--num-heads", "--intermediate-size", "--vocab-size", "--workdir"}
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in shape_options:
            skip = True
        elif item != "--grid" and item.split("=")[0] not in shape_options:
            kept.append(item)
    return [*kept, "--hidden-size", str(hidden), "--num-layers", str(layers), "--num-heads", str(heads),
            "--intermediate-size", str(intermediate), "--vocab-size", str(vocab)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cpu":  # DeepSpeed, if installed, would print a GPU warning into our JSON output
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.worker:
        result = WORKERS[args.worker](args, Path(args.workdir))
        print("BENCHMARK_RESULT " + json.dumps(result), flush=True)
        return 0
    if args.systems is None:
        import importlib.util

        has_vllm = importlib.util.find_spec("vllm") is not None
        args.systems = [s for s in SYSTEMS if has_vllm or s not in VLLM_SYSTEMS]
        argv += ["--systems", *args.systems]
    if not args.grid:
        run_workload(args, argv)
        return 0
    rows = []
    for hidden, layers, heads, intermediate in GRID_MODELS:
        for vocab in GRID_VOCABULARIES:
            point = grid_argv(argv, hidden, layers, heads, intermediate, vocab)
            _, out = run_workload(parse_args(point), point)
            rows.append((f"{hidden}/{layers}", vocab, out))
    names = sorted({name for _, _, out in rows for name in out})
    print("| model | vocab | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for model, vocab, out in rows:
        print(f"| {model} | {vocab} | " + " | ".join(str(out.get(name, "")) for name in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
