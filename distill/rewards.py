"""Per-token rewards of on-policy distillation (docs/distillation.md).

Both score the student's own token y_t from the teacher's and the student's log-probabilities of it.
The student ascends E[sum_t r_t] with the REINFORCE loss -(r_t.detach() * log p_S(y_t)).
"""

import math

import torch

# A teacher may give a token probability 0 (power_scalable's conditional is 0 outside its K
# candidates), where the log-ratio is -inf. It is floored at this probability; the bounded power
# reward needs no floor.
TEACHER_PROBABILITY_FLOOR = 1e-6
LOG_TEACHER_FLOOR = math.log(TEACHER_PROBABILITY_FLOOR)


def log_ratio(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Vanilla on-policy distillation: r_t = log p_T(y_t) - log p_S(y_t), minus the per-token
    estimate of the reverse KL(p_S || p_T). Unbounded below."""
    return teacher_logp.clamp(min=LOG_TEACHER_FLOOR) - student_logp


def power(teacher_logp: torch.Tensor, student_logp: torch.Tensor, exponent: float) -> torch.Tensor:
    """PowerOPD: r_t = p_T(y_t)^a - p_S(y_t)^a, in [-1, 1]; r_t / a tends to the log-ratio as a -> 0."""
    return torch.exp(exponent * teacher_logp) - torch.exp(exponent * student_logp)


def token_rewards(kind: str, exponent: float, teacher_logp: torch.Tensor, student_logp: torch.Tensor
                  ) -> torch.Tensor:
    """The per-token reward named `kind` ('log-ratio' or 'power')."""
    if kind == "log-ratio":
        return log_ratio(teacher_logp, student_logp)
    return power(teacher_logp, student_logp, exponent)
