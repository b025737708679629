"""Prompt data: local jsonl/json/parquet/csv files or a ``datasets`` name, tokenized and left-padded."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lit_rlhf.errors import ConfigError
from lit_rlhf.models import load_tokenizer

# val_dataloader returns no loader when there is no data.val_path: not a mistake
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_table(path: str, split: str) -> dict[str, list]:
    """The columns of a local .jsonl/.json/.parquet/.csv file, a ``save_to_disk`` folder or a hub data set,
    with errors that name the file (and the line of a malformed .jsonl).

    A .jsonl file is read with the standard library (rows become columns, a missing key is ``None``): the
    ``datasets`` import alone costs ~80 MB of resident memory and half a second, for what a loop does.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension in _FILE_FORMATS:
        if not os.path.isfile(path):
            raise ConfigError(f"data.path={path!r} does not exist (relative paths start at {os.getcwd()!r})")
        if not open(path, "rb").read(4096).strip():
            raise ConfigError(f"data.path={path!r} is empty: it holds no rows")
        if extension == ".jsonl":
            return _read_jsonl(path)
    import datasets

    try:
        if extension in _FILE_FORMATS:
            dataset = datasets.load_dataset(_FILE_FORMATS[extension], data_files=path, split="train")
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
            dataset = datasets.load_from_disk(path)
        else:
            dataset = datasets.load_dataset(path, split=split)
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types for unreachable or malformed sources
        cause = str(err.__cause__ or err) or type(err).__name__
        raise ConfigError(
            f"Could not load data.path={path!r} (split {split!r}): give a .jsonl/.json/.parquet/.csv "
            f"file, a folder saved with save_to_disk, or a dataset name reachable from this machine. Cause: {cause}"
        ) from err
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ConfigError(f"data.split={split!r} is not in {path!r}; it has {list(dataset)}")
        dataset = dataset[split]
    if len(dataset) == 0:
        raise ConfigError(f"data.path={path!r} holds no rows: the data set is empty")
    return {name: list(dataset[name]) for name in dataset.column_names}


def require_column(table: dict[str, list], field: str, path: str, kind: type = str) -> list:
    """The values of column ``field`` (given by the recipe field ``data.<name>``), each of type ``kind``."""
    if field not in table:
        raise ConfigError(f"{field!r} is not a column of data.path={path!r}; its columns are {sorted(table)}")
    values = table[field]
    for row, value in enumerate(values, start=1):
        if not isinstance(value, kind):
            what = "has no value" if value is None else f"is {type(value).__name__} {str(value)[:40]!r}, not {kind.__name__}"
            raise ConfigError(f"data.path={path!r}, row {row}: column {field!r} {what}; fix or remove that row")
    return values


def load_prompts(path: str, prompt_field: str, split: str) -> tuple[list[str], dict[str, list]]:
    """Read the ``prompt_field`` column of a local file, a saved dataset folder or a hub dataset, and the
    other columns (e.g. the answers a verifiable reward checks against).

    Every prompt must be text: a missing, null or numeric value is an error naming its row, never a
    prompt "None" or "42".
    """
    table = load_table(path, split)
    if prompt_field not in table:
        raise ConfigError(
            f"data.prompt_field={prompt_field!r} is not a column of {path!r}; its columns are {sorted(table)}"
        )
    for row, prompt in enumerate(table[prompt_field], start=1):
        if not isinstance(prompt, str):
            what = "has no value" if prompt is None else f"is {type(prompt).__name__} {prompt!r}, not text"
            raise ConfigError(
                f"data.path={path!r}, row {row}: data.prompt_field={prompt_field!r} {what}; fix or remove that row"
            )
    prompts = table.pop(prompt_field)
    return prompts, table


