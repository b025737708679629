"""Multi-turn rollouts: token-in/token-out trajectories (the model's ids trained exactly as sampled, the
environment's tokens context only), chat-template deltas against whole re-renderings, environments (tools, HTTP),
the estimators over trajectories, and the multi-turn quickstart from the command line."""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lightning as L
import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT
from lit_rlhf import PolicyConfig, PPOModule, PromptDataModule, SamplingConfig
from lit_rlhf.advantages import estimate_advantages
from lit_rlhf.chat import ChatRenderer
from lit_rlhf.configs import OptimizerConfig, PPOConfig, RewardConfig
from lit_rlhf.environments import CategoryQuiz, Environment, HTTPEnvironment, ToolEnvironment, calculator
from lit_rlhf.errors import ConfigError, TrainingError
from test_cli import run_cli
from test_smollm2 import needs_smollm2
from test_vllm import needs_vllm

CATEGORIES = os.path.join(REPO_ROOT, "recipes", "data", "word_categories.jsonl")
QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's template (tools, tool calls and tool responses), as its tokenizer ships it
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}{%- for tool in tools %}{{- \"\\n\" }}"
    "{{- tool | tojson }}{%- endfor %}{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function "
    "name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}{%- else %}{%- if messages[0]['role'] == "
    "'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- "
    "'<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}{%- for message in messages %}{%- if (message.role == \"user\") or (message.role == "
    "\"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}{{- '<|im_start|>' "
    "+ message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- elif message.role == \"tool\" %}{%- if "
    "(loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}{%- if loop.last or "
    "(messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (  # Llama 3 Instruct's turn format
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
REWRITING_TEMPLATE = (  # Qwen3-style: past assistant turns lose their reasoning once the conversation goes on
    "{%- for message in messages %}{%- if message.role == 'assistant' and not loop.last %}{{- '<|im_start|>assistant\\n'"
    " + message.content.split('</think>')[-1].lstrip() + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt "
    "%}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def smollm2_tokenizer(template=None, stop="<|im_end|>"):
    from lit_rlhf.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    if template is not None:
        tokenizer.chat_template = template
    if stop not in tokenizer.get_vocab():  # Llama 3's header and end-of-turn tokens are special tokens there too
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                    "<|eot_id|>", "<|begin_of_text|>"]})
        tokenizer.bos_token = "<|begin_of_text|>"
    return tokenizer


@needs_smollm2
@pytest.mark.parametrize("template, stop", [(None, "<|im_end|>"), (QWEN25_TEMPLATE, "<|im_end|>"),
                                            (LLAMA3_TEMPLATE, "<|eot_id|>")], ids=["smollm2-chatml", "qwen2.5", "llama3"])
def test_the_delta_rendering_equals_a_full_rerendering_of_the_conversation(template, stop):
    tokenizer = smollm2_tokenizer(template, stop)
    tools = [calculator] if template == QWEN25_TEMPLATE else None
    renderer = ChatRenderer(tokenizer, tools)
    renderer.check()
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    conversation = [{"role": "user", "content": "What is 12 * 7? Use the calculator."}]
    ids = renderer.opening(conversation)
    turns = [("<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"12 * 7\"}}</tool_call>",
              [{"role": "tool", "content": "84"}]),
             ("It is 84.", [{"role": "user", "content": "And 84 - 4?"}]),
             ("80", None)]
    for content, reply in turns:
        sampled = tokenizer(content, add_special_tokens=False)["input_ids"] + [stop_id]  # as the model samples it
        ids += sampled
        conversation.append({"role": "assistant", "content": content})
        if reply is not None:
            ids += renderer.delta(conversation, reply, stop)
            conversation += reply
    ids += renderer.encode(renderer.assistant_closing()[len(stop):])  # what the template writes after the last stop
    whole = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=False)
    assert tokenizer.decode(ids) == whole
    if stop == "<|im_end|>":  # ChatML: every boundary is a special token, so even the ids equal a re-tokenization
        assert ids == tokenizer(whole, add_special_tokens=False)["input_ids"]
    # (Llama 3's header ends in "\n\n", which a tokenization of the whole text merges with the model's first word:
    # the trajectory keeps the ids the model saw and sampled, the point of building it token by token)
    if template == QWEN25_TEMPLATE:  # the tools reach the model through the template's tools=
        assert renderer.template_renders_tools() and '"name": "calculator"' in tokenizer.decode(ids)


