"""The estimator dispatch (``ppo.advantage_estimator`` and its options) against plain-Python references, and
its statistics over two ranks equal to one process's over both ranks' rows."""

import threading
from dataclasses import replace

import pytest
import torch

from lit_rlhf.advantages import estimate_advantages, token_rewards
from lit_rlhf.configs import PPOConfig

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
SCORES = torch.tensor([1.0, 0.0, 2.0, 0.0])
KL = torch.tensor([[0.2, 0.0, 0.1], [0.0, 0.4, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])


def whiten(values, mask):
    """Plain masked whitening: mean 0 and (Bessel-corrected) variance 1 over the masked entries, 0 elsewhere."""
    items = [v for row, m in zip(values.tolist(), mask.tolist()) for v, keep in zip(row, m) if keep]
    mean = sum(items) / len(items)
    std = (sum((v - mean) ** 2 for v in items) / (len(items) - 1)) ** 0.5
    return torch.tensor([[(v - mean) / std if keep else 0.0 for v, keep in zip(row, m)]
                         for row, m in zip(values.tolist(), mask.tolist())])


def returns(rewards, mask, gamma):
    out = []
    for row, m in zip(rewards.tolist(), mask.tolist()):
        running, values = 0.0, []
        for reward, keep in reversed(list(zip(row, m))):
            running = reward + gamma * running if keep else 0.0
            values.append(running if keep else 0.0)
        out.append(values[::-1])
    return torch.tensor(out)


def test_token_rewards_put_the_score_on_the_last_real_token():
    rewards = token_rewards(SCORES, KL, MASK, kl_coef=0.5)
    expected = [[-0.1, 0.0, 0.95], [0.0, -0.2, 0.0], [1.85, 0.0, 0.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected))


@pytest.mark.parametrize("scale, expected", [
    ("group", [2**-0.5, -(2**-0.5), 2**-0.5, -(2**-0.5)]),  # each group's std (Bessel): 0.707 and 1.414
    ("batch", [0.5 / 0.957427, -0.5 / 0.957427, 1 / 0.957427, -1 / 0.957427]),  # the batch's std of [1, 0, 2, 0]
    ("none", [0.5, -0.5, 1.0, -1.0]),  # Dr.GRPO: centered only
])
def test_grpo_by_hand(scale, expected):
    hp = PPOConfig(advantage_estimator="grpo", scale_rewards=scale)
    advantages, returned, _ = estimate_advantages(SCORES, torch.zeros_like(KL), None, MASK, hp, 2, kl_coef=0.0)
    torch.testing.assert_close(advantages, torch.tensor(expected).unsqueeze(1) * MASK, rtol=1e-4, atol=1e-5)
    assert returned is advantages


def test_grpo_and_rloo_penalize_the_score_by_the_sequence_kl():
    # KL sums 0.3, 0.4, 0.3, 0 at coefficient 0.5: penalized scores 0.85, -0.2, 1.85, 0
    hp = PPOConfig(advantage_estimator="grpo", scale_rewards="none")
    advantages, _, _ = estimate_advantages(SCORES, KL, None, MASK, hp, 2, kl_coef=0.5)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([0.525, -0.525, 0.925, -0.925]))
    rloo, _, _ = estimate_advantages(SCORES, KL, None, MASK, replace(hp, advantage_estimator="rloo"), 2, kl_coef=0.5)
    torch.testing.assert_close(rloo[:, 0], torch.tensor([1.05, -1.05, 1.85, -1.85]))  # each minus the other one
    torch.testing.assert_close(rloo, rloo[:, :1] * MASK)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_by_hand(baseline):
    hp = PPOConfig(advantage_estimator="reinforce_pp_baseline" if baseline else "reinforce_pp", gamma=0.9)
    advantages, returned, rewards = estimate_advantages(SCORES, KL, None, MASK, hp, 2, kl_coef=0.5)
    scores = SCORES - torch.tensor([0.5, 0.5, 1.0, 1.0]) if baseline else SCORES  # the group means subtracted
    expected_rewards = token_rewards(scores, KL, MASK, 0.5)
    torch.testing.assert_close(rewards, expected_rewards)
    torch.testing.assert_close(returned, returns(expected_rewards, MASK, 0.9))
    torch.testing.assert_close(advantages, whiten(returns(expected_rewards, MASK, 0.9), MASK), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("whiten_rewards, whiten_advantages", [(False, False), (False, True), (True, True)])
def test_gae_by_hand(whiten_rewards, whiten_advantages):
    values = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.1, 9.0], [0.0, 9.0, 9.0], [0.1, 0.1, 0.1]])
    hp = PPOConfig(gamma=0.9, lam=0.8, whiten_rewards=whiten_rewards, whiten_advantages=whiten_advantages)
    advantages, returned, rewards = estimate_advantages(SCORES, KL, values, MASK, hp, 1, kl_coef=0.5)
    expected_rewards = token_rewards(SCORES, KL, MASK, 0.5)
    if whiten_rewards:  # scaled to unit variance, the mean kept
        mean = (expected_rewards * MASK).sum() / MASK.sum()
        expected_rewards = (whiten(expected_rewards, MASK) + mean) * MASK
    torch.testing.assert_close(rewards, expected_rewards, rtol=1e-4, atol=1e-5)
    expected = []
    for row_r, row_v, row_m in zip(expected_rewards.tolist(), values.tolist(), MASK.tolist()):
        running, out = 0.0, [0.0] * 3
        for t in reversed(range(3)):
            if not row_m[t]:
                continue
            next_value = row_v[t + 1] if t + 1 < 3 and row_m[t + 1] else 0.0
            running = row_r[t] + 0.9 * next_value - row_v[t] + 0.9 * 0.8 * running
            out[t] = running
        expected.append(out)
    expected = torch.tensor(expected)
    torch.testing.assert_close(returned, (expected + values) * MASK, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(advantages, whiten(expected, MASK) if whiten_advantages else expected,
                               rtol=1e-4, atol=1e-5)


def test_unknown_estimator_and_gae_without_a_critic_are_errors():
    with pytest.raises(ValueError, match="advantage_estimator='ppo'"):
        estimate_advantages(SCORES, KL, None, MASK, PPOConfig(advantage_estimator="ppo"), 2, 0.1)
    with pytest.raises(ValueError, match="needs a critic"):
        estimate_advantages(SCORES, KL, None, MASK, PPOConfig(), 2, 0.1)


@pytest.mark.parametrize("estimator, scale", [("gae", "group"), ("grpo", "batch"), ("reinforce_pp", "group")])
def test_two_ranks_take_their_statistics_over_both(estimator, scale):
    """Whitening and the batch std over two ranks (each half of the rows, summed through the all-reduce) give
    what one process computes over all the rows."""
    values = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.1, 0.0], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1]])
    hp = PPOConfig(advantage_estimator=estimator, scale_rewards=scale, whiten_rewards=estimator == "gae")
    whole, _, _ = estimate_advantages(SCORES, KL, values, MASK, hp, 2, 0.5)
    barrier, exchanged, results = threading.Barrier(2), [None, None], [None, None]

    def rank(index):
        rows = slice(2 * index, 2 * index + 2)

        def all_reduce(tensor):
            exchanged[index] = tensor.clone()
            barrier.wait()
            total = exchanged[0] + exchanged[1]
            barrier.wait()
            return total

        results[index] = estimate_advantages(SCORES[rows], KL[rows], values[rows], MASK[rows], hp, 2, 0.5, all_reduce)[0]

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(torch.cat(results), whole, rtol=1e-5, atol=1e-6)
