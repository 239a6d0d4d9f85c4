"""The on-policy methods' rewards and teachers (distill/rewards.py, distill/onpolicy.py), checked
against values computed by hand and against the exact laws of a tiny enumerable model."""

import math

import numpy as np
import pytest
import torch

from distill import rewards
from distill.onpolicy import ModelTeacher, PowerTeacher, SelfReward
from harness import tiny_models
from samplers.power_scalable import PowerScalableParams


@pytest.mark.fast
def test_log_ratio_by_hand():
    teacher, student = torch.tensor([math.log(0.5), math.log(0.1)]), torch.tensor([math.log(0.25), math.log(0.4)])
    assert rewards.log_ratio(teacher, student).tolist() == pytest.approx([math.log(2), math.log(0.25)])


@pytest.mark.fast
def test_log_ratio_floors_a_teacher_probability_of_zero():
    """power_scalable's teacher gives 0 outside its candidates: the log-ratio would be -inf."""
    reward = rewards.log_ratio(torch.tensor([-math.inf]), torch.tensor([math.log(0.5)]))
    assert reward.item() == pytest.approx(math.log(rewards.TEACHER_PROBABILITY_FLOOR / 0.5))


@pytest.mark.fast
def test_power_reward_by_hand():
    teacher, student = torch.tensor([math.log(0.5), -math.inf]), torch.tensor([math.log(0.25), math.log(0.9)])
    # 0.5^2 - 0.25^2 = 0.1875; 0^2 - 0.9^2 = -0.81
    assert rewards.power(teacher, student, 2.0).tolist() == pytest.approx([0.1875, -0.81])
    assert rewards.token_rewards("power", 2.0, teacher, student).tolist() == pytest.approx([0.1875, -0.81])
    assert rewards.token_rewards("log-ratio", 2.0, teacher[:1], student[:1]).tolist() == pytest.approx([math.log(2)])


@pytest.mark.fast
@pytest.mark.parametrize("exponent", [1e-3, 0.5, 1.0, 5.0, 50.0])
def test_power_reward_stays_within_minus_one_and_one(exponent):
    generator = torch.Generator().manual_seed(0)
    logps = -torch.rand(2, 10_000, generator=generator, dtype=torch.float64) * 30
    logps[:, :3] = torch.tensor([[0.0, -math.inf, 0.0], [-math.inf, 0.0, 0.0]], dtype=torch.float64)  # the extremes
    reward = rewards.power(logps[0], logps[1], exponent)
    assert reward.min() >= -1 and reward.max() <= 1
    assert reward[:3].tolist() == [1.0, -1.0, 0.0]


@pytest.mark.fast
def test_power_reward_over_its_exponent_tends_to_the_log_ratio():
    """(p_T^a - p_S^a)/a = log p_T - log p_S + (a/2)(log^2 p_T - log^2 p_S) + O(a^2): the error
    shrinks in proportion to a, and at a = 1e-6 it is below 1e-4 for log p down to -10."""
    teacher = torch.tensor([-0.1, -2.0, -10.0, -5.0], dtype=torch.float64)
    student = torch.tensor([-3.0, -0.5, -1.0, -5.0], dtype=torch.float64)
    exact = rewards.log_ratio(teacher, student)
    errors = [(rewards.power(teacher, student, a) / a - exact).abs().max().item() for a in (1e-2, 1e-4, 1e-6)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4
    assert errors[1] == pytest.approx(errors[0] / 100, rel=0.05)


def test_self_reward_is_the_base_models_log_likelihood_of_the_completion(model_dir):
    """By hand: the chat-templated prompt and the completion in one forward pass, the log-softmax
    of each completion token's logit summed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reward = SelfReward(model_dir, tokenizer)
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    completion = tokenizer.encode("2 + 2 = 4.", add_special_tokens=False)
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion])).logits[0]
    by_hand = sum(torch.log_softmax(logits[len(prompt_ids) - 1 + i], -1)[token].item()
                  for i, token in enumerate(completion))
    # The reward scores both completions as one padded batch; float32 matrix products over another
    # batch shape sum in another order, which moved this sum over a few tokens by 1.2e-4 under PyTorch's AVX2
    # kernels. A wrong token or position would move it by nats.
    assert reward([prompt, prompt], [completion, completion[:2]]) == pytest.approx(
        [by_hand, by_hand - sum(torch.log_softmax(logits[len(prompt_ids) + 1 + i], -1)[t].item()
                                for i, t in enumerate(completion[2:]))], abs=1e-3)


MAX_TOKENS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tiny_models.build(tmp_path_factory.mktemp("tiny-teacher"), seed=3, sharpness=3.0, eos_bias=1.0)
    engine = tiny_models.TinyEngine(directory)
    yield directory, engine, tiny_models.next_token_logprobs(directory, tiny_models.PROMPT, MAX_TOKENS)
    engine.close()


def test_model_teacher_gives_the_models_own_log_probabilities(tiny):
    _, engine, table = tiny
    a, b, eos = tiny_models.VOCAB["a"], tiny_models.VOCAB["b"], tiny_models.EOS
    completions = [[a, b, eos], [b]]
    logps = ModelTeacher(engine).token_logps([tiny_models.PROMPT] * 2, completions, MAX_TOKENS)
    for completion, row in zip(completions, logps):
        exact = [table[tuple(completion[:t])][token] for t, token in enumerate(completion)]
        assert row == pytest.approx(exact, abs=1e-5)  # float32 engine against a float64 forward


def test_power_teacher_estimates_power_scalables_next_token_law(tiny):
    """The teacher's p_T(y_t) is power_scalable's candidate probability of y_t: averaged over 400
    independent estimates it matches that probability's expectation, computed from the exact
    rollout law (tiny_models.scalable_step_law, itself a Monte Carlo average), within 5 standard
    errors of the difference (a false alarm about once in 1.7 million runs); with
    K = 2 candidates the least likely token is never among them and gets probability 0."""
    _, engine, table = tiny
    a, b = tiny_models.VOCAB["a"], tiny_models.VOCAB["b"]
    params = PowerScalableParams(power_alpha=4.0, block_size=1, candidates=3, rollouts=2, rollout_horizon=64)
    teacher = PowerTeacher(engine, params)
    completion, reps = [a, b], 400
    logps = np.array(teacher.token_logps([tiny_models.PROMPT] * reps, [completion] * reps, MAX_TOKENS))
    estimates = np.exp(logps[:, 1])  # the law after "a" of the token "b"
    expected, expected_error = tiny_models.scalable_step_law(table, (a,), MAX_TOKENS, 4.0, 2, True, 20_000,
                                                             np.random.default_rng(0), params.proposal)
    error = math.hypot(estimates.std() / math.sqrt(reps), expected_error[b])
    assert abs(estimates.mean() - expected[b]) < 5 * error

    narrow = PowerTeacher(engine, params.model_copy(update={"candidates": 2}))
    likeliest = max((a, b), key=lambda token: table[()][token])  # always a candidate
    least = int(np.argmin(table[(likeliest,)]))
    logps = narrow.token_logps([tiny_models.PROMPT], [[likeliest, least]], MAX_TOKENS)[0]
    assert math.isfinite(logps[0]) and logps[1] == -math.inf