@needs_smollm2
def test_a_template_that_rewrites_earlier_turns_is_refused_before_weights_load(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="rewrites the conversation"):
        ChatRenderer(smollm2_tokenizer(REWRITING_TEMPLATE)).check()
    # from a recipe: a policy whose tokenizer has such a template fails in setup, before any weight loads
    from transformers import AutoTokenizer

    policy_dir = tmp_path / "policy"
    os.symlink(tiny_llama, policy_dir)
    tokenizer_dir = tmp_path / "rewriting"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = "{% for m in messages %}{% if not loop.last %}{{ m['content'][:1] }}{% else %}" \
                              "{{ m['content'] }}{% endif %} {% endfor %}"
    tokenizer.save_pretrained(tokenizer_dir)
    for name in os.listdir(tiny_llama):
        if not (tokenizer_dir / name).exists():
            os.symlink(os.path.join(tiny_llama, name), tokenizer_dir / name)
    module = quiz_module(str(tokenizer_dir))
    with pytest.raises(ConfigError, match="rewrites the conversation"):
        module._prepare()
    assert module.policy is None


class ScriptedEnvironment(Environment):
    """Replies 'and then' twice; rewards 1 for each model turn whose first word is 'good'."""

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        turns = sum(m["role"] == "assistant" for m in messages)
        reward = float(messages[-1]["content"].split()[:1] == ["good"])
        return ([], reward, True) if turns == 3 else ([{"role": "user", "content": "and then"}], reward, False)


def quiz_module(policy="builtin:tiny-llama", environment=None, estimator="grpo", generations=4, max_new_tokens=2,
                **ppo):
    critic = estimator == "gae"
    return PPOModule(
        policy=PolicyConfig(policy, lora_r=8, lora_alpha=16),
        reward=RewardConfig(),
        generation=SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0,
                                  num_generations=1 if critic or estimator == "reinforce_pp" else generations,
                                  stop_tokens=[]),
        ppo=PPOConfig(advantage_estimator=estimator, ppo_epochs=1, num_minibatches=2, kl_coef=0.05,
                      **({"whiten_advantages": False} if critic else {}), **ppo),
        optimizer=OptimizerConfig(lr=3e-3, scheduler="constant"),
        environment=environment or ScriptedEnvironment(max_turns=3, max_total_tokens=64),
    )


def quiz_batch(batch_size=4):
    data = PromptDataModule(CATEGORIES, tokenizer="builtin:tiny-llama", batch_size=batch_size, max_prompt_length=16)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_trained_ids_are_the_sampled_ids_of_every_turn_and_environment_tokens_are_context_only():
    L.seed_everything(0)
    module = quiz_module(estimator="gae")
    module._prepare()
    module.configure_model()
    tokenizer = module.tokenizer
    # the sampler answers with ids that decoding and encoding again would change: a special token inside a turn
    scripted = [tokenizer.convert_tokens_to_ids(w) for w in ("good", "<bos>")]
    sampled_turns = []
    real = module.producer.sample_tokens

    def sample_tokens(queries, query_mask, sampling):
        responses, logprobs = real(queries, query_mask, sampling)
        responses[:, :2] = torch.tensor(scripted) if len(sampled_turns) % 2 == 0 else responses[:, :2]
        sampled_turns.append(responses.clone())
        return responses, logprobs

    module.producer.sample_tokens = sample_tokens
    rollout = module.producer(quiz_batch())
    assert len(sampled_turns) == 3  # three model turns, each row sampled together
    for row in range(rollout.mask.shape[0]):
        response = rollout.query_responses[row, rollout.context_length:]
        trained = response[rollout.mask[row].bool()].tolist()
        assert trained == [t for turn in sampled_turns for t in turn[row].tolist()]  # exactly as sampled
        environment = rollout.attention_mask[row, rollout.context_length:].bool() & ~rollout.mask[row].bool()
        assert tokenizer.decode(response[environment]).split() == ["and", "then", "and", "then"]
        for name in ("kl", "advantages", "returns", "values"):  # nothing of training touches the environment's tokens
            assert getattr(rollout, name)[row][environment].abs().sum() == 0, name
    # the scripted first turn ("good <bos>") earns 1; the score is the sum of the step rewards, each kept on the
    # last token of the turn that earned it
    assert (rollout.scores >= 1).all()
    placed = rollout.rewards + 0.05 * rollout.kl  # the token rewards without their KL part
    first_turn_end = rollout.mask.cumsum(1) == 2  # the model's second token: the end of its first turn
    assert (placed[first_turn_end & rollout.mask.bool()] >= 1).all()
    torch.testing.assert_close(placed.sum(1), rollout.scores)
    roles = [m["role"] for m in rollout.conversations[0]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]


