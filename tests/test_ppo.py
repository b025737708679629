"""Every function of ``lit_rlhf.ppo`` against values computed by hand or by an independent loop."""

import math

import pytest
import torch

from lit_rlhf import ppo

# Two responses of length 3 and 2; the second is padded after its stop token.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_masked_mean_over_all_tokens_and_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    assert ppo.masked_mean(x, MASK).item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert ppo.masked_mean(x, MASK, dim=1).tolist() == pytest.approx([2.0, 4.5])


def test_masked_var_is_bessel_corrected_and_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1e6]])
    # entries 1..5: mean 3, squared deviations 4+1+0+1+4 = 10
    assert ppo.masked_var(x, MASK).item() == pytest.approx(10 / 4)
    assert ppo.masked_var(x, MASK, unbiased=False).item() == pytest.approx(10 / 5)


def test_masked_whiten_zero_mean_unit_variance_and_zero_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1e6]])
    w = ppo.masked_whiten(x, MASK)
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]) - 3) / math.sqrt(10 / 4 + 1e-8)
    assert w[MASK.bool()].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert w[1, 2].item() == 0.0
    kept = ppo.masked_whiten(x, MASK, shift_mean=False)
    assert kept[MASK.bool()].tolist() == pytest.approx((expected + 3).tolist(), rel=1e-5)
    assert kept[1, 2].item() == 0.0


def test_kl_estimators():
    logprobs, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(2)
    assert ppo.kl_penalty(logprobs, ref, "k1").item() == pytest.approx(d)
    assert ppo.kl_penalty(logprobs, ref, "k2").item() == pytest.approx(0.5 * d**2)
    assert ppo.kl_penalty(logprobs, ref, "k3").item() == pytest.approx(0.5 - 1 + d)
    with pytest.raises(ValueError, match="k4"):
        ppo.kl_penalty(logprobs, ref, "k4")


def test_compute_rewards_puts_score_on_last_real_token():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -0.5, -1.0], [-1.0, -1.0, -1.0]])
    scores = torch.tensor([2.0, -3.0])
    rewards, kl = ppo.compute_rewards(scores, logprobs, ref, MASK, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -0.5, 0.0], [0.0, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.05, 2.0], [0.0, 0.1 - 3.0, 0.0]]))


def _reference_gae(rewards, values, length, gamma, lam):
    """GAE for one episode of ``length`` steps, written as the textbook sum over future deltas."""
    adv = []
    for t in range(length):
        total = 0.0
        for k in range(t, length):
            next_value = values[k + 1] if k + 1 < length else 0.0
            delta = rewards[k] + gamma * next_value - values[k]
            total += (gamma * lam) ** (k - t) * delta
        adv.append(total)
    return adv


def test_compute_gae_by_hand_single_step_episode():
    rewards = torch.tensor([[1.0, 5.0]])
    values = torch.tensor([[0.5, 7.0]])
    mask = torch.tensor([[1.0, 0.0]])
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # the episode ends after token 0: A_0 = r_0 - V_0 = 0.5; padding is ignored and zeroed
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 0.0]]))


def test_compute_gae_matches_independent_loop_with_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 3), torch.randn(2, 3)
    adv, ret = ppo.compute_gae(rewards, values, MASK, gamma=0.99, lam=0.9)
    for row, length in enumerate([3, 2]):
        expected = _reference_gae(rewards[row].tolist(), values[row].tolist(), length, 0.99, 0.9)
        assert adv[row, :length].tolist() == pytest.approx(expected, rel=1e-5)
        assert ret[row, :length].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[row, :length].tolist())], rel=1e-5
        )
    assert adv[1, 2].item() == 0.0 and ret[1, 2].item() == 0.0


def test_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    # ratios 1.5, 0.5, 1.1 with advantages +1, -1, +2 and padding at the end
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo.policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    assert stats["ratio"].item() == pytest.approx(1.0)


