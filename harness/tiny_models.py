"""Tiny random Llamas whose every completion can be enumerated, and exact distributions over them.

The vocabulary is three tokens, "a", "b" and the EOS "</s>"; completions of up to `T` tokens
either end with EOS or are cut at T. vLLM's CPU attention needs head_dim >= 32, so the model has
hidden size 64 with two heads; float32 keeps its logprobs within about 1e-6 of a float64 forward.
"""

import asyncio
import itertools
import json
import math
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from samplers import ChoiceDelta, DecodeParams, Sampler, Spend
from samplers.vllm_engine import BlockingModel

VOCAB = {"a": 0, "b": 1, "</s>": 2}
EOS = VOCAB["</s>"]
PROMPT = [0, 1, 0]
# The model the exactness tests share (conftest's `tiny`), with completions of at most MAX_TOKENS:
# p, temperature 1/4 and the MCMC chain without its length term are all far from p^4 (TV 0.39, 0.45
# and 0.22), while EOS holds half of p^4's mass.
SEED, SHARPNESS, EOS_TILT = 0, 12.0, 1.0
MAX_TOKENS = 3


def build(directory: Path, seed: int, sharpness: float, eos_bias: float, eos_ties_b: bool = False) -> Path:
    """A random 2-layer Llama; `sharpness` scales its output layer, `eos_bias` shifts EOS's logit;
    `eos_ties_b` gives EOS the output row of "b", so that the two tie exactly at every position."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
        # Tilting EOS's output row towards "a"'s gives EOS real mass wherever "a" is likely.
        model.lm_head.weight[EOS] = model.lm_head.weight[EOS] + eos_bias * model.lm_head.weight[0]
        if eos_ties_b:
            model.lm_head.weight[EOS] = model.lm_head.weight[VOCAB["b"]]
    model.save_pretrained(directory, safe_serialization=True)
    word_level = Tokenizer(WordLevel(VOCAB, unk_token="a"))
    word_level.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>",
                                        pad_token="</s>", unk_token="a")
    tokenizer.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    return directory


def completions(max_tokens: int) -> list[tuple[int, ...]]:
    """Every completion: ending with EOS after at most max_tokens - 1 tokens, or cut at max_tokens."""
    others = [t for t in VOCAB.values() if t != EOS]
    ended = [(*body, EOS) for n in range(max_tokens) for body in itertools.product(others, repeat=n)]
    cut = list(itertools.product(others, repeat=max_tokens))
    return ended + cut


def next_token_logprobs(directory: Path, prompt: list[int], max_tokens: int) -> dict[tuple, np.ndarray]:
    """log p(. | prompt + prefix) in float64, for every prefix a completion can have."""
    from transformers import LlamaForCausalLM

    return next_token_table(LlamaForCausalLM.from_pretrained(directory, dtype=torch.float64), prompt, max_tokens)


def next_token_table(model, prompt: list[int], max_tokens: int) -> dict[tuple, np.ndarray]:
    """next_token_logprobs of a loaded causal LM (in its own dtype, the result in float64)."""
    others = [t for t in VOCAB.values() if t != EOS]
    table = {}
    with torch.no_grad():
        for n in range(max_tokens):
            for prefix in itertools.product(others, repeat=n):
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1].double()
                table[prefix] = torch.log_softmax(logits, dim=-1).numpy()
    return table


def kept(row: np.ndarray, top_k: int) -> np.ndarray:
    """Which tokens a top-k cut keeps: every one that reaches the k-th largest value (all of them
    for k = 0). Values within 1e-9 count as tied, as the engine's equal logits are here."""
    if top_k == 0 or top_k >= len(row):
        return np.ones(len(row), dtype=bool)
    return row >= np.sort(row)[::-1][top_k - 1] - 1e-9


def sequence_logprob(table: dict, y: tuple, temperature: float = 1.0, top_k: int = 0) -> float:
    """log of the product of per-token probabilities, each next-token distribution at `temperature`
    and cut to its `top_k` most likely tokens (-inf for a completion with a token cut away)."""
    total = 0.0
    for t, token in enumerate(y):
        row = table[y[:t]]
        keep = kept(row, top_k)
        if not keep[token]:
            return -math.inf
        total += row[token] / temperature - np.logaddexp.reduce(row[keep] / temperature)
    return total