def _read_jsonl(path: str) -> dict[str, list]:
    """The columns of a .jsonl file (one JSON object per line; blank lines skipped), naming the first line that
    is not one JSON object."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.path={path!r}, line {number}: not valid JSON ({err.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(value, dict):
                raise ConfigError(f"data.path={path!r}, line {number}: expected a JSON object, got {line.strip()[:80]!r}")
            rows.append(value)
    if not rows:
        raise ConfigError(f"data.path={path!r} is empty: it holds no rows")
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(input_ids, attention_mask)``, padded on the left."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        if tokens:
            input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
            attention_mask[row, width - len(tokens) :] = 1
    return input_ids, attention_mask


class ResumableSampler(DistributedSampler):
    """Shuffles (or not) with a generator seeded by ``(seed, epoch)``, shards it across ranks, and can
    skip the prompts a resumed run has already used.

    Its order depends on nothing but the seed and the epoch, so a run resumed mid-epoch continues with
    exactly the prompts the uninterrupted run would have seen. Being a ``DistributedSampler``, it is not
    wrapped again by Lightning under DDP: rank r takes every ``num_replicas``-th prompt from r on.
    """

    def __init__(self, num_items: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.num_items, self.shuffle, self.seed = num_items, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = num_items // num_replicas  # per rank; the few left over are dropped each epoch
        self.epoch, self.skip = 0, 0

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator, device="cpu").tolist()
        else:
            order = list(range(self.num_items))
        shard = order[self.rank : self.num_samples * self.num_replicas : self.num_replicas]
        skip, self.skip = self.skip, 0  # skipping applies to the first pass after a resume only
        return iter(shard[skip:])

    def __len__(self) -> int:
        return self.num_samples  # the whole epoch, as Lightning counts it, also when resuming mid-epoch


def data_position(trainer: Optional[L.Trainer]) -> dict[str, int]:
    """Where training is in the data, for a data module's ``state_dict``: the epoch and how many of its batches
    have been consumed (this rank's), so a resumed run continues with the next unused batch."""
    if trainer is None:
        return {}
    epoch = trainer.fit_loop.epoch_progress.current.started - 1  # the epoch in progress or just ended
    consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if consumed >= trainer.num_training_batches:  # epoch done: the next one starts from its beginning
        return {"epoch": epoch + 1, "batches_consumed": 0}
    return {"epoch": epoch, "batches_consumed": consumed}


class PromptDataModule(L.LightningDataModule):
    """Batches of tokenized, left-padded prompts; one batch is one PPO iteration's rollout."""

    # what decides which prompts a resumed run sees next and how they are encoded: a resume refuses changes
    FIELDS_THAT_MUST_MATCH = ("path", "prompt_field", "split", "batch_size", "max_prompt_length", "truncate_prompts",
                              "apply_chat_template", "shuffle", "seed")

    def __init__(
        self,
        path: str,
        prompt_field: str = "prompt",
        split: str = "train",
        batch_size: int = 16,
        max_prompt_length: int = 128,
        truncate_prompts: bool = False,
        apply_chat_template: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        val_path: Optional[str] = None,
        val_split: Optional[str] = None,
        val_batch_size: Optional[int] = None,
        tokenizer: Optional[str] = None,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            path: A .jsonl/.json/.parquet/.csv file, a folder saved with ``save_to_disk``, or a dataset name.
            prompt_field: Column that holds the prompt text.
            split: Split to read from a dataset with several.
            batch_size: Prompts per PPO iteration (per device).
            max_prompt_length: Longest prompt in tokens; longer prompts are an error unless truncated.
            truncate_prompts: Shorten longer prompts instead of failing: their text loses its first tokens (the
                chat template and special tokens stay whole), and the reward sees the shortened text too.
            apply_chat_template: Wrap each prompt as a user turn with the tokenizer's chat template.
            shuffle: Shuffle prompts each epoch.
            seed: Seed of the shuffling (each epoch's order depends only on it and the epoch).
            num_workers: DataLoader worker processes.
            val_path: Held-out prompts (same formats and fields) for evaluation during training: Lightning's
                validation loop runs on them every ``trainer.check_val_every_n_epoch`` epochs (or
                ``val_check_interval`` iterations) and logs ``eval/`` metrics.
            val_split: Split of ``val_path`` (default: ``split``).
            val_batch_size: Prompts per evaluation batch (default: ``batch_size``).
            tokenizer: Tokenizer to use; the CLI sets it to the policy's ``model_name_or_path``.
            trust_remote_code: Allow the tokenizer's own code to run.
        """
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {batch_size}")
        if max_prompt_length < 1:
            raise ConfigError(f"data.max_prompt_length must be at least 1, got {max_prompt_length}")
        self.save_hyperparameters()
        self.examples: list[dict[str, Any]] = []
        self.sampler: Optional[ResumableSampler] = None
        self._resume_position: Optional[dict[str, int]] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.examples:
            return
        hp = self.hparams
        if hp.tokenizer is None:
            raise ConfigError("data.tokenizer is not set: give the policy's model_name_or_path")
        tokenizer = load_tokenizer(hp.tokenizer, hp.trust_remote_code, "data.tokenizer (the model's model_name_or_path)")
        self.pad_token_id = tokenizer.pad_token_id
        self.examples = self._examples(tokenizer, hp.path)
        if len(self.examples) < hp.batch_size:
            raise ConfigError(
                f"data.path={hp.path!r} has {len(self.examples)} prompts, fewer than data.batch_size={hp.batch_size}: "
                "lower the batch size or add prompts"
            )
        self.val_examples = self._examples(tokenizer, hp.val_path, hp.val_split) if hp.val_path else []

    def _examples(self, tokenizer, path: str, split: Optional[str] = None) -> list[dict[str, Any]]:
        """The prompts of ``path``, tokenized (shortened if allowed), with their other columns."""
        hp = self.hparams
        prompts, columns = load_prompts(path, hp.prompt_field, split or hp.split)
        if hp.apply_chat_template and tokenizer.chat_template is None:
            raise ConfigError(f"data.apply_chat_template is set but the tokenizer of {hp.tokenizer!r} has no chat template")
        examples, truncated = [], 0
        for row, prompt in enumerate(prompts):
            ids = self._encode(tokenizer, prompt)
            if len(ids) > hp.max_prompt_length:
                if not hp.truncate_prompts:
                    raise ConfigError(
                        f"A prompt has {len(ids)} tokens, more than data.max_prompt_length={hp.max_prompt_length}: "
                        f"raise max_prompt_length or set data.truncate_prompts=true. Prompt: {prompt[:80]!r}"
                    )
                prompt, ids = self._truncate(tokenizer, prompt, len(ids))
                truncated += 1
            if not ids:
                raise ConfigError(f"A prompt tokenizes to no tokens: {prompt!r}; remove empty prompts from the data")
            examples.append({"prompt": prompt, "input_ids": ids, "columns": {k: v[row] for k, v in columns.items()}})
        if truncated:
            rank_zero_warn(
                f"{truncated} of {len(prompts)} prompts of {path!r} were longer than data.max_prompt_length="
                f"{hp.max_prompt_length} tokens and were cut to their last tokens (data.truncate_prompts)"
            )
        return examples

    def _encode(self, tokenizer, prompt: str) -> list[int]:
        """The token ids the policy sees for ``prompt``: as a chat user turn or as plain text."""
        if self.hparams.apply_chat_template:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        return tokenizer(prompt)["input_ids"]

    def _truncate(self, tokenizer, prompt: str, length: int) -> tuple[str, list[int]]:
        """Cut the start of ``prompt``'s text (never the chat template or special tokens) until it fits.

        Returns the shortened text, which the reward also sees, and its token ids.
        """
        limit = self.hparams.max_prompt_length
        content = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = len(content) - (length - limit)
        while keep > 0:
            text = tokenizer.decode(content[-keep:], skip_special_tokens=True).strip()
            ids = self._encode(tokenizer, text)
            if len(ids) <= limit:
                return text, ids
            keep -= len(ids) - limit  # decoding and re-encoding can merge or split tokens at the cut
        raise ConfigError(
            f"data.max_prompt_length={limit} leaves no room for the prompt text once the chat template and special "
            "tokens are added: raise max_prompt_length"
        )

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = left_pad([e["input_ids"] for e in examples], self.pad_token_id)
        columns = {k: [e["columns"][k] for e in examples] for k in examples[0]["columns"]}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "prompts": [e["prompt"] for e in examples],
                "columns": columns}

    def random_batch(self, count: int, seed: int) -> dict[str, Any]:
        """``count`` training prompts drawn at random by a generator seeded with ``seed`` (dynamic sampling's
        replacements: the same seed draws the same prompts, also in a resumed run)."""
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + seed)
        rows = torch.randint(len(self.examples), (count,), generator=generator, device="cpu").tolist()
        return self.collate([self.examples[i] for i in rows])

    def val_dataloader(self) -> list[DataLoader]:
        """Held-out prompts (``val_path``) for evaluation during training; none without it."""
        if not getattr(self, "val_examples", None):
            return []
        hp = self.hparams
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(self.val_examples, world_size, rank, shuffle=False, drop_last=False)
        return DataLoader(self.val_examples, batch_size=hp.val_batch_size or hp.batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=hp.num_workers)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if len(self.examples) < hp.batch_size * world_size:
            raise ConfigError(
                f"data.path={hp.path!r} has {len(self.examples)} prompts, fewer than data.batch_size={hp.batch_size} "
                f"x {world_size} devices: lower the batch size or add prompts"
            )
        self.sampler = ResumableSampler(len(self.examples), hp.shuffle, hp.seed, world_size, rank)
        if self._resume_position is not None:
            self.sampler.set_epoch(self._resume_position["epoch"])
            self.sampler.skip = self._resume_position["batches_consumed"] * hp.batch_size
            self._resume_position = None
        return DataLoader(
            self.examples, batch_size=hp.batch_size, sampler=self.sampler, drop_last=True, collate_fn=self.collate,
            num_workers=hp.num_workers, generator=torch.Generator().manual_seed(hp.seed),
        )

    def state_dict(self) -> dict[str, int]:
        """The data position: the epoch and how many of its batches training has consumed."""
        return data_position(self.trainer)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self._resume_position = dict(state)
