"""On-policy routes to the power distribution, on TRL's GRPOTrainer with a PEFT LoRA adapter.

- Self-reward RL (docs/distillation.md): the policy pi maximises
      J(pi) = E_pi[alpha log p(y) - log pi(y)] = alpha E_pi[log p] + H(pi),
  the expected reward alpha log p_base(y) plus pi's entropy. With pi_alpha = p^alpha / Z,
  J(pi) = log Z - KL(pi || pi_alpha), so J has one maximum, pi = pi_alpha, and no other stationary
  point (it is E_pi[log p] - beta KL(pi || p) with beta = 1/(alpha - 1), times alpha - 1). Its
  gradient is E_pi[(alpha log p(y) - log pi(y)) grad log pi(y)], the term E_pi[grad log pi] from
  differentiating -log pi being zero: REINFORCE with the sequence reward
      r(y) = alpha log p(y) - log pi(y),
  log pi taken at the weights that drew y and not differentiated. The baseline is the mean r of
  the G completions of the same prompt: the others are independent of y_i and their term has mean
  zero, y_i's own share is 1/G, so E[(r_i - mean r) grad log pi(y_i)] = (G - 1)/G grad J, the
  exact gradient up to a constant. These advantages replace GRPO's (trainer_class); with one
  gradient step per batch GRPO's importance ratio is 1, so its loss is the REINFORCE loss
  -(A_i sum_t log pi(y_t)), and `dr_grpo` divides it by a constant. GRPO's own KL term is off
  (beta = 0): its per-token k3 estimate, multiplied by the differentiable importance ratio as TRL
  does by default (`use_bias_correction_kl`), gives at each position the gradient of that
  position's reverse KL with the earlier tokens held fixed, which ignores how a token changes the
  KL of the tokens after it. That is not the gradient of the sequence's KL(pi || p), and its fixed
  point is not p^alpha: trained to convergence on the tests' enumerable model with alpha = 4 it
  ends about 0.12 in total variation from p^alpha, where J's ends within 0.002
  (tests/test_onpolicy_exact.py).
- On-policy distillation (docs/distillation.md): the student samples, the teacher scores each
  of the student's tokens, and the per-token reward (distill/rewards.py: the log-ratio, or
  PowerOPD's bounded p_T^a - p_S^a) replaces GRPO's advantage at that token. With one gradient
  step per batch GRPO's importance ratio is exactly 1, so its loss is then exactly the REINFORCE
  loss -(r_t.detach() * log p_S(y_t)). The teacher is any model the engine can load, or
  power_scalable's token-level power conditional on the base model (on-policy power
  self-distillation); both run on a vLLM engine in this process.

Each step logs the mean self-reward `reward` (log p_base(y)), `kl_to_base` (the mean over
completions of sum_t log pi(y_t) - log p(y_t), an unbiased estimate of KL(pi || p) on pi's own
samples), `grad_norm` and `loss`; self-reward RL also logs `objective`, the mean r(y) (an
unbiased estimate of J(pi)), and on-policy distillation `token_reward`.
"""

import asyncio
import json
import math
import uuid
from pathlib import Path

from distill.rewards import token_rewards
from harness.cli import UsageError
from samplers.base import Spend


class SelfReward:
    """The GRPO reward function log p(y|x) under the base model: the self-reward of every method."""

    __name__ = "self_reward"

    def __init__(self, base_model: Path, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[list[dict]], completion_ids: list[list[int]], **_) -> list[float]:
        from harness.scoring import completion_logp

        # The same chat template call that GRPOTrainer tokenises its prompts with.
        prompt_ids = self.tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]
        return [completion_logp(self.model, p, c) for p, c in zip(prompt_ids, completion_ids)]


class ModelTeacher:
    """A teacher model on the engine: log p_T(y_t) is its own log-probability of the student's token."""

    def __init__(self, engine):
        self.engine = engine

    def token_logps(self, prompts: list[list[int]], completions: list[list[int]], budget: int) -> list[list[float]]:
        model = self.engine.model

        async def score_all():
            scored = await asyncio.gather(*(model.score(p + c, len(p), uuid.uuid4().hex, Spend())
                                            for p, c in zip(prompts, completions)))
            return [[t.logprob for t in tokens] for tokens in scored]

        return self.engine.run(score_all())


class PowerTeacher:
    """power_scalable's token-level conditional of p^alpha on the base model: p_T(y_t) is its estimate
    of pi_alpha(y_t | prefix), 0 when y_t is not among its K candidates (log p_T = -inf)."""

    def __init__(self, engine, params):
        self.engine = engine
        self.params = params

    def token_logps(self, prompts: list[list[int]], completions: list[list[int]], budget: int) -> list[list[float]]:
        from samplers.power_scalable import next_token_law

        async def one(prompt: list[int], completion: list[int], t: int) -> float:
            law = await next_token_law(self.engine.model, prompt + completion[:t], budget - t, self.params,
                                       uuid.uuid4().hex)
            return math.log(law[completion[t]]) if law.get(completion[t], 0.0) > 0 else -math.inf

        async def all_positions():
            # Every position of every completion at once: the engine batches the probes and rollouts.
            return await asyncio.gather(*(asyncio.gather(*(one(p, c, t) for t in range(len(c))))
                                          for p, c in zip(prompts, completions)))

        return [list(row) for row in self.engine.run(all_positions())]