def test_policy_loss_unclipped_is_plain_surrogate():
    logprobs = torch.log(torch.tensor([[1.1, 0.95]]))
    advantages = torch.tensor([[2.0, 3.0]])
    loss, stats = ppo.policy_loss(logprobs, torch.zeros(1, 2), advantages, torch.ones(1, 2), clip_range=0.2)
    assert loss.item() == pytest.approx(-(1.1 * 2 + 0.95 * 3) / 2)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 3.0]])
    old_values = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo.value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0: v_clip = 0.7 -> max(1.0, 0.49) = 1.0; token 1: v_clip = 0 -> max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert stats["clipfrac"].item() == 0.0
    values = torch.tensor([[0.0, 0.0, 0.0]])
    old_values = torch.tensor([[1.0, 0.0, 0.0]])
    loss, stats = ppo.value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0: v_clip = 0.8 -> max(0, 0.64) = 0.64, clipped
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_entropy_from_logits():
    assert ppo.entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    assert ppo.entropy_from_logits(torch.tensor([0.0, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


def test_fixed_kl_controller():
    controller = ppo.FixedKLController(0.05)
    controller.update(100.0, n_steps=64)
    assert controller.value == 0.05


def test_adaptive_kl_controller_update_clip_and_state():
    controller = ppo.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    controller.update(current_kl=7.2, n_steps=100)  # error = 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    controller.update(current_kl=600.0, n_steps=100)  # error clipped to 0.2
    assert controller.value == pytest.approx(0.1 * 1.02**2)
    controller.update(current_kl=0.0, n_steps=100)  # error clipped to -0.2
    expected = 0.1 * 1.02**2 * 0.98
    assert controller.value == pytest.approx(expected)
    restored = ppo.AdaptiveKLController(0.5, target=6.0, horizon=1000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == pytest.approx(expected)


# ---- critic-free estimators and loss options (hand-computed) --------------------------------------------
SCORES = torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 3.0])  # two groups of three


def test_grpo_advantages_by_group_batch_or_unscaled():
    # group 1: mean 1/3, std (unbiased) sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3); group 2: all equal
    std = math.sqrt(1 / 3)
    expected = [(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0.0, 0.0, 0.0]
    assert ppo.grpo_advantages(SCORES, 3).tolist() == pytest.approx(expected, rel=1e-5)
    assert ppo.grpo_advantages(SCORES, 3, "none").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    batch_std = SCORES.std().item()
    assert ppo.grpo_advantages(SCORES, 3, "batch").tolist() == pytest.approx(
        [v / batch_std for v in (2 / 3, -1 / 3, -1 / 3, 0, 0, 0)], rel=1e-5)
    assert ppo.grpo_advantages(torch.tensor([5.0, 7.0]), 1).tolist() == [0.0, 0.0]  # a group of one
    with pytest.raises(ValueError, match="do not split into groups of num_generations=4"):
        ppo.grpo_advantages(SCORES, 4)


def test_rloo_subtracts_the_mean_of_the_others():
    # 1 - (0+0)/2 = 1, 0 - (1+0)/2 = -0.5, ...; equal scores give 0
    assert ppo.rloo_advantages(SCORES, 3).tolist() == pytest.approx([1.0, -0.5, -0.5, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="rloo needs generation.num_generations >= 2"):
        ppo.rloo_advantages(SCORES, 1)


def test_discounted_returns_and_group_baseline():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [1.0, 3.0, 99.0]])
    returns = ppo.discounted_returns(rewards, MASK, gamma=0.5)
    # row 1: 4, 2 + 0.5*4 = 4, 1 + 0.5*4 = 3; row 2 stops after 2 tokens: 3, 1 + 1.5 = 2.5, (masked) 0
    assert returns.tolist() == [[3.0, 4.0, 4.0], [2.5, 3.0, 0.0]]
    assert ppo.group_baseline(SCORES, 3).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    assert ppo.sequence_to_tokens(torch.tensor([2.0, -1.0]), MASK).tolist() == [[2, 2, 2], [-1, -1, 0]]


def test_overlong_penalty_is_zero_then_linear_to_the_limit():
    lengths = torch.tensor([4, 6, 7, 8, 10])  # max 10 tokens, buffer 4: penalty starts after 6
    assert ppo.overlong_penalty(lengths, 10, 4, 1.0).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0])
    assert ppo.overlong_penalty(lengths, 10, 4, 2.0)[-1].item() == -2.0


def test_loss_aggregation_modes():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 100.0]])
    assert ppo.aggregate(values, MASK, "token_mean").item() == pytest.approx(16 / 5)
    assert ppo.aggregate(values, MASK, "seq_mean_token_mean").item() == pytest.approx((2 + 5) / 2)
    assert ppo.aggregate(values, MASK, "seq_mean_token_sum").item() == pytest.approx((6 + 10) / 2)
    assert ppo.aggregate(values, MASK, "seq_mean_token_sum_norm", max_new_tokens=4).item() == pytest.approx(16 / 8)
    with pytest.raises(ValueError, match="loss_aggregation='sum'"):
        ppo.aggregate(values, MASK, "sum")