def test_gae_over_a_trajectory_skips_the_environment_segments():
    hp = PPOConfig(advantage_estimator="gae", gamma=0.9, lam=0.8, whiten_advantages=False)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])  # model, model, environment x2, model, model
    values = torch.tensor([[0.5, -0.2, 0.0, 0.0, 0.3, 0.1]])
    kl = torch.tensor([[0.1, 0.2, 0.0, 0.0, -0.1, 0.3]])
    scores = torch.tensor([2.0])
    advantages, returns, rewards = estimate_advantages(scores, kl, values, mask, hp, 1, 0.5)
    # by hand over the model's tokens only: rewards -0.5*kl, the score on the last; GAE as if contiguous
    r = [-0.05, -0.1, 0.05, -0.15 + 2.0]
    v = [0.5, -0.2, 0.3, 0.1]
    expected, running = [0.0] * 4, 0.0
    for t in reversed(range(4)):
        next_value = v[t + 1] if t < 3 else 0.0
        running = r[t] + 0.9 * next_value - v[t] + 0.9 * 0.8 * running
        expected[t] = running
    torch.testing.assert_close(advantages[0, [0, 1, 4, 5]], torch.tensor(expected))
    assert advantages[0, 2:4].abs().sum() == 0 and returns[0, 2:4].abs().sum() == 0
    torch.testing.assert_close(rewards[0, [0, 1, 4, 5]], torch.tensor(r))


def test_step_rewards_stay_on_the_turn_that_earned_them():
    from lit_rlhf import ppo

    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]])  # turns 1, 2, 3 between environment tokens
    assert ppo.turn_index(mask).tolist() == [[1, 1, 0, 0, 2, 2, 0, 3]]
    steps = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0, 0.25]])  # on each turn's last token
    scores = torch.tensor([2.25])  # 1.75 from the steps, 0.5 from a reward model's score of the final answer
    torch.testing.assert_close(ppo.place_scores(scores, mask, steps),
                               torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0, 0.75]]))
    # REINFORCE++ (gamma 1): a turn is credited with its own reward and the later ones, not the earlier ones
    hp = PPOConfig(advantage_estimator="reinforce_pp", gamma=1.0)
    _, returns, rewards = estimate_advantages(scores, torch.zeros_like(mask), None, mask, hp, 1, 0.0, step_rewards=steps)
    torch.testing.assert_close(returns, torch.tensor([[2.25, 2.25, 0.0, 0.0, 1.75, 1.75, 0.0, 0.75]]))
    # GAE: each step reward enters the recursion at its turn's last token
    hp = PPOConfig(advantage_estimator="gae", gamma=1.0, lam=1.0, whiten_advantages=False)
    advantages, _, _ = estimate_advantages(scores, torch.zeros_like(mask), torch.zeros_like(mask), mask, hp, 1, 0.0,
                                           step_rewards=steps)
    torch.testing.assert_close(advantages, returns)