POWER_TEACHER = "power_scalable"


def parse_teacher(spec: str) -> tuple[str, dict]:
    """`power_scalable` or `power_scalable:{json params}`, or a model directory -> (kind, details)."""
    name, _, fields = spec.partition(":")
    if name == POWER_TEACHER:
        from pydantic import ValidationError

        from samplers.power_scalable import PowerScalableParams

        try:
            # Token level unless told otherwise, which is refused below.
            params = PowerScalableParams(**{"block_size": 1, **json.loads(fields or "{}")})
        except (json.JSONDecodeError, TypeError, ValidationError) as exc:
            raise UsageError(f"--opd-teacher {spec!r}: not power_scalable's parameters as JSON: {exc}") from None
        if params.block_size != 1:
            raise UsageError("--opd-teacher power_scalable: the teacher's conditional is per token; "
                             "block_size must be 1")
        return POWER_TEACHER, params.model_dump(exclude_unset=True)
    if not (Path(spec) / "config.json").is_file():
        raise UsageError(f"--opd-teacher {spec!r} is neither power_scalable nor a Hugging Face model directory")
    return "model", {"path": str(Path(spec).resolve())}


def open_teacher(spec: str, base_model: Path, power_alpha: float, enforce_eager: bool = False):
    """The engine and the teacher of `spec` (see parse_teacher); power_scalable's alpha defaults to
    `power_alpha`; `enforce_eager` starts the engine without torch compilation. The engine must be
    closed by the caller."""
    from samplers.power_scalable import PowerScalableParams
    from samplers.vllm_engine import BlockingModel

    kind, details = parse_teacher(spec)
    if kind == "model":
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(details["path"]).get_vocab() != AutoTokenizer.from_pretrained(
                base_model).get_vocab():
            raise UsageError(f"--opd-teacher {spec}: its tokenizer is not the base model's, so it cannot "
                             "score the student's tokens")
    model = str(base_model if kind == POWER_TEACHER else details["path"])
    engine = BlockingModel(model, enforce_eager=enforce_eager)
    if kind == POWER_TEACHER:
        return engine, PowerTeacher(engine, PowerScalableParams(**{"power_alpha": power_alpha, **details}))
    return engine, ModelTeacher(engine)


def trainer_class():
    """GRPOTrainer with the KL to the base model logged at every step and, given `power_alpha`, the
    self-reward advantages of J (module docstring) or, given a teacher, per-token distillation
    rewards in place of its advantages (defined here: TRL loads lazily)."""
    import torch
    from trl import GRPOTrainer

    class OnPolicyTrainer(GRPOTrainer):
        def __init__(self, *args, power_alpha: float | None = None, teacher=None, reward_kind: str = "power",
                     exponent: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.power_alpha, self.teacher = power_alpha, teacher
            self.reward_kind, self.exponent = reward_kind, exponent

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
            completion_ids, mask = output["completion_ids"], output["completion_mask"]
            ids, attention = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, mask], 1)

            def completion_logps():
                return self._get_per_token_logps_and_entropies(self.model, ids, attention, completion_ids.size(1))[0]

            with torch.no_grad():
                student = completion_logps()
                with self.accelerator.unwrap_model(self.model).disable_adapter():
                    base = completion_logps()
            log_pi, log_p = (student * mask).sum(1), (base * mask).sum(1)
            self._metrics["train"]["kl_to_base"].append((log_pi - log_p).mean().item())
            if self.power_alpha is not None:
                reward = self.power_alpha * log_p - log_pi  # r(y) of the module docstring
                groups = reward.view(-1, self.num_generations)  # GRPO's batches hold whole groups, in order
                output["advantages"] = (groups - groups.mean(1, keepdim=True)).flatten()
                self._metrics["train"]["objective"].append(reward.mean().item())
            if self.teacher is None:
                return output
            prompts = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids, prompt_mask)]
            completions = [row[keep.bool()].tolist() for row, keep in zip(completion_ids, mask)]
            teacher = torch.zeros_like(student)
            for i, row in enumerate(self.teacher.token_logps(prompts, completions, self.max_completion_length)):
                teacher[i, :len(row)] = torch.tensor(row)
            rewards = token_rewards(self.reward_kind, self.exponent, teacher, student) * mask
            output["advantages"] = rewards
            self._metrics["train"]["token_reward"].append((rewards.sum() / mask.sum().clamp(min=1)).item())
            return output

    return OnPolicyTrainer
