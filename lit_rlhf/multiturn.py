"""Multi-turn rollouts: each trajectory is a conversation between the policy and an environment
(:mod:`lit_rlhf.environments`), kept as one token sequence built by appending (:mod:`lit_rlhf.chat`).

Per turn, every unfinished trajectory of the batch samples together (Hugging Face ``generate`` or the vLLM
engine); the model's ids are appended exactly as sampled (loss mask 1), the environment's answer as the chat
template's delta (context only: no log-prob, KL, value or loss on it). The trajectory's score is the sum of its
step rewards (plus ``model.reward``'s score of the final answer, if a reward is configured); each step reward is
kept on the last token of the turn that earned it. The advantages of every estimator then run over the model's
tokens only (:func:`lit_rlhf.advantages.estimate_advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor

from lit_rlhf.chat import ChatRenderer
from lit_rlhf.data import left_pad
from lit_rlhf.environments import Environment, Message
from lit_rlhf.experience import RolloutProducer
from lit_rlhf.rollout import Samples, SamplingConfig, response_mask

ENV_METRICS = ("turns", "tool_calls", "tool_errors", "truncated")


@dataclass
class Trajectory:
    """One conversation in progress: the opening prompt's ids, then every later token with its owner."""

    environment: Environment
    messages: list[Message]
    opening: list[int]
    tokens: list[int] = field(default_factory=list)
    from_model: list[bool] = field(default_factory=list)
    engine_logprobs: list[float] = field(default_factory=list)
    step_rewards: list[tuple[int, float]] = field(default_factory=list)  # (its turn's last token, reward) per step
    turns: int = 0
    done: bool = False
    truncated: bool = False
    stop_text: str = ""  # the text of the stop token that ended the model's last turn ('' if none)

    def room(self) -> int:
        """Tokens left in the trajectory's budget."""
        return self.environment.max_total_tokens - len(self.opening) - len(self.tokens)

    def append(self, ids: list[int], from_model: bool, logprobs: Optional[list[float]] = None) -> None:
        self.tokens += ids
        self.from_model += [from_model] * len(ids)
        self.engine_logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