def test_turn_credit_compares_each_turn_with_the_group_at_the_same_turn():
    from lit_rlhf import ppo

    # a group of three: A and B play three turns, C two; step rewards per turn A (1, 0, 1), B (0, 1, 0), C (1, 1)
    mask = torch.tensor([[1.0, 0, 1, 0, 1], [1, 0, 1, 0, 1], [1, 0, 1, 0, 0]])
    steps = torch.tensor([[1.0, 0, 0, 0, 1], [0, 0, 1, 0, 0], [1, 0, 1, 0, 0]])
    scores = (steps * mask).sum(1)
    # returns at the turns: A (2, 1, 1), B (1, 1, 0), C (2, 1)
    hp = PPOConfig(advantage_estimator="grpo", multi_turn_credit="turn", scale_rewards="none")
    advantages, _, _ = estimate_advantages(scores, torch.zeros_like(mask), None, mask, hp, 3, 0.0, step_rewards=steps)
    third = 1 / 3
    torch.testing.assert_close(advantages, torch.tensor([[third, 0, 0, 0, 0.5], [-2 * third, 0, 0, 0, -0.5],
                                                         [third, 0, 0, 0, 0]]))
    scaled, _, _ = estimate_advantages(scores, torch.zeros_like(mask), None, mask, PPOConfig(
        advantage_estimator="grpo", multi_turn_credit="turn"), 3, 0.0, step_rewards=steps)
    s1, s3 = (1 / 3) ** 0.5, 0.5**0.5  # the groups' std at turns 1 and 3 (turn 2: all equal, advantage 0)
    torch.testing.assert_close(scaled, torch.tensor([[third / s1, 0, 0, 0, 0.5 / s3], [-2 * third / s1, 0, 0, 0, -0.5 / s3],
                                                     [third / s1, 0, 0, 0, 0]]), atol=1e-5, rtol=1e-5)
    batch, _, _ = estimate_advantages(scores, torch.zeros_like(mask), None, mask, PPOConfig(
        advantage_estimator="grpo", multi_turn_credit="turn", scale_rewards="batch"), 3, 0.0, step_rewards=steps)
    every_turn = torch.tensor([2.0, 1, 1, 1, 1, 0, 2, 1])  # the std of all the turns' returns of the batch
    torch.testing.assert_close(batch, advantages / (every_turn.std() + 1e-6))
    rloo, _, _ = estimate_advantages(scores, torch.zeros_like(mask), None, mask, PPOConfig(
        advantage_estimator="rloo", multi_turn_credit="turn"), 3, 0.0, step_rewards=steps)
    torch.testing.assert_close(rloo, torch.tensor([[0.5, 0, 0, 0, 1.0], [-1.0, 0, 0, 0, -1.0], [0.5, 0, 0, 0, 0]]))
    # the default credits every turn with the trajectory's advantage (scores 2, 1, 2)
    whole, _, _ = estimate_advantages(scores, torch.zeros_like(mask), None, mask, PPOConfig(
        advantage_estimator="grpo", scale_rewards="none"), 3, 0.0, step_rewards=steps)
    torch.testing.assert_close(whole, torch.tensor([[third] * 5, [-2 * third] * 5, [third] * 5]) * mask)
    # a turn that only one trajectory of its group reached has nothing to compare with
    returns, reached = torch.tensor([[1.0, 0, 3.0], [2.0, 0, 0]]), torch.tensor([[1.0, 0, 1], [1, 0, 0]])
    for estimator in ("grpo", "rloo"):
        alone = ppo.turn_group_advantages(returns, reached, 2, estimator)
        assert alone[0, 2] == 0 and alone[0, 0] == -alone[1, 0] != 0


def test_turn_credit_outside_its_place_is_refused_in_one_line():
    from lit_rlhf import recipe_checks
    from lit_rlhf.configs import ReferenceConfig

    def check(estimator, multi_turn=True, credit="turn"):
        recipe_checks.check_algorithm(PolicyConfig("builtin:tiny-llama"), SamplingConfig(num_generations=4),
                                      PPOConfig(advantage_estimator=estimator, multi_turn_credit=credit),
                                      ReferenceConfig(), False, "", multi_turn)

    check("grpo")
    check("rloo")
    with pytest.raises(ConfigError, match="needs model.environment"):
        check("grpo", multi_turn=False)
    with pytest.raises(ConfigError, match="is for grpo and rloo: gae already credits"):
        check("gae")
    with pytest.raises(ConfigError, match="use trajectory or turn"):
        check("grpo", credit="turns")


