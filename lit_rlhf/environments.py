"""Environments for multi-turn rollouts: the policy speaks, the environment answers, until it is done.

An :class:`Environment` opens a conversation from a data row (``reset``) and answers each model turn
(``step``) with new messages, a reward and whether the episode is over. The trajectory's score is the sum of
its step rewards. A run makes one copy of the configured environment per trajectory (``copy.deepcopy``), so an
environment may keep the state of its episode in ``self``; attributes named in ``shared`` (read-only data such as
a question pool) are shared by the copies instead of copied. Recipe::

    model:
      environment:
        class_path: lit_rlhf.environments.ToolEnvironment
        init_args: {tools: [lit_rlhf.environments:calculator], max_turns: 3, max_total_tokens: 512}

Built in: :class:`ToolEnvironment` (Python functions as tools through the chat template), :class:`HTTPEnvironment`
(an environment in another process or language), :class:`CategoryQuiz` (the CPU multi-turn quickstart).
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any, Optional

from lit_rlhf.errors import ConfigError
from lit_rlhf.rewards import FunctionReward, import_reward_function, post_json

Message = dict[str, Any]


class Environment:
    """What the policy talks to in a multi-turn rollout. Subclasses implement ``reset`` and ``step``."""

    tools: list[Callable[..., Any]] = []  # Python functions offered to the model through the chat template
    shared: tuple[str, ...] = ()  # attributes every episode shares instead of copying (read-only data)

    def __init__(self, max_turns: int = 4, max_total_tokens: int = 1024) -> None:
        """
        Args:
            max_turns: Model turns per trajectory at most; a trajectory still going then is cut (``env/truncated``).
            max_total_tokens: Token budget of a whole trajectory (opening prompt, model and environment tokens); a
                trajectory that reaches it is cut. Each model turn has ``generation.max_new_tokens`` at most.
        """
        if max_turns < 1 or max_total_tokens < 2:
            raise ConfigError("model.environment: max_turns must be >= 1 and max_total_tokens >= 2")
        self.max_turns, self.max_total_tokens = max_turns, max_total_tokens
        self.counts: dict[str, float] = {}  # per-episode counters, logged as env/<name> (means over trajectories)

    def reset(self, row: dict[str, Any]) -> list[Message]:
        """The opening conversation (e.g. a system and a user message) built from a data row (``prompt`` and the
        data set's other columns)."""
        raise NotImplementedError

    def step(self, messages: list[Message]) -> tuple[list[Message], float, bool]:
        """Answer the conversation so far, which ends with the model's turn: the messages to append (user or tool
        turns), this step's reward, and whether the episode is over."""
        raise NotImplementedError

    def tool_system_prompt(self) -> Optional[str]:
        """The tools described in a system message, for a chat template that does not render ``tools=`` (None: no
        such message)."""
        return None

    def episode(self) -> "Environment":
        """A copy for one trajectory, whose state may then live in ``self``; the ``shared`` attributes are not
        copied (a deep copy of a large pool per trajectory would cost more than the rollout)."""
        memo = {id(getattr(self, name)): getattr(self, name) for name in self.shared}
        return copy.deepcopy(self, memo)

    def count(self, name: str, amount: float = 1.0) -> None:
        """Add to a per-episode counter (``tool_calls``, ``tool_errors``...), logged as ``env/<name>``."""
        self.counts[name] = self.counts.get(name, 0.0) + amount


def environment_summary(environment: Optional[Environment]) -> Optional[dict[str, Any]]:
    """The environment for the run's hyper-parameters: its class and budgets (the whole recipe is in config.yaml)."""
    if environment is None:
        return None
    kind = type(environment)
    return {"class_path": f"{kind.__module__}.{kind.__qualname__}", "max_turns": environment.max_turns,
            "max_total_tokens": environment.max_total_tokens}


class CategoryQuiz(Environment):
    """Several word-category questions in a row, one per turn, each graded as it is answered (the CPU
    multi-turn quickstart). The first question is the row's; the next ones are drawn from ``path`` by a
    generator seeded with the row's prompt. A right answer (its first word is one of the question's
    ``answer`` words, ``a|b|c``) earns ``1 / questions``: a trajectory scores the share it got right."""

    shared = ("pool",)

    def __init__(self, path: str, questions: int = 3, max_turns: int = 3, max_total_tokens: int = 64) -> None:
        """
        Args:
            path: A .jsonl file of questions with ``prompt`` and ``answer`` (e.g. recipes/data/word_categories.jsonl).
            questions: Questions per episode.
        """
        super().__init__(max_turns, max_total_tokens)
        with open(path) as file:
            self.pool = [json.loads(line) for line in file if line.strip()]
        if not self.pool or any("prompt" not in q or "answer" not in q for q in self.pool):
            raise ConfigError(f"CategoryQuiz: {path!r} needs rows with 'prompt' and 'answer'")
        self.questions = questions
        self.asked: list[dict[str, Any]] = []

    def reset(self, row: dict[str, Any]) -> list[Message]:
        seed = int(hashlib.sha256(row["prompt"].encode()).hexdigest()[:8], 16)
        others = [self.pool[(seed + 7919 * i) % len(self.pool)] for i in range(1, self.questions)]
        self.asked = [{"prompt": row["prompt"], "answer": row["answer"]}, *others]
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages: list[Message]) -> tuple[list[Message], float, bool]:
        answered = sum(m["role"] == "assistant" for m in messages)
        question = self.asked[answered - 1]
        words = messages[-1]["content"].split()
        right = bool(words) and words[0].strip(".,!?").lower() in str(question["answer"]).lower().split("|")
        self.count("right", float(right))
        reward = float(right) / self.questions
        if answered >= self.questions:
            return [], reward, True
        return [{"role": "user", "content": self.asked[answered]["prompt"]}], reward, False