def normalise(logw: dict) -> dict:
    top = max(logw.values())
    weights = {y: math.exp(v - top) for y, v in logw.items()}
    total = sum(weights.values())
    return {y: w / total for y, w in weights.items()}


def power_distribution(table: dict, max_tokens: int, alpha: float, top_k: int = 0) -> dict:
    """p^alpha, over the completions whose every token survives a top-k cut (all for k = 0)."""
    return normalise({y: alpha * sequence_logprob(table, y) for y in completions(max_tokens)
                      if sequence_logprob(table, y, top_k=top_k) > -math.inf})


def tempered_distribution(table: dict, max_tokens: int, temperature: float, top_k: int = 0) -> dict:
    return normalise({y: sequence_logprob(table, y, temperature, top_k) for y in completions(max_tokens)})


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(y, 0.0) - b.get(y, 0.0)) for y in set(a) | set(b))


def noise_bound(law: dict, samples: int, failure_probability: float) -> float:
    """TV(empirical, law) of `samples` independent draws stays below this but with the given probability.

    E[TV] <= 1/2 sum_y sqrt(law(y)(1 - law(y)) / S) (Cauchy-Schwarz per outcome), and TV is a
    function of S independent draws that moves by at most 1/S when one draw changes, so by
    McDiarmid it exceeds its mean by t with probability at most exp(-2 S t^2).
    """
    mean = 0.5 * sum(math.sqrt(p * (1 - p) / samples) for p in law.values())
    return mean + math.sqrt(math.log(1 / failure_probability) / (2 * samples))


def mcmc_distribution(table: dict, max_tokens: int, alpha: float, steps: int,
                      proposal_temperature: float = 1.0, length_term: bool = True, top_k: int = 0,
                      assumed_log_q=None) -> dict:
    """The exact law of a one-block chain after `steps` steps (docs/samplers.md, power_mcmc).

    It starts from a proposal draw (at `proposal_temperature`, cut to `top_k`) and each step
    resamples from a uniform index m. With `length_term=False` it is the published code's chain,
    without log(L / L'); `assumed_log_q(y)`, when given, is the log q its acceptance test uses in
    place of the true one (a sampler that gets q wrong).
    """
    states = [y for y in completions(max_tokens) if sequence_logprob(table, y, top_k=top_k) > -math.inf]
    index = {y: i for i, y in enumerate(states)}
    logp = {y: sequence_logprob(table, y) for y in states}
    logq = {y: sequence_logprob(table, y, proposal_temperature, top_k) for y in states}
    used_logq = logq if assumed_log_q is None else {y: assumed_log_q(y) for y in states}
    kernel = np.zeros((len(states), len(states)))
    for y in states:
        for m in range(len(y)):
            for z in states:  # proposals from index m: completions sharing y's first m tokens
                if z[:m] != y[:m] or len(z) <= m:
                    continue
                # the shared prefix cancels out of every difference below
                log_a = alpha * (logp[z] - logp[y]) + (used_logq[y] - used_logq[z])
                if length_term:
                    log_a += math.log(len(y) / len(z))
                q_suffix = logq[z] - sequence_logprob(table, z[:m], proposal_temperature, top_k)
                kernel[index[y], index[z]] += math.exp(q_suffix) / len(y) * min(1.0, math.exp(log_a))
        kernel[index[y], index[y]] += 1.0 - kernel[index[y]].sum()
    law = np.array([math.exp(logq[y]) for y in states])
    for _ in range(steps):
        law = law @ kernel
    return dict(zip(states, law))