def test_clip_higher_and_sequence_level_ratio():
    old = torch.zeros(1, 2)
    logprobs = torch.log(torch.tensor([[1.5, 1.5]]))  # ratio 1.5 on both tokens
    advantages = torch.ones(1, 2)
    mask = torch.ones(1, 2)
    loss, stats = ppo.policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clipfrac"].item() == 1.0
    loss, _ = ppo.policy_loss(logprobs, old, advantages, mask, clip_range=0.2, clip_range_high=0.28)
    assert loss.item() == pytest.approx(-1.28)
    # GSPO: token ratios 2 and 0.5 have the geometric mean 1: nothing is clipped, both tokens get ratio 1
    logprobs = torch.log(torch.tensor([[2.0, 0.5]])).requires_grad_()
    loss, stats = ppo.policy_loss(logprobs, old, advantages, mask, clip_range=0.2, sequence_level=True)
    assert loss.item() == pytest.approx(-1.0) and stats["clipfrac"].item() == 0.0
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-0.5, -0.5])  # d(-mean(ratio * A)) per token, ratio 1
    token_loss, _ = ppo.policy_loss(torch.log(torch.tensor([[2.0, 0.5]])), old, advantages, mask, clip_range=0.2)
    assert token_loss.item() == pytest.approx(-(1.2 + 0.5) / 2)  # token level: the 2x token is clipped


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
def test_a_fully_masked_batch_contributes_nothing(mode):
    """All responses truncated under reward.mask_truncated: the loss is 0 with a zero gradient, not NaN."""
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, _ = ppo.policy_loss(logprobs, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 0.2,
                              aggregation=mode, max_new_tokens=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logprobs.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
def test_a_minibatch_loss_does_not_depend_on_its_split(mode):
    """A 100-token and a 2-token response: one micro-batch, two micro-batches (normalized by the minibatch's
    count), or two ranks (each with the all-reduced count, gradients averaged x world size) give one gradient."""
    torch.manual_seed(0)
    mask = torch.zeros(4, 100)
    mask[0], mask[1, :2], mask[2, :50], mask[3, :7] = 1, 1, 1, 1
    advantages, old = torch.randn(4, 100), torch.randn(4, 100) * 0.01
    logprobs = (old + torch.randn(4, 100) * 0.1).requires_grad_()

    def gradient(parts, world_size=1):
        logprobs.grad = None
        normalizer = sum(ppo.aggregation_count(mask[rows], mode, 100) for rows in parts)
        for rows in parts:
            loss, _ = ppo.policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], 0.2, aggregation=mode,
                                      max_new_tokens=100, normalizer=normalizer)
            (loss * world_size / world_size).backward()  # x world size, then the strategy's average over ranks
        return logprobs.grad.clone()

    whole = gradient([torch.arange(4)])
    expected, _ = ppo.policy_loss(logprobs, old, advantages, mask, 0.2, aggregation=mode, max_new_tokens=100)
    logprobs.grad = None
    expected.backward()
    torch.testing.assert_close(whole, logprobs.grad)
    torch.testing.assert_close(gradient([torch.tensor([0, 1]), torch.tensor([2, 3])]), whole)  # micro-batches
    torch.testing.assert_close(gradient([torch.tensor([0, 2]), torch.tensor([1, 3])], world_size=2), whole)  # ranks
    if mode == "token_mean":  # every token weighs the same: 1 / 159 for the long and the short response alike
        unclipped = mask.bool() & (whole != 0)
        weights = whole[unclipped].abs() / advantages[unclipped].abs() / torch.exp(logprobs - old)[unclipped].detach()
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / 159))
        assert unclipped[1].sum() == 2 and unclipped[0].sum() > 50


def test_gspo_response_without_loss_tokens_has_a_finite_loss_and_gradient():
    """reward.mask_truncated leaves a truncated response no loss tokens: its sequence ratio is 1, not 0/0."""
    logprobs = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    loss, stats = ppo.policy_loss(logprobs, torch.zeros(2, 3), torch.ones(2, 3), mask, 3e-4, 4e-4, sequence_level=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert loss.item() == pytest.approx(-1.0)  # the mean over the one response that has loss tokens
    assert logprobs.grad[1].abs().sum() == 0


def test_gspo_weighs_responses_alike_whatever_their_length():
    """GSPO averages over responses: a 1-token and a 3-token response weigh 1/2 each (token_mean would give
    1/4 and 3/4)."""
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([[1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, _ = ppo.policy_loss(logprobs, old, advantages, mask, 0.2, sequence_level=True)  # token_mean asked for
    assert loss.item() == pytest.approx(0.0)  # (-1 + 1) / 2
    loss.backward()
    # d/dlogp of -mean_i(A_i * s_i): the 1-token response's token -1/2; each of the 3 tokens 1/2 / 3
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]]))