def test_an_episode_shares_the_environments_read_only_data_and_copies_its_state():
    quiz = CategoryQuiz(CATEGORIES)
    episode = quiz.episode()
    assert episode is not quiz and episode.pool is quiz.pool  # 540 questions, not copied per trajectory
    episode.reset(quiz.pool[0])
    episode.count("right")
    assert quiz.asked == [] and quiz.counts == {}

    class Scripted(ScriptedEnvironment):
        shared = ("book",)

        def reset(self, row):
            seen.append((self.book, self.counts))
            return super().reset(row)

    seen = []
    environment = Scripted(max_turns=3, max_total_tokens=64)
    environment.book = [{"page": 1}]
    module = quiz_module(environment=environment)
    module._prepare()
    module.configure_model()
    module.producer(quiz_batch())
    assert len(seen) == 16 and all(book is environment.book for book, _ in seen)
    assert len({id(counts) for _, counts in seen}) == 16  # each trajectory's own state


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp", "gae", "grpo-turn"])
def test_each_estimator_trains_over_trajectories(estimator, tmp_path):
    from test_module import Recorder, fit

    L.seed_everything(0)
    estimator, _, credit = estimator.partition("-")
    module = quiz_module(estimator=estimator, multi_turn_credit=credit or "trajectory")
    recorder = Recorder()
    data = PromptDataModule(CATEGORIES, tokenizer="builtin:tiny-llama", batch_size=4, max_prompt_length=16)
    fit(module, data, tmp_path, limit_train_batches=2, callbacks=[recorder])
    assert recorder.history["env/turns"] == [3.0, 3.0] and recorder.history["env/truncated"] == [0.0, 0.0]
    assert all(torch.isfinite(torch.tensor(recorder.history["loss/policy_avg"])))
    rollout = module.latest_rollout
    environment = rollout.attention_mask[:, rollout.context_length:].bool() & ~rollout.mask.bool()
    assert environment.any() and rollout.advantages[environment].abs().sum() == 0
    if credit == "turn":  # one advantage per turn, centred per group and turn, not the same for every turn
        from lit_rlhf.ppo import turn_index

        turns = turn_index(rollout.mask)
        per_turn = torch.stack([(rollout.advantages * (turns == k)).sum(1) / (turns == k).sum(1) for k in (1, 2, 3)], 1)
        assert per_turn.view(-1, 4, 3).sum(1).abs().max() < 1e-5
        assert (per_turn.max(1).values - per_turn.min(1).values).max() > 0.1
    elif estimator in ("grpo", "rloo"):  # one advantage per trajectory, on every model token, centred per group
        per_trajectory = (rollout.advantages * rollout.mask).sum(1) / rollout.mask.sum(1)
        assert per_trajectory.view(-1, 4).sum(1).abs().max() < 1e-5


def test_budgets_cut_trajectories_and_count_them():
    L.seed_everything(0)
    module = quiz_module(environment=ScriptedEnvironment(max_turns=2, max_total_tokens=64))
    module._prepare()
    module.configure_model()
    rollout = module.producer(quiz_batch())
    assert rollout.stats["env/truncated"] == 1.0 and rollout.stats["env/turns"] == 2.0
    tight = quiz_module(environment=ScriptedEnvironment(max_turns=3, max_total_tokens=9))
    tight._prepare()
    tight.configure_model()
    rolled = tight.producer(quiz_batch())
    lengths = rolled.attention_mask.sum(1)
    assert (lengths <= 9).all() and rolled.stats["env/truncated"] == 1.0


def test_tool_environment_runs_tools_and_answers_errors_without_crashing():
    environment = ToolEnvironment(tools=["lit_rlhf.environments:calculator", "test_multiturn:slow_tool"],
                                  reward="lit_rlhf.rewards:last_number_match", tool_timeout=0.2)
    episode = environment.episode()  # as the producer makes one per trajectory
    assert episode.reward is environment.reward and episode.by_name is environment.by_name  # shared, not copied
    messages = episode.reset({"prompt": "What is 6 * 7?", "answer": "42"})
    assert messages == [{"role": "user", "content": "What is 6 * 7?"}]
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call>'
    bad = ["<tool_call>{not json}</tool_call>", '<tool_call>{"name": "abacus", "arguments": {}}</tool_call>',
           '<tool_call>{"name": "calculator", "arguments": {"expression": "import os"}}</tool_call>',
           '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>',
           '<tool_call>{"name": "slow_tool", "arguments": {}}</tool_call>']
    replies, reward, done = episode.step([*messages, {"role": "assistant", "content": call + " ".join(bad)}])
    assert not done and reward == 0.0 and [r["role"] for r in replies] == ["tool"] * 6
    assert replies[0]["content"] == "42"
    assert [r["content"].split(" ")[0] for r in replies[1:]] == ["error:"] * 5
    assert "malformed" in replies[1]["content"] and "unknown tool 'abacus'" in replies[2]["content"]
    assert "took longer than 0.2 s" in replies[5]["content"]
    assert episode.counts == {"tool_calls": 6.0, "tool_errors": 5.0}
    _, reward, done = episode.step([{"role": "assistant", "content": "The answer is 42"}])
    assert done and reward == 1.0
    assert environment.counts == {}  # each episode counts on its own copy


