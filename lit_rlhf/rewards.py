"""Rewards: built-in reward functions, and the set of weighted reward sources a run scores with.

A reward source is a Python function ``(prompts, completions, **columns) -> list[float]``, a
sequence-classification model, or an HTTP scorer. ``RewardSet`` scores a rollout with each of them and
returns the weighted sum plus each source's own scores (logged as ``reward/<name>``).

A function receives, besides the prompts and completions, the data set's other columns it asks for by name
(e.g. ``answer``), one value per completion, and the ``kwargs`` its recipe entry gives.
"""

from __future__ import annotations

import http.client
import inspect
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lit_rlhf.errors import ConfigError, TrainingError

POSITIVE_WORDS = (
    "good great excellent wonderful amazing lovely happy delightful brilliant superb fantastic "
    "pleasant charming beautiful joyful perfect enjoyable awesome fine nice love best warm "
    "fun bright glad kind sweet calm cheerful"
).split()
NEGATIVE_WORDS = (
    "bad terrible awful horrible poor sad boring ugly dreadful annoying dull worst hate nasty "
    "painful bitter angry disappointing mediocre weak cold gloomy rude broken messy sour "
    "tedious lousy grim noisy"
).split()

_POSITIVE, _NEGATIVE = frozenset(POSITIVE_WORDS), frozenset(NEGATIVE_WORDS)