def smc_distribution(table: dict, max_tokens: int, alpha: float, particles: int, ess_threshold: float,
                     reps: int, seed: int = 0) -> tuple[dict, float]:
    """The law of a power_smc completion (untruncated proposal, a check after every token,
    systematic resampling), simulated on the exact table, and a bound on its Monte Carlo error.

    `reps` independent runs, synchronous token by token (the sampler's particles run ahead of its
    checks, which leaves the law unchanged); each run adds its particles' final normalised weights,
    the law of its weighted draw. One run moves the average by at most 1/reps in total variation,
    so noise_bound's McDiarmid bound (failure probability 1e-4) holds for it.
    """
    rng = np.random.default_rng(seed)
    others = [t for t in VOCAB.values() if t != EOS]
    tokens = np.full((reps, particles, max_tokens), -1, dtype=np.int8)
    ended = np.zeros((reps, particles), dtype=bool)
    log_w = np.zeros((reps, particles))
    for t in range(max_tokens):
        live = ~ended
        for prefix in itertools.product(others, repeat=t):
            here = live & np.all(tokens[:, :, :t] == np.array(prefix, dtype=np.int8), axis=-1)
            if not here.any():
                continue
            row = alpha * table[prefix]
            log_z = np.logaddexp.reduce(row)
            drawn = rng.choice(len(row), size=int(here.sum()), p=np.exp(row - log_z))
            tokens[here, t] = drawn
            ended[here] = drawn == EOS
            log_w[here] += log_z  # the incremental weight Z_t of power_smc in docs/samplers.md
        if t + 1 == max_tokens:
            break
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        resample = (1 / (w ** 2).sum(axis=1) / particles < ess_threshold) & ~ended.all(axis=1)
        points = np.arange(particles) + rng.random((int(resample.sum()), 1))
        edges = np.cumsum(w[resample] * particles, axis=1)
        edges[:, -1] = particles
        parents = (edges[:, None, :] <= points[:, :, None]).sum(axis=-1)
        tokens[resample] = np.take_along_axis(tokens[resample], parents[:, :, None], axis=1)
        ended[resample] = np.take_along_axis(ended[resample], parents, axis=1)
        log_w[resample] = 0.0
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    codes = {y: sum((token + 1) * 4 ** i for i, token in enumerate(y)) for y in completions(max_tokens)}
    particle_codes = ((tokens.astype(np.int64) + 1) * 4 ** np.arange(max_tokens)).sum(axis=-1)
    mass = np.bincount(particle_codes.ravel(), weights=w.ravel(), minlength=4 ** (max_tokens + 1)) / reps
    law = {y: float(mass[code]) for y, code in codes.items()}
    return law, noise_bound(law, reps, 1e-4)