def slow_tool() -> str:
    """Sleeps past any sensible timeout."""
    time.sleep(1.0)
    return "late"


@needs_smollm2
def test_tools_reach_a_template_without_tools_as_a_system_message():
    from lit_rlhf.multiturn import MultiTurnProducer

    environment = ToolEnvironment(tools=["lit_rlhf.environments:calculator"], reward="lit_rlhf.rewards:last_number_match")
    producer = MultiTurnProducer(None, environment)
    producer.prepare(smollm2_tokenizer())  # SmolLM2's ChatML template ignores tools=
    assert producer.system_tools is not None and '"name": "calculator"' in producer.system_tools
    with_template_tools = MultiTurnProducer(None, environment)
    with_template_tools.prepare(smollm2_tokenizer(QWEN25_TEMPLATE))
    assert with_template_tools.system_tools is None
    described_by_the_recipe = ToolEnvironment(tools=["lit_rlhf.environments:calculator"], describe_tools=False,
                                              reward="lit_rlhf.rewards:last_number_match", system_prompt="Use <tool_call>")
    producer = MultiTurnProducer(None, described_by_the_recipe)
    producer.prepare(smollm2_tokenizer())
    assert producer.system_tools is None


class _EnvironmentServer(BaseHTTPRequestHandler):
    failures: list = []
    bodies: list = []

    def do_POST(self):  # noqa: N802 - the http.server name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _EnvironmentServer.bodies.append((self.path, body))
        if _EnvironmentServer.failures:
            _EnvironmentServer.failures.pop()
            self.send_response(503)
            self.end_headers()
            return
        if self.path == "/reset":
            answer = {"messages": [{"role": "user", "content": body["row"]["prompt"]}], "session": 7}
        else:
            answer = {"messages": [{"role": "user", "content": "again"}], "reward": 0.5, "done": len(body["messages"]) > 3}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_environment_resets_and_steps_over_json_with_retries():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EnvironmentServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        environment = HTTPEnvironment(f"http://127.0.0.1:{server.server_address[1]}", timeout=2.0, retries=1)
        _EnvironmentServer.failures = [True]  # the first request fails once, the retry answers
        messages = environment.reset({"prompt": "hello", "answer": "x"})
        assert messages == [{"role": "user", "content": "hello"}] and environment.session == 7
        turn = [*messages, {"role": "assistant", "content": "hi"}]
        assert environment.step(turn) == ([{"role": "user", "content": "again"}], 0.5, False)
        assert _EnvironmentServer.bodies[-1] == ("/step", {"messages": turn, "session": 7})
        _EnvironmentServer.failures = [True, True]
        with pytest.raises(TrainingError, match=r"model.environment.url='http://127.0.0.1:\d+/step': no valid answer "
                                                r"after 2 tries; the last one: the environment answered HTTP 503"):
            environment.step(turn)
    finally:
        server.shutdown()
    with pytest.raises(ConfigError, match="must start with http"):
        HTTPEnvironment("localhost:8000")


def test_category_quiz_grades_each_answer():
    quiz = CategoryQuiz(CATEGORIES, questions=3)
    messages = quiz.reset({"prompt": "then this meal was", "answer": "bread|cake|pizza"})
    assert len(quiz.asked) == 3
    replies, reward, done = quiz.step([*messages, {"role": "assistant", "content": "pizza"}])
    assert reward == pytest.approx(1 / 3) and not done and replies[0]["content"] == quiz.asked[1]["prompt"]
    wrong = quiz.asked[1]["answer"].split("|")[0] + "x"
    _, reward, done = quiz.step([*messages, {"role": "assistant", "content": "pizza"}, *replies,
                                 {"role": "assistant", "content": wrong}])
    assert reward == 0.0 and not done


def test_the_multiturn_quickstart_learns_from_the_command_line(tmp_path):
    result = run_cli("fit", "--config", os.path.join(REPO_ROOT, "recipes", "multiturn-quickstart.yaml"),
                     f"--data.path={CATEGORIES}",
                     f"--data.val_path={os.path.join(REPO_ROOT, 'recipes', 'data', 'word_categories_val.jsonl')}",
                     f"--model.environment.init_args.path={CATEGORIES}", "--trainer.max_epochs=1",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "multiturn-quickstart").iterdir()
    metrics = pd.read_csv(run / "metrics.csv")
    scores = metrics["objective/scores"].dropna()
    assert scores.head(5).mean() < 0.15 and scores.tail(5).mean() > scores.head(5).mean() + 0.15
    assert (metrics["env/turns"].dropna() == 3).all()
    rows = [json.loads(line) for line in open(run / "samples.jsonl")]
    assert [m["role"] for m in rows[0]["conversation"]] == ["user", "assistant"] * 3