class ToolEnvironment(Environment):
    """The model may call Python functions (``tools``) before it answers. Tool calls are JSON in
    ``<tool_call>...</tool_call>`` blocks (``{"name": ..., "arguments": {...}}``, the Hermes/Qwen format); each
    runs with a timeout and its result (or an error message) comes back as a ``tool`` message. A turn without
    tool calls is the answer: ``reward`` scores it (with the row's columns) and the episode ends.

    The tools reach the model through the chat template's ``tools=``; a template that ignores them gets them
    in a system message instead. A malformed call or a failing tool is counted (``env/tool_errors``), never
    a crash."""

    CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    shared = ("tools", "by_name", "reward")  # stateless: an episode's own state is its row and its counters

    def __init__(
        self, tools: list[str], reward: str, prompt_field: str = "prompt", system_prompt: Optional[str] = None,
        tool_timeout: float = 5.0, tool_call_reward: float = 0.0, describe_tools: bool = True, max_turns: int = 3,
        max_total_tokens: int = 1024,
    ) -> None:
        """
        Args:
            tools: Import paths of the tool functions (``module:function``), each with type hints and a Google-style
                docstring (transformers builds the JSON schema the template shows from them).
            reward: Import path of the reward function of the final answer, called as a reward function
                (``fn(prompts, completions, **columns) -> scores``), e.g. ``lit_rlhf.rewards:last_number_match``.
            prompt_field: The row's column that holds the user's question.
            system_prompt: An optional system message opening each conversation.
            tool_timeout: Seconds a tool call may take; a slower one gets an error message back.
            tool_call_reward: Reward for the episode's first tool call that runs without error (shaping for a
                model that rarely calls tools at first; 0: off). Later calls earn nothing.
            describe_tools: When the chat template ignores ``tools=``, describe the tools (their JSON schemas) in a
                system message; false when ``system_prompt`` describes them itself.
        """
        super().__init__(max_turns, max_total_tokens)
        if not tools:
            raise ConfigError("ToolEnvironment: give at least one tool (tools: [module:function])")
        self.tool_paths = list(tools)
        self.tools = [import_reward_function(path) for path in tools]
        self.by_name = {tool.__name__: tool for tool in self.tools}
        self.reward = FunctionReward(reward)
        self.prompt_field, self.system_prompt, self.tool_timeout = prompt_field, system_prompt, tool_timeout
        self.tool_call_reward, self.describe_tools = tool_call_reward, describe_tools
        self.row: dict[str, Any] = {}

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.row = row
        opening = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*opening, {"role": "user", "content": str(row[self.prompt_field])}]

    def step(self, messages: list[Message]) -> tuple[list[Message], float, bool]:
        text = messages[-1]["content"]
        calls = self.CALL.findall(text)
        if not calls:
            columns = {k: [v] for k, v in self.row.items() if k != "prompt"}
            score = self.reward([str(self.row.get("prompt", ""))], [text], columns)
            return [], float(list(score)[0]), True
        errors_before = self.counts.get("tool_errors", 0.0)
        replies = [{"role": "tool", "content": self.run_call(call)} for call in calls]
        succeeded = self.counts.get("tool_errors", 0.0) - errors_before < len(calls)
        reward = 0.0
        if succeeded and self.tool_call_reward and not self.counts.get("rewarded_calls"):
            reward = self.tool_call_reward
            self.count("rewarded_calls")
        return replies, reward, False

    def run_call(self, call: str) -> str:
        """The result of one tool call as text, or an error message for the model (counted in ``tool_errors``)."""
        self.count("tool_calls")
        try:
            request = json.loads(call)
            name, arguments = request["name"], request.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if name not in self.by_name:
                raise LookupError(f"unknown tool {name!r}; the tools are {sorted(self.by_name)}")
            if not isinstance(arguments, dict):
                raise TypeError("arguments must be a JSON object")
        except (ValueError, KeyError, TypeError, LookupError, AttributeError) as err:
            self.count("tool_errors")
            return f"error: malformed tool call ({err})"
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            return str(pool.submit(self.by_name[name], **arguments).result(timeout=self.tool_timeout))
        except concurrent.futures.TimeoutError:
            self.count("tool_errors")
            return f"error: {name} took longer than {self.tool_timeout} s"
        except Exception as err:  # noqa: BLE001 - any failure of the tool goes back to the model
            self.count("tool_errors")
            return f"error: {name} failed ({type(err).__name__}: {err})"
        finally:
            pool.shutdown(wait=False)

    def tool_system_prompt(self) -> Optional[str]:
        """The tools' JSON schemas and the call format (None with ``describe_tools: false``)."""
        if not self.describe_tools:
            return None
        from transformers.utils import get_json_schema

        schemas = "\n".join(json.dumps(get_json_schema(tool)) for tool in self.tools)
        return (
            "You may call these tools:\n<tools>\n" + schemas + "\n</tools>\nTo call one, write "
            '<tool_call>{"name": <tool name>, "arguments": <arguments as JSON>}</tool_call> and wait for its '
            "result; then answer."
        )