# ------------------------------------------------------------------------------------------------
# Built-in reward functions
def sentiment_lexicon(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Share of positive minus share of negative words in each completion, in [-1, 1].

    A meaningful, deterministic stand-in for a sentiment classifier: the quickstart policy has to learn
    to write positive words instead of neutral or negative ones. Empty completions score 0.
    """
    scores = []
    for completion in completions:
        words = completion.lower().split()
        positive = sum(word in _POSITIVE for word in words)
        negative = sum(word in _NEGATIVE for word in words)
        scores.append((positive - negative) / max(len(words), 1))
    return scores


def _answers(answer: Any) -> list[str]:
    """The accepted answers of a data row: a list, or a string with ``|`` between alternatives."""
    if isinstance(answer, (list, tuple)):
        return [str(a).strip().lower() for a in answer]
    return [a.strip().lower() for a in str(answer).split("|")]


def first_word_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
    """1.0 when a completion's first word is one of its row's ``answer`` (a list, or ``a|b|c``), else 0.0.

    A verifiable reward for short-answer tasks (the GRPO quickstart's word categories).
    """
    scores = []
    for completion, accepted in zip(completions, answer):
        words = completion.lower().split()
        scores.append(float(bool(words) and words[0] in _answers(accepted)))
    return scores


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
    """1.0 when the last number in a completion equals its row's ``answer`` (``"7 + 5 = 12"`` answers 12), else
    0.0: a verifiable reward for arithmetic that needs no extra package. Thousands separators are ignored."""
    scores = []
    for completion, expected in zip(completions, answer):
        numbers = _NUMBER.findall(completion)
        try:
            scores.append(float(bool(numbers) and float(numbers[-1].replace(",", "")) == float(expected)))
        except ValueError:
            scores.append(0.0)
    return scores


def math_answer(
    prompts: Sequence[str], completions: Sequence[str], answer: Optional[Sequence[Any]] = None,
    solution: Optional[Sequence[Any]] = None,
) -> list[float]:
    """1.0 when a completion's final answer equals its row's ``answer`` (or the answer of its ``solution``,
    e.g. MATH's ``\\boxed{..}``) mathematically, else 0.0.

    Uses ``math-verify`` (``pip install "lit-rlhf[math]"``): it extracts the answer (``\\boxed{..}``,
    LaTeX or plain numbers) and compares values, so ``0.5``, ``1/2`` and ``\\frac{1}{2}`` all match.
    """
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ConfigError("lit_rlhf.rewards:math_answer needs math-verify: pip install 'lit-rlhf[math]'") from err
    references = answer if answer is not None else solution
    if references is None:
        raise ConfigError("lit_rlhf.rewards:math_answer needs an 'answer' or 'solution' column in the data")
    scores = []
    for completion, gold in zip(completions, references):
        expected = parse(str(gold))
        scores.append(float(bool(expected) and verify(expected, parse(completion))))
    return scores


def format_match(prompts: Sequence[str], completions: Sequence[str], pattern: str = r"\S") -> list[float]:
    """1.0 when a completion matches the regular expression ``pattern`` in full, else 0.0 (a format reward,
    e.g. ``pattern: "<think>.*</think>.*"``; give it with the entry's ``kwargs``)."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(completion.strip()) is not None) for completion in completions]


# ------------------------------------------------------------------------------------------------
# Reward sources
@dataclass
class RewardTerm:
    """One weighted reward source of ``model.reward.functions``: exactly one of ``function``,
    ``model_name_or_path`` and ``url``."""

    function: Optional[str] = None
    """``package.module:function`` taking ``(prompts, completions, **columns)``, returning one score each."""
    model_name_or_path: Optional[str] = None
    """A sequence-classification reward model (options under ``model.reward``: dtype, quantization, ...)."""
    url: Optional[str] = None
    """An HTTP scorer: POST ``{"prompts": [...], "completions": [...], <columns>}``, answers ``{"scores": [...]}``."""
    weight: float = 1.0
    """Weight of this source in the total score."""
    name: Optional[str] = None
    """Logged as ``reward/<name>``; by default the function's or model's name."""
    kwargs: Optional[dict[str, Any]] = None
    """Extra keyword arguments of a function (e.g. ``pattern`` of ``lit_rlhf.rewards:format_match``)."""

    def source(self) -> str:
        given = [value for value in (self.function, self.model_name_or_path, self.url) if value]
        if len(given) != 1:
            raise ConfigError(
                f"reward term {self}: set exactly one of function, model_name_or_path and url"
            )
        return given[0]

    def label(self) -> str:
        if self.name:
            return self.name
        source = self.source()
        return source.rsplit(":", 1)[-1] if self.function else source.rstrip("/").rsplit("/", 1)[-1]


def import_reward_function(spec: str) -> Callable[..., Sequence[float]]:
    """Import ``package.module:function`` and check it is callable."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward.function={spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"reward.function={spec!r}: cannot import module {module_name!r} ({err}). Make sure it is "
            "installed or on PYTHONPATH."
        ) from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward.function={spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


class FunctionReward:
    """A Python reward function, given the data columns it names among its parameters."""

    def __init__(self, spec: str, kwargs: Optional[dict[str, Any]] = None) -> None:
        self.spec, self.fn, self.kwargs = spec, import_reward_function(spec), dict(kwargs or {})
        parameters = inspect.signature(self.fn).parameters.values()
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self.names = {p.name for p in parameters} - {"prompts", "completions"}

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list], **_: Any) -> Any:
        given = {k: v for k, v in columns.items() if self.takes_all or k in self.names}
        missing = {p for p in self.names if p not in given and p not in self.kwargs} - self._optional()
        if missing:
            raise ConfigError(
                f"reward.function={self.spec!r} needs the data columns {sorted(missing)}; the data has "
                f"{sorted(columns)}"
            )
        return self.fn(prompts, completions, **given, **self.kwargs)

    def _optional(self) -> set[str]:
        return {name for name, p in inspect.signature(self.fn).parameters.items()
                if p.default is not inspect.Parameter.empty or p.kind is inspect.Parameter.VAR_KEYWORD}


class HTTPReward:
    """Scores from an HTTP server: POST JSON ``{"prompts", "completions", <columns>}``, JSON scores back
    (a list, or ``{"scores": [...]}``), with a timeout and retries."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.url={url!r} must start with http:// or https://")
        self.url, self.timeout, self.retries = url, timeout, retries

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list], **_: Any) -> Any:
        body = {"prompts": prompts, "completions": completions, **columns}
        return post_json(self.url, body, self.timeout, self.retries, "reward.url", "reward.timeout",
                         "that the scorer runs and answers {\"scores\": [...]} to a POST of prompts and completions",
                         lambda answer: answer["scores"] if isinstance(answer, dict) else answer, "scorer")



def post_json(url: str, body: Any, timeout: float, retries: int, field: str, timeout_field: str, expected: str,
              read: Callable[[Any], Any] = lambda answer: answer, server: str = "server") -> Any:
    """POST ``body`` as JSON to ``url`` and return ``read`` of the JSON answer, with ``retries`` more tries after a
    failure (waiting 1, 2, 4... s). After the last one a :class:`TrainingError` names ``field``, what went wrong
    and what the server should do (``expected``)."""
    data = json.dumps(body).encode()
    failure = "no attempt"
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read().decode("utf-8"))
            return read(answer)
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as err:  # network, HTTP, decoding
            failure = _what_went_wrong(err, timeout, timeout_field, server)
            if attempt < retries:
                time.sleep(min(2.0**attempt, 10.0))
    raise TrainingError(f"{field}={url!r}: no valid answer after {retries + 1} tries; the last one: {failure}. "
                        f"Check {expected}")


