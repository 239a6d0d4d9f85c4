"""The on-policy trainers' fixed points, checked against exact laws on the tiny enumerable Llama.

Each test trains the tiny model's LoRA adapter with the project's own GRPO trainer
(distill/train.py `grpo_trainer`, distill/onpolicy.py) on its one prompt, then enumerates the
trained policy's law over every completion and compares it with p^alpha.

Thresholds: the exact expected-gradient flows of the objectives, run to convergence on a table of
the model's next-token logits (7 prefixes, 3 tokens), end at these total variations from p^4:
self-reward's J (distill/onpolicy.py) at 0, TRL's KL term at 0.112, and PowerOPD's at 0, since its
per-token reward is zero only at the teacher's law. The trainer adds two errors: the LoRA
adapter's reach, and the noise of 200 steps of 32 completions with a learning rate that decays to
0, which measured runs put at 0.001-0.003 (TV 0.014 after 100 steps). 0.04 sits a third of the
way from 0 to 0.112: a run that misses it is not at the fixed point its objective claims.
"""

import json
import math

import pytest
import torch

from distill.train import TrainSettings, grpo_trainer
from harness import tiny_models as tm

ALPHA = 4.0
STEPS, GENERATIONS = 200, 32
TOLERANCE = 0.04
# GRPO's KL weight for the objective E[log p] - beta KL(pi || p), beta = 1/(alpha - 1), with
# its group-mean baseline: what distill/train.py used before it dropped the KL term.
PREVIOUS_BETA = (GENERATIONS - 1) / GENERATIONS / (ALPHA - 1)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to share between threads: one thread trains it faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_tiny(tiny):
    """The tiny model with a chat template that renders the user's text alone, so that the
    trainer's chat prompt "a b a" is exactly the token ids tm.PROMPT."""
    directory, table = tiny
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    config_path.write_text(json.dumps(config))
    return directory, table


class ExactPowerTeacher:
    """p^alpha's exact next-token conditional, the law power_scalable's teacher estimates:
    p_T(y_t | prefix) = the mass of p^alpha on completions that extend prefix + y_t, over that on
    completions that extend prefix."""

    def __init__(self, law: dict):
        self.law = law

    def mass(self, prefix: tuple) -> float:
        return sum(w for y, w in self.law.items() if y[:len(prefix)] == prefix and len(y) >= len(prefix))

    def token_logps(self, prompts, completions, budget) -> list[list[float]]:
        return [[math.log(self.mass(tuple(c[:t + 1])) / self.mass(tuple(c[:t]))) for t in range(len(c))]
                for c in completions]


def trained_law(directory, tmp_path, method: str, teacher=None, previous_objective: bool = False) -> dict:
    settings = TrainSettings(method=method, epochs=1, learning_rate=3e-3, batch_size=GENERATIONS,
                             generations=GENERATIONS, save_steps=STEPS, power_alpha=ALPHA)
    prompts = {"texts": ["a b a"] * STEPS, "max_tokens": tm.MAX_TOKENS}
    trainer = grpo_trainer(prompts, tmp_path / "checkpoints", directory, settings, teacher)
    if previous_objective:  # TRL's advantages on the reward log p, and its KL term
        trainer.power_alpha, trainer.beta = None, PREVIOUS_BETA
    trainer.train()
    table = tm.next_token_table(trainer.model.eval(), tm.PROMPT, tm.MAX_TOKENS)
    return tm.normalise({y: tm.sequence_logprob(table, y) for y in tm.completions(tm.MAX_TOKENS)})


def test_self_reward_converges_to_p_alpha_and_grpos_kl_term_does_not(chat_tiny, tmp_path):
    directory, table = chat_tiny
    target = tm.power_distribution(table, tm.MAX_TOKENS, ALPHA)
    start = tm.total_variation(tm.tempered_distribution(table, tm.MAX_TOKENS, 1.0), target)
    ours = tm.total_variation(trained_law(directory, tmp_path / "ours", "self-reward"), target)
    previous = tm.total_variation(trained_law(directory, tmp_path / "previous", "self-reward",
                                              previous_objective=True), target)
    assert start > 0.3
    assert ours < TOLERANCE < previous, (ours, previous)


def test_power_opd_converges_to_its_teachers_per_token_law(chat_tiny, tmp_path):
    """With p^alpha's exact conditional as teacher, the student's every per-token law is the
    teacher's, so its sequence law is p^alpha."""
    directory, table = chat_tiny
    target = tm.power_distribution(table, tm.MAX_TOKENS, ALPHA)
    law = trained_law(directory, tmp_path, "opd", ExactPowerTeacher(target))
    assert tm.total_variation(law, target) < TOLERANCE