class HTTPEnvironment(Environment):
    """An environment served over HTTP (another process or language). ``reset`` POSTs ``{"row": {...}}`` to
    ``<url>/reset`` and expects ``{"messages": [...]}`` (and optionally ``"session"``, sent back with each step);
    ``step`` POSTs ``{"messages": [...], "session": ...}`` to ``<url>/step`` and expects ``{"messages": [...],
    "reward": float, "done": bool}``. Timeouts and retries as the HTTP reward scorer."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, max_turns: int = 4,
                 max_total_tokens: int = 1024) -> None:
        """
        Args:
            url: Base address of the environment server (``http://`` or ``https://``).
            timeout: Seconds to wait for an answer.
            retries: Further tries after a failed request.
        """
        super().__init__(max_turns, max_total_tokens)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"model.environment.url={url!r} must start with http:// or https://")
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.session: Any = None

    def _post(self, path: str, body: dict[str, Any], read: Callable[[Any], Any]) -> Any:
        return post_json(f"{self.url}/{path}", body, self.timeout, self.retries, "model.environment.url",
                         "model.environment.timeout", f"that the environment answers POST /{path} as documented",
                         read, "environment")

    def reset(self, row: dict[str, Any]) -> list[Message]:
        answer = self._post("reset", {"row": row}, lambda a: (list(a["messages"]), a.get("session")))
        messages, self.session = answer
        return messages

    def step(self, messages: list[Message]) -> tuple[list[Message], float, bool]:
        def read(answer: Any) -> tuple[list[Message], float, bool]:
            return list(answer["messages"]), float(answer["reward"]), bool(answer["done"])

        return self._post("step", {"messages": messages, "session": self.session}, read)


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression with + - * / ( ) and integers or decimals.

    Args:
        expression: The arithmetic expression, for example "12 * (3 + 4)".
    """
    if not re.fullmatch(r"[\d\s+\-*/().]+", expression) or "**" in expression:
        raise ValueError("only numbers, + - * / and parentheses are allowed")
    value = eval(expression, {"__builtins__": {}}, {})  # noqa: S307 - digits and operators only (checked above)
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