@needs_vllm
def test_multiturn_rollouts_on_the_vllm_engine_stay_in_sync(tmp_path):
    """Every turn of every trajectory sampled by the engine: its log-probs of the model's tokens (in the context
    of the earlier turns and the environment's tokens) equal the trainer's, iteration after iteration."""
    result = run_cli("fit", "--config", os.path.join(REPO_ROOT, "recipes", "multiturn-quickstart.yaml"),
                     f"--data.path={CATEGORIES}", "--data.val_path=null",
                     f"--model.environment.init_args.path={CATEGORIES}", "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=4", "--model.generation.engine=vllm",
                     "--model.generation.gpu_memory_utilization=0.1", "--model.evaluation.before_training=false",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", cwd=tmp_path, timeout=600,
                     env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "multiturn-quickstart").iterdir()
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 4 and (metrics["env/turns"] == 3).all()
    assert (metrics["rollout/logprob_diff_max"] < 1e-3).all(), metrics["rollout/logprob_diff_max"]
    assert metrics["loss/kl_avg"].iloc[-1] > 0  # the policy moved, and the engine followed it


def test_the_readme_environment_example_runs_as_written(tmp_path, monkeypatch):
    """The README's GuessTheNumber example, copied as a user would, plays whole episodes in a rollout."""
    import re
    import sys
    import types

    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = readme[readme.index("**Write an environment.**"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    recipe = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    my_envs = types.ModuleType("my_envs")
    exec(compile(code, "my_envs.py", "exec"), my_envs.__dict__)
    monkeypatch.setitem(sys.modules, "my_envs", my_envs)
    game = my_envs.GuessTheNumber()
    opening = game.reset({"prompt": "game 1"})
    secret = game.secret
    replies, reward, done = game.step([*opening, {"role": "assistant", "content": f"{secret - 1 or 2}"}])
    assert not done and reward == 0.0 and replies[0]["content"] in ("Higher.", "Lower.")
    _, reward, done = game.step([*opening, {"role": "assistant", "content": "x"}, *replies,
                                 {"role": "assistant", "content": f"It is {secret}."}])
    assert done and reward == pytest.approx(0.9)
    # the recipe lines as the README gives them, on the tiny policy
    import yaml

    model = yaml.safe_load(recipe)["model"]
    assert model["environment"]["class_path"] == "my_envs.GuessTheNumber"
    L.seed_everything(0)
    module = quiz_module(environment=my_envs.GuessTheNumber(**model["environment"]["init_args"]),
                         max_new_tokens=model["generation"]["max_new_tokens"])
    module._prepare()
    module.configure_model()
    rollout = module.producer(quiz_batch())
    assert 1 <= rollout.stats["env/turns"] <= 5 and "env/wrong_guesses" in rollout.stats
    assert rollout.conversations[0][0]["content"].startswith("I am thinking of a number")


def test_only_the_first_successful_tool_call_of_an_episode_is_rewarded():
    environment = ToolEnvironment(tools=["lit_rlhf.environments:calculator"], reward="lit_rlhf.rewards:last_number_match",
                                  tool_call_reward=0.2)
    episode = environment.episode()
    messages = episode.reset({"prompt": "What is 6 * 7?", "answer": "42"})
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'
    assert episode.step([*messages, {"role": "assistant", "content": call % "6 *"}])[1] == 0.0  # an error earns nothing
    assert episode.step([*messages, {"role": "assistant", "content": call % "6 * 7"}])[1] == 0.2
    assert episode.step([*messages, {"role": "assistant", "content": call % "6 * 7"}])[1] == 0.0  # only once


def test_multiturn_with_sharded_weights_is_refused_before_weights_load():
    module = quiz_module()
    module._device_mesh = object()  # what ModelParallelStrategy hands configure_model
    with pytest.raises(ConfigError, match="model.environment is not supported with sharded weights"):
        module._prepare()
