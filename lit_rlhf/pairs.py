"""Prompt + completion data for the SFT and reward-model stages: reading rows, tokenizing them the way PPO
sees them, and batching rows of similar length together.

A completion is tokenized after its prompt and ends at its first stop token, exactly as a PPO rollout's
response does (the stop token included; PPO's default stop set: the tokenizer's EOS plus the checkpoint's
``generation_config`` EOS list). A chat template's turn ends with its end-of-turn token (ChatML's
``<|im_end|>``, Llama 3's ``<|eot_id|>``), and whatever the template adds after it is cut, as PPO stops there
too; a completion without any stop token gets the tokenizer's EOS. So a reward model trained here scores
PPO's rollouts at the position it was trained on, and an SFT policy learns to stop where PPO will.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from lit_rlhf.data import data_position
from lit_rlhf.errors import ConfigError


@dataclass
class Encoded:
    """One prompt + completion: token ids and which of them are the completion."""

    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def split_messages(messages: Any, where: str) -> tuple[list[dict], str]:
    """A chat's earlier turns and its final assistant answer (the completion)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ConfigError(f"{where}: expected a list of chat messages ({{role, content}}), got {str(messages)[:80]!r}")
    last = messages[-1]
    if last.get("role") != "assistant":
        raise ConfigError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
    return messages[:-1], str(last.get("content") or "")


def default_stop_token_ids(tokenizer: Any, model_name_or_path: str, trust_remote_code: bool = False) -> list[int]:
    """PPO's default stop set for a model: its tokenizer's EOS plus its ``generation_config`` EOS list."""
    from lit_rlhf.models import load_generation_config
    from lit_rlhf.rollout import stop_token_ids

    generation_config = load_generation_config(model_name_or_path, trust_remote_code)
    return stop_token_ids(tokenizer, None, getattr(generation_config, "eos_token_id", None))


def end_at_stop(completion_ids: Sequence[int], stop_ids: Sequence[int], eos_token_id: Optional[int]) -> list[int]:
    """``completion_ids`` up to and including the first of ``stop_ids`` (what PPO's response would hold), or
    with ``eos_token_id`` appended when none of them occurs."""
    stops = set(stop_ids)
    for position, token in enumerate(completion_ids):
        if token in stops:
            return list(completion_ids[: position + 1])
    return list(completion_ids) + ([eos_token_id] if eos_token_id is not None else [])


