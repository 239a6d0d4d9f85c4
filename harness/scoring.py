"""A Hugging Face model's log p of a completion: the self-reward, when the model is the base model."""

import math


def completion_token_logps(model, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """log p of each completion token given the prompt and the tokens before it, under `model` (a
    float32 Hugging Face causal LM), temperature 1."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1:-1]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs.gather(1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1).tolist()


def completion_logp(model, prompt_ids: list[int], token_ids: list[int]) -> float:
    """log p(completion | prompt) under `model`, as completion_token_logps."""
    return math.fsum(completion_token_logps(model, prompt_ids, token_ids))