def _what_went_wrong(err: BaseException, timeout: float, timeout_field: str, server: str) -> str:
    """One phrase for a failed request: refused, timed out, cut off, an HTTP error status, or a bad answer."""
    reason = getattr(err, "reason", None) if isinstance(err, urllib.error.URLError) else None
    if isinstance(err, urllib.error.HTTPError):
        return f"the {server} answered HTTP {err.code} {err.reason}"
    if isinstance(reason, ConnectionRefusedError) or isinstance(err, ConnectionRefusedError):
        return f"the connection was refused (is the {server} running at that address?)"
    if isinstance(reason, (TimeoutError, socket.timeout)) or isinstance(err, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_field}={timeout} s"
    if isinstance(err, http.client.IncompleteRead):
        return f"the connection closed in the middle of the answer ({len(err.partial)} bytes received)"
    if isinstance(err, (http.client.HTTPException, ConnectionError)):
        return f"the connection dropped ({type(err).__name__}: {err})"
    if isinstance(err, UnicodeDecodeError):
        return f"the answer is not valid UTF-8 ({err.reason} at byte {err.start})"
    if isinstance(err, json.JSONDecodeError):
        return f"the answer is not JSON ({err.msg})"
    if isinstance(err, KeyError):
        return f"the answer is a JSON object without {err}"
    return f"{type(err).__name__}: {reason or err}"


class RewardSet:
    """The run's reward sources with their weights: one total score per completion, and each source's."""

    def __init__(self, sources: list[tuple[str, float, Callable[..., Any]]]) -> None:
        self.sources = sources

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.sources]

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list], input_ids: Tensor,
        attention_mask: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        total = torch.zeros(len(completions), dtype=torch.float32, device=input_ids.device)
        each: dict[str, Tensor] = {}
        for name, weight, source in self.sources:
            raw = source(prompts, completions, columns=columns, input_ids=input_ids, attention_mask=attention_mask)
            scores = _as_scores(raw, len(completions), name).to(total.device)
            each[name] = scores
            total = total + weight * scores
        return total, each


def _as_scores(raw: Any, count: int, name: str) -> Tensor:
    """``raw`` as a float tensor of ``count`` finite scores, or a clear error naming the source."""
    if isinstance(raw, Tensor):
        scores = raw.detach().float().flatten()
    else:
        try:
            scores = torch.as_tensor(raw, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(
                f"reward {name!r} must return a list of numbers, one per completion; got {_describe(raw)}"
            ) from err
    if scores.numel() != count:
        raise ConfigError(f"reward {name!r} returned {scores.numel()} scores for {count} completions")
    if not torch.isfinite(scores).all():
        raise ConfigError(f"reward {name!r} returned non-finite scores (NaN or inf): {scores.tolist()}")
    return scores


def _describe(value: Any) -> str:
    """A short description of what a reward function returned, e.g. ``list of str ('good', ...)``."""
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        shown = ", ".join(map(repr, value[:3])) + (", ..." if len(value) > 3 else "")
        return f"{type(value).__name__} of {' and '.join(kinds) or 'nothing'} ({shown})"
    return f"{type(value).__name__} {value!r}"[:200]


class _ModelReward:
    """A reward model as a reward source of :class:`RewardSet`."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, prompts: list[str], completions: list[str], input_ids: Tensor, attention_mask: Tensor,
                 **_: Any) -> Tensor:
        return self.model(prompts, completions, input_ids, attention_mask)


def load_rewards(cfg: Any, tokenizer: Any, trust_remote_code: bool, device: Optional[torch.device],
                 frozen_models: dict[str, Any]) -> RewardSet:
    """The reward sources of ``model.reward`` (a :class:`~lit_rlhf.configs.RewardConfig`): models (loaded frozen
    and added to ``frozen_models``: ``reward`` is the first, ``reward:<label>`` each), HTTP scorers, functions."""
    from lit_rlhf.models import SequenceClassifierReward

    sources = []
    for term in cfg.terms(allow_none=True):
        if term.model_name_or_path is not None:
            model = SequenceClassifierReward(
                term.model_name_or_path, tokenizer, cfg.label_index, cfg.dtype, trust_remote_code, cfg.quantization,
                cfg.batch_size, device,
            )
            frozen_models.setdefault("reward", model)  # the first reward model (value-head init)
            frozen_models[f"reward:{term.label()}"] = model
            source: Callable[..., Any] = _ModelReward(model)
        elif term.url is not None:
            source = HTTPReward(term.url, cfg.timeout, cfg.retries)
        else:
            source = FunctionReward(term.function, term.kwargs)
        sources.append((term.label(), term.weight, source))
    return RewardSet(sources)