def encode(tokenizer: Any, prompt: Any, completion: str, chat: bool, stop_ids: Optional[Sequence[int]] = None) -> Encoded:
    """Tokenize ``prompt`` (text, or earlier chat turns when ``chat``) and ``completion`` after it, the completion
    ending at its first stop token (``stop_ids``, default the tokenizer's EOS; see :func:`end_at_stop`).

    The completion's ids are those of the whole text after the prompt's, so tokens that merge across the
    boundary are not split in two.
    """
    if chat:
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": completion}], tokenize=True,
                                             return_dict=False)
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(f"{prompt} {completion}")["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids:
        completion_ids = list(full[len(prompt_ids):])
    else:
        completion_ids = tokenizer(f" {completion}", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stops = list(stop_ids) if stop_ids is not None else ([eos] if eos is not None else [])
    return Encoded(list(prompt_ids), end_at_stop(completion_ids, stops, eos))


def fit_length(pair: Encoded, max_length: int, overlong: str) -> Optional[Encoded]:
    """``pair`` if it fits ``max_length`` tokens; else None (``drop``) or its completion cut (``truncate``)."""
    if len(pair) <= max_length:
        return pair
    if overlong == "drop":
        return None
    room = max_length - len(pair.prompt_ids)
    if room < 1:
        return None  # the prompt alone is too long: nothing to learn from
    return Encoded(pair.prompt_ids, pair.completion_ids[:room])


def right_pad(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of token lists padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


def padded_pairs(pairs: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (right padding) and ``completion_mask`` (each row's completion tokens)."""
    ids, mask = right_pad([pair.ids for pair in pairs], pad_token_id)
    completion = torch.zeros_like(mask)
    for row, pair in enumerate(pairs):
        completion[row, len(pair.prompt_ids) : len(pair)] = 1
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of rows of similar length, in a random order: little padding, no bias toward short rows.

    Each epoch shuffles the rows with a generator seeded by ``(seed, epoch)``, sorts windows of
    ``window_batches`` batches by length and cuts them into batches, then shuffles the batches. Under data
    parallelism each rank takes every ``num_replicas``-th batch. ``skip`` leaves out the first batches of the
    next pass (a run resumed mid-epoch); the length stays the epoch's, as Lightning counts it.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, window_batches: int = 50,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.window = batch_size * window_batches
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.epoch, self.skip = 0, 0
        self.sampler = _EpochOf(self)  # Lightning sets the epoch of ``batch_sampler.sampler``, not of this

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = (torch.randperm(len(self.lengths), generator=generator, device="cpu").tolist() if self.shuffle
                 else list(range(len(self.lengths))))
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=lambda i: self.lengths[i])
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator, device="cpu").tolist()]
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0  # for the first pass after a resume only
        return iter(self._batches()[skip:])

    def __len__(self) -> int:
        n, b = len(self.lengths), self.batch_size
        batches = sum(math.ceil(min(self.window, n - start) / b) for start in range(0, n, self.window))
        return batches // self.num_replicas


class _EpochOf:
    """Where Lightning looks for ``set_epoch`` at each epoch's start (a batch sampler's ``sampler``): passes the
    epoch on to the batch sampler, so each epoch gets its own batch order."""

    def __init__(self, batch_sampler: LengthGroupedSampler) -> None:
        self.batch_sampler = batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class PairsDataModule(L.LightningDataModule):
    """What the SFT and preference data modules share: the tokenizer, training and held-out pairs, checks.

    Subclasses save their own hyper-parameters (``batch_size``, ``max_length``, ``path``, ``split``,
    ``val_path``, ``val_split``, ``seed``, ``num_workers``, ``tokenizer``, ``trust_remote_code``), read rows
    in ``_pairs`` and batch them in ``collate``.
    """

    def _check_sizes(self) -> None:
        if self.hparams.batch_size < 1 or self.hparams.max_length < 2:
            raise ConfigError("data.batch_size must be >= 1 and data.max_length >= 2")
        self.train_pairs: list = []
        self.val_pairs: list = []
        self._resume_position: Optional[dict[str, int]] = None

    def state_dict(self) -> dict[str, int]:
        """The data position: the epoch and how many of its batches training has consumed."""
        return data_position(self.trainer)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self._resume_position = dict(state)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_pairs:
            return
        from lit_rlhf.models import load_tokenizer

        hp = self.hparams
        if hp.tokenizer is None:
            raise ConfigError("data.tokenizer is not set: give the model's model_name_or_path")
        tokenizer = load_tokenizer(hp.tokenizer, hp.trust_remote_code, "data.tokenizer (the model's model_name_or_path)")
        self.pad_token_id = tokenizer.pad_token_id
        self.stop_ids = default_stop_token_ids(tokenizer, hp.tokenizer, hp.trust_remote_code)  # PPO's default
        self.train_pairs = self._pairs(tokenizer, hp.path, hp.split)
        if len(self.train_pairs) < hp.batch_size:
            raise ConfigError(f"data.path={hp.path!r} has {len(self.train_pairs)} usable pairs, fewer than "
                              f"data.batch_size={hp.batch_size}")
        self.val_pairs = self._pairs(tokenizer, hp.val_path, hp.val_split or hp.split) if hp.val_path else []

    def _pairs(self, tokenizer: Any, path: str, split: str) -> list:
        raise NotImplementedError

    def collate(self, pairs: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _length(self, pair: Any) -> int:
        """Tokens of a pair, for grouping pairs of similar length into batches."""
        return len(pair)

    def _window_batches(self, shuffle: bool) -> int:
        """Batches per window sorted by length (1: no grouping)."""
        return 50

    def _loader(self, pairs: list, shuffle: bool) -> DataLoader:
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = LengthGroupedSampler([self._length(p) for p in pairs], self.hparams.batch_size, self.hparams.seed,
                                       window_batches=self._window_batches(shuffle), num_replicas=world_size,
                                       rank=rank, shuffle=shuffle)
        return DataLoader(pairs, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_pairs, shuffle=True)
        if self._resume_position is not None:  # continue with the next unused batch of the resumed epoch
            loader.batch_sampler.set_epoch(self._resume_position["epoch"])
            loader.batch_sampler.skip = self._resume_position["batches_consumed"]
            self._resume_position = None
        return loader

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.val_pairs, shuffle=False)] if self.val_pairs else []
