"""Shared fixtures: everything offline, tiny checkpoints built into temporary folders."""

import importlib.util
import os
import warnings

import pytest

# One torch thread per test process: the suite runs in two worker processes (pytest-xdist, see pyproject), and
# two processes each spinning as many OpenMP threads as there are cores slow each other down many times. The
# runs the tests launch (lit-rlhf fit) inherit it; the tests of the thread choice set it themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_PROMPTS = os.path.join(REPO_ROOT, "recipes", "data", "sentiment_prompts.jsonl")
# vLLM tests run where vLLM is installed; CI (LIT_RLHF_REQUIRE_VLLM=1) installs it and fails without it
HAS_VLLM = importlib.util.find_spec("vllm") is not None
RUN_VLLM = HAS_VLLM or os.environ.get("LIT_RLHF_REQUIRE_VLLM") == "1"


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """Built-in ``builtin:tiny-*`` checkpoints go to a fresh temporary folder for the test session."""
    path = tmp_path_factory.mktemp("lit_rlhf_cache")
    os.environ["LIT_RLHF_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama causal LM + word tokenizer saved with ``save_pretrained``."""
    from lit_rlhf.tiny import save_tiny_checkpoint

    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), arch="llama"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """A tiny random one-label Llama sequence classifier with the same tokenizer."""
    from lit_rlhf.tiny import save_tiny_checkpoint

    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_cls"), arch="llama", classifier=True, seed=1))


@pytest.fixture
def prompts_file(tmp_path):
    """Write prompts to a jsonl file and return its path."""

    def write(prompts, field="prompt"):
        import json

        path = tmp_path / "prompts.jsonl"
        path.write_text("".join(json.dumps({field: p}) + "\n" for p in prompts))
        return str(path)

    return write