class MultiTurnProducer(RolloutProducer):
    """Rollouts of whole conversations with ``host.environment``; ``num_generations`` trajectories per row."""

    def __init__(self, host: Any, environment: Environment) -> None:
        super().__init__(host)
        self.environment = environment
        self.renderer: Optional[ChatRenderer] = None
        self.system_tools: Optional[str] = None  # the tools as a system message, for templates without tools=
        self.env_stats: dict[str, float] = {}
        self.used_engine = False  # whether the last sample() came from the vLLM engine (with its log-probs)

    def prepare(self, tokenizer: Any) -> None:
        """Check the chat template before any weight loads: conversations must render by appending."""
        self.renderer = ChatRenderer(tokenizer, self.environment.tools or None)
        self.renderer.check()
        if self.environment.tools and not self.renderer.template_renders_tools():
            self.system_tools = self.environment.tool_system_prompt()

    def sample_stats(self) -> dict[str, float]:
        return {f"env/{name}": value for name, value in self.env_stats.items()}

    def sample(self, batch: dict[str, Any], sampling: Optional[SamplingConfig] = None) -> Samples:
        """Play ``num_generations`` conversations per row of ``batch`` to their end or their budget."""
        host = self.host
        sampling = sampling or host.sampling
        groups = sampling.num_generations
        columns = batch.get("columns") or {}
        rows = [{"prompt": prompt, **{k: v[i] for k, v in columns.items()}} for i, prompt in enumerate(batch["prompts"])]
        trajectories = [self.start(row) for row in rows for _ in range(groups)]
        self.used_engine = False
        while True:
            active = [t for t in trajectories if not t.done]
            if not active:
                break
            self.model_turn(active, sampling)
            for trajectory in active:
                self.environment_turn(trajectory)
        return self.to_samples(trajectories, [row for row in rows for _ in range(groups)])

    def start(self, row: dict[str, Any]) -> Trajectory:
        environment = self.environment.episode()
        messages = list(environment.reset(dict(row)))
        if self.system_tools is not None:
            messages = [{"role": "system", "content": self.system_tools}, *messages]
        trajectory = Trajectory(environment, messages, self.renderer.opening(messages))
        if trajectory.room() < 1:
            trajectory.done = trajectory.truncated = True
        return trajectory

    def model_turn(self, active: list[Trajectory], sampling: SamplingConfig) -> None:
        """One turn of every unfinished trajectory, sampled together; each keeps at most its budget."""
        host = self.host
        queries, query_mask = left_pad([t.opening + t.tokens for t in active], host.tokenizer.pad_token_id)
        device = host.device
        turn = replace(sampling, num_generations=1, max_new_tokens=min(sampling.max_new_tokens, max(t.room() for t in active)))
        responses, engine_logprobs = self.sample_tokens(queries.to(device), query_mask.to(device), turn)
        self.used_engine = engine_logprobs is not None
        stops = set(host.stop_token_ids)
        lengths = response_mask(responses, host.stop_token_ids).sum(1).long().tolist()  # up to the first stop
        for row, trajectory in enumerate(active):
            ids = responses[row, :min(lengths[row], trajectory.room())].tolist()
            logprobs = engine_logprobs[row, :len(ids)].tolist() if engine_logprobs is not None else None
            trajectory.append(ids, True, logprobs)
            trajectory.turns += 1
            ended_with_stop = bool(ids) and ids[-1] in stops
            content_ids = ids[:-1] if ended_with_stop else ids
            trajectory.stop_text = host.tokenizer.decode(ids[-1:]) if ended_with_stop else ""
            trajectory.messages.append(
                {"role": "assistant", "content": host.tokenizer.decode(content_ids, skip_special_tokens=True)})

    def environment_turn(self, trajectory: Trajectory) -> None:
        """The environment's answer to the model's turn; the trajectory ends when it is done or out of budget."""
        new_messages, reward, done = trajectory.environment.step(list(trajectory.messages))
        trajectory.step_rewards.append((len(trajectory.tokens) - 1, float(reward)))  # earned by the turn just played
        if done:
            trajectory.done = True
            return
        if trajectory.turns >= trajectory.environment.max_turns or trajectory.room() <= 0:
            trajectory.done = trajectory.truncated = True
            return
        delta = self.renderer.delta(trajectory.messages, new_messages, trajectory.stop_text)
        trajectory.messages += new_messages
        if len(delta) >= trajectory.room():  # no room left for the model to answer
            trajectory.done = trajectory.truncated = True
            return
        trajectory.append(delta, False)

    def to_samples(self, trajectories: list[Trajectory], rows: list[dict[str, Any]]) -> Samples:
        """The trajectories as padded tensors: openings left-padded, the rest right-padded; ``mask`` marks the
        model's tokens, ``response_attention`` every real one."""
        host = self.host
        device, pad = host.device, host.tokenizer.pad_token_id
        queries, query_mask = left_pad([t.opening for t in trajectories], pad)
        width = max(1, max(len(t.tokens) for t in trajectories))
        responses = torch.full((len(trajectories), width), pad, dtype=torch.long)
        mask = torch.zeros(len(trajectories), width)
        attention = torch.zeros(len(trajectories), width)
        engine_logprobs = torch.zeros(len(trajectories), width)
        step_rewards = torch.zeros(len(trajectories), width, dtype=torch.float64)  # as exact as the environment's
        for row, t in enumerate(trajectories):
            n = len(t.tokens)
            responses[row, :n] = torch.tensor(t.tokens, dtype=torch.long)
            mask[row, :n] = torch.tensor(t.from_model, dtype=torch.float)
            attention[row, :n] = 1.0
            engine_logprobs[row, :n] = torch.tensor(t.engine_logprobs)
            for position, reward in t.step_rewards:
                step_rewards[row, max(position, 0)] += reward
        counts = [t.environment.counts for t in trajectories]
        names = sorted({name for c in counts for name in c} | {"tool_calls", "tool_errors"})
        self.env_stats = {
            "turns": sum(t.turns for t in trajectories) / len(trajectories),
            "truncated": sum(t.truncated for t in trajectories) / len(trajectories),
            **{name: sum(c.get(name, 0.0) for c in counts) / len(trajectories) for name in names},
        }
        final_answers = [next((m["content"] for m in reversed(t.messages) if m["role"] == "assistant"), "")
                         for t in trajectories]
        samples = Samples(
            queries.to(device), query_mask.to(device), responses.to(device), mask.to(device),
            [r["prompt"] for r in rows], final_answers,
            {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {},
            engine_logprobs.to(device) * mask.to(device) if self.used_engine else None,
            attention.to(device), torch.tensor([not t.truncated for t in trajectories], device=device),
            [t.messages for t in trajectories], step_rewards.to(device),
        )
        return samples

    def score(self, samples: Samples) -> tuple[Tensor, dict[str, Tensor]]:
        """Each trajectory's summed step rewards, plus ``model.reward``'s score of its final answer if set."""
        environment = samples.step_rewards.sum(1).float()
        if not self.host.rewards.sources:
            return environment, {}
        total, each = super().score(samples)
        return environment + total, {"environment": environment, **each}