class TinyEngine(BlockingModel):
    """A real vLLM engine on a tiny model, with an event loop of its own, that draws completions."""

    def __init__(self, directory: Path, **engine_flags):
        super().__init__(str(directory), enforce_eager=True, dtype="float32", max_model_len=64,
                         kv_cache_memory_bytes=256 << 20, **engine_flags)

    def draw(self, sampler: Sampler, count: int, decode: DecodeParams, params: BaseModel
             ) -> list[tuple[list[ChoiceDelta], Spend]]:
        """`count` independent completions of PROMPT, 64 to a request, all requests at once; each
        request's choices (their deltas joined) and spend."""

        async def one_request() -> tuple[list[ChoiceDelta], Spend]:
            spend = Spend()
            choices = [ChoiceDelta(i, [], "", None if decode.logprobs is None else []) for i in range(64)]
            async for delta in sampler.sample(self.model, PROMPT, replace(decode, n=64), params,
                                              uuid.uuid4().hex, spend):
                choice = choices[delta.index]
                choice.token_ids += delta.token_ids
                choice.text += delta.text
                choice.logprobs = None if delta.logprobs is None else choice.logprobs + delta.logprobs
                choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            return choices, spend

        async def all_requests():
            return await asyncio.gather(*(one_request() for _ in range(count // 64)))

        return self.run(all_requests())


def suffixes(table: dict, prefix: tuple, max_tokens: int) -> tuple[list[tuple], np.ndarray]:
    """Every way `prefix` (not ended) can go on to a completion, with its log p given the prefix."""
    base = sequence_logprob(table, prefix)
    after = [y[len(prefix):] for y in completions(max_tokens) if y[:len(prefix)] == prefix and len(y) > len(prefix)]
    return after, np.array([sequence_logprob(table, prefix + s) - base for s in after])


def scalable_step_law(table: dict, prefix: tuple, max_tokens: int, alpha: float, rollouts: int,
                      jackknife: bool, reps: int, rng: np.random.Generator,
                      proposal: str = "base") -> tuple[np.ndarray, np.ndarray]:
    """The law of power_scalable's next token after `prefix`, token level with every token a
    candidate and rollouts to the end: E over the rollouts of the candidate probabilities.
    Rollouts come from p ('base', weight p^(alpha-1)) or from p at temperature 1/alpha
    ('tempered', weight p^alpha / q).

    Monte Carlo over `reps` sets of rollouts; returns the law and its standard errors.
    """
    from samplers.power_scalable import candidate_probabilities

    tokens = sorted(VOCAB.values())
    rollout_terms = np.zeros((reps, len(tokens), rollouts))
    for c in tokens:
        if c != EOS and len(prefix) + 1 < max_tokens:
            law, terms = rollout_law(table, prefix + (c,), max_tokens, alpha, proposal)
            rollout_terms[:, c] = rng.choice(terms, size=(reps, rollouts), p=law)
    probabilities = candidate_probabilities(alpha * table[prefix][tokens], rollout_terms, jackknife)
    return probabilities.mean(axis=0), probabilities.std(axis=0) / math.sqrt(reps)


def rollout_law(table: dict, prefix: tuple, max_tokens: int, alpha: float, proposal: str) -> tuple[np.ndarray, np.ndarray]:
    """The law of a rollout after `prefix` to the end, over every way it can go on, and each way's
    log importance weight for p^alpha: drawn from p ('base') or at temperature 1/alpha ('tempered')."""
    after, logp = suffixes(table, prefix, max_tokens)
    if proposal == "base":
        return np.exp(logp), (alpha - 1.0) * logp
    start = sequence_logprob(table, prefix, 1.0 / alpha)
    logq = np.array([sequence_logprob(table, prefix + s, 1.0 / alpha) - start for s in after])
    law = np.exp(logq)
    return law / law.sum(), alpha * logp - logq


def scalable_distribution(table: dict, max_tokens: int, alpha: float, rollouts: int, jackknife: bool,
                          reps: int, seed: int = 0, proposal: str = "base") -> tuple[dict, float]:
    """The law of a power_scalable completion (token level, every token a candidate), and a bound
    on its Monte Carlo error in total variation.

    A completion's law is the product of its step laws. TV between two such sequential laws is at
    most the sum over steps of the expected TV of the step laws (couple step by step), and each
    step's error is below 5 standard errors per token with overwhelming probability.
    """
    rng = np.random.default_rng(seed)
    steps = {}
    for n in range(max_tokens):
        for prefix in itertools.product([t for t in VOCAB.values() if t != EOS], repeat=n):
            steps[prefix] = scalable_step_law(table, prefix, max_tokens, alpha, rollouts, jackknife,
                                              reps, rng, proposal)
    law = {}
    for y in completions(max_tokens):
        law[y] = math.prod(steps[y[:t]][0][token] for t, token in enumerate(y))
    error = 0.0
    for prefix, (_, standard_error) in steps.items():
        reach = sum(q for y, q in law.items() if y[:len(prefix)] == prefix and len(y) > len(prefix))
        error += reach * 0.5 * 5 * standard_error.sum()
    return law, error


def block_choice_distribution(table: dict, max_tokens: int, alpha: float, draws: int, weighting: str,
                              reps: int, seed: int = 0) -> tuple[dict, float]:
    """The law of power_scalable's choice among `draws` whole completions (one block of max_tokens,
    nothing left to roll out, every distinct draw kept), and its Monte Carlo error.

    'importance' and 'power' draw from p, each draw weighing p^(alpha-1) or p^alpha; 'tempered'
    draws from p at temperature 1/alpha, each weighing p^alpha / q. A completion drawn k times
    weighs k times as much.
    """
    rng = np.random.default_rng(seed)
    states = completions(max_tokens)
    logp = np.array([sequence_logprob(table, y) for y in states])
    if weighting == "tempered":
        logq = np.array([sequence_logprob(table, y, 1.0 / alpha) for y in states])
        log_weight = alpha * logp - logq
    else:
        logq, log_weight = logp, (alpha - (weighting == "importance")) * logp
    law = np.exp(logq)
    counts = rng.multinomial(draws, law / law.sum(), size=reps)
    weights = counts * np.exp(log_weight - log_weight.max())
    choice = weights / weights.sum(axis=1, keepdims=True)
    error = 0.5 * 5 * (choice.std(axis=0) / math.sqrt(reps)).sum()
    return dict(zip(states, choice.mean(axis=0))), error