def test_compute_rewards_uses_the_estimator_it_is_given():
    logprobs, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    rewards, kl = ppo.compute_rewards(torch.tensor([2.0]), logprobs, ref, torch.ones(1, 2), 0.5, "k3")
    expected_kl = torch.tensor([[math.exp(-1) - 1 + 1, 0.0]])  # k3 of d = 1, then d = 0
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, torch.tensor([[-0.5 * expected_kl[0, 0].item(), 2.0]]))


def test_gspo_ratio_is_the_geometric_mean_of_the_token_ratios():
    """Token log-ratios 0.3 and 0.1 (and a padded one): the sequence ratio is exp(0.2), on both tokens."""
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[0.3, 0.1, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo.policy_loss(logprobs, old, torch.ones(1, 3), mask, 0.5, sequence_level=True)
    assert loss.item() == pytest.approx(-math.exp(0.2)) and stats["ratio"].item() == pytest.approx(math.exp(0.2))
    loss.backward()  # d(-s)/d logp_t = -s / 2 for each real token, 0 for the padded one
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-math.exp(0.2) / 2] * 2 + [0.0]]))


def test_token_weights_scale_each_tokens_term():
    old, advantages, mask = torch.zeros(1, 3), torch.tensor([[1.0, -2.0, 1.0]]), torch.ones(1, 3)
    weights = torch.tensor([[2.0, 0.5, 0.0]])
    loss, _ = ppo.policy_loss(torch.zeros(1, 3), old, advantages, mask, 0.2, token_weights=weights)
    assert loss.item() == pytest.approx((-1.0 * 2.0 + 2.0 * 0.5 + 0.0) / 3)


def test_value_loss_clips_both_ways_and_takes_a_normalizer():
    old, returns, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    values = torch.tensor([[0.5, -0.5]])  # moved 0.5 up and down, clip range 0.2: clipped to +-0.2
    loss, stats = ppo.value_loss(values, old, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.8**2 + 0.8**2) / 2)  # the clipped errors are the larger ones
    assert stats["clipfrac"].item() == 1.0
    halved, _ = ppo.value_loss(values, old, returns, mask, 0.2, normalizer=torch.tensor(4.0))
    assert halved.item() == pytest.approx(loss.item() / 2)


def test_masked_var_needs_two_entries_and_entropy_is_per_row():
    assert ppo.masked_var(torch.tensor([1.0, 3.0]), torch.ones(2)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least two"):
        ppo.masked_var(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0]))
    logits = torch.tensor([[0.0, 0.0], [0.0, 100.0]])
    torch.testing.assert_close(ppo.entropy_from_logits(logits), torch.tensor([math.log(2), 0.0]), atol=1e-6, rtol=0)


def test_aggregation_counts_and_their_errors():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert ppo.aggregation_count(mask, "token_mean").item() == 3
    assert ppo.aggregation_count(mask, "seq_mean_token_mean").item() == 2  # rows with a loss token
    assert ppo.aggregation_count(mask, "seq_mean_token_sum").item() == 2
    assert ppo.aggregation_count(mask, "seq_mean_token_sum_norm", 5).item() == 15
    with pytest.raises(ValueError, match="needs generation.max_new_tokens > 0"):
        ppo.aggregation_count(mask, "seq_mean_token_sum_norm", 0)
    with pytest.raises(ValueError, match="loss_aggregation='mean'"):
        ppo.aggregation_count(mask, "mean")
    assert ppo.overlong_penalty(torch.tensor([12]), 10, 4, 1.0).item() == -1.0  # never beyond the full penalty


def test_gspo_ratio_is_per_response():
    """Two responses (2 tokens and 1 token) with their own sequence ratios, not the batch's."""
    logprobs = torch.tensor([[0.2, 0.4], [0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _, stats = ppo.policy_loss(logprobs, torch.zeros(2, 2), torch.ones(2, 2), mask, 10.0, sequence_level=True)
    # ratios exp(0.3) on both tokens of the first response, exp(0.5) on the one token of the second
    assert stats["ratio"].item() == pytest.approx((2 * math.exp(0.3) + math.exp(0.5)) / 3)


def test_adaptive_kl_controller_moves_by_the_relative_error():
    controller = ppo.AdaptiveKLController(0.1, target=4.0, horizon=10)
    controller.update(current_kl=4.4, n_steps=1)  # 10% above target: coef x (1 + 0.1 / 10)
    assert controller.value == pytest.approx(0.1 * 1.01)
