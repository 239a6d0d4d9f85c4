"""Serving a distilled model: a PEFT LoRA adapter of the embedded model, given as --distilled NAME=PATH,
decodes directly as model NAME, exactly as the adapted model would."""

import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

from harness import tiny_models
from tests.conftest import API_KEY, MODEL, running_server
from tests.test_metrics_and_cancel import scrape

DISTILLED = "tuned"
PROMPT = "The capital of France is"


def save_lora(model_dir: Path, directory: Path) -> Path:
    """A rank-8 LoRA adapter with random (not zero) matrices, so that it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory) -> Path:
    return save_lora(model_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def server(model_dir, adapter, tmp_path_factory):
    log = tmp_path_factory.mktemp("distilled") / "server.log"
    flags = ("--dtype", "float32", "--max-model-len", "512", "--distilled", f"{DISTILLED}={adapter}")
    with running_server(model_dir, log, *flags) as (live, _):
        yield live


def test_models_lists_the_distilled_model(server, adapter):
    cards = {card.id: card for card in server.client().models.list().data}
    assert set(cards) == {MODEL, DISTILLED}
    assert cards[DISTILLED].parent == MODEL and cards[DISTILLED].root == str(adapter)


def test_distilled_model_decodes_as_the_adapted_model(server, adapter, model_dir):
    """Its outputs differ from the base model's, and its log-probabilities are those of a float32
    PEFT forward pass of base plus adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client = server.client()
    answers = {name: client.completions.create(model=name, prompt=PROMPT, max_tokens=12, logprobs=0,
                                               extra_body={"return_token_ids": True})
               for name in (MODEL, DISTILLED)}
    assert answers[DISTILLED].choices[0].token_ids != answers[MODEL].choices[0].token_ids
    assert answers[DISTILLED].sampler_usage["name"] == "distilled"
    choice = answers[DISTILLED].choices[0]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, adapter)
    ids = choice.prompt_token_ids + choice.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(adapted(torch.tensor([ids])).logits[0].double(), dim=-1)
    start = len(choice.prompt_token_ids)
    for i, token_id in enumerate(choice.token_ids):
        assert choice.logprobs.token_logprobs[i] == pytest.approx(reference[start + i - 1, token_id].item(),
                                                                  abs=2e-3)


def test_distilled_model_streams_takes_n_and_has_its_own_metrics(server):
    client = server.client()
    with server.http() as http:
        before = scrape(http)
        chat = client.chat.completions.create(model=DISTILLED, messages=[{"role": "user", "content": "Hi"}],
                                              max_completion_tokens=8, temperature=0)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=DISTILLED, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=8,
            temperature=0, stream=True))
        assert streamed == chat.choices[0].message.content
        several = client.completions.create(model=f"{DISTILLED}:direct", prompt=PROMPT, max_tokens=4, n=3,
                                            seed=1)
        assert len(several.choices) == 3
        after = scrape(http)
    key = ("powerserve_requests_total",
           frozenset({"model": DISTILLED, "sampler": "distilled", "outcome": "success"}.items()))
    assert after[key] - before.get(key, 0) == 3


def test_distilled_model_decodes_directly_only(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=DISTILLED, prompt=PROMPT, max_tokens=4,
                                           extra_body={"sampler": "power_mcmc"})
    assert caught.value.body["param"] == "sampler" and "distilled" in caught.value.body["message"]


def test_base_model_power_samplers_run_beside_adapters(server):
    """With adapters loaded, vLLM's CPU engine dies computing prompt log-probabilities (scoring).
    The base model's power samplers need none: power_mcmc's default proposal takes log p and log q
    from its own decoding pass. They run, on an engine that stays up."""
    client = server.client()
    for fields in ({"sampler": "power_mcmc", "mcmc_steps": 2},
                   {"sampler": "power_scalable", "candidates": 2, "rollouts": 2, "rollout_horizon": 2}):
        answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body=fields)
        assert answer.usage.completion_tokens >= 1 and answer.sampler_usage["engine_tokens_scored"] == 0
    with server.http() as http:
        assert http.get("/health").status_code == 200
        # Nor can the scoring route score here: a 400 that says why, for either model's name.
        for model in (MODEL, DISTILLED):
            scored = http.post("/v1/completion_logprob", json={"model": model, "prompt": PROMPT, "completion": " a"})
            assert scored.status_code == 400 and scored.json()["error"]["param"] == "model"
        assert http.get("/health").status_code == 200


def start_failure(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "server", "--api-key", API_KEY, *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_bad_adapters_end_with_a_clear_message(model_dir, tmp_path):
    missing = start_failure("--distilled", f"{DISTILLED}={tmp_path / 'nothing'}")
    assert missing.returncode == 2 and "is not a PEFT LoRA adapter directory" in missing.stderr
    # An adapter of another model: vLLM alone would load it and silently decode the base model.
    other = tiny_models.build(tmp_path / "tiny", seed=0, sharpness=1.0, eos_bias=0.0)
    misfit = start_failure("--distilled", f"{DISTILLED}={save_lora(other, tmp_path / 'misfit')}")
    assert misfit.returncode == 1 and "does not fit the model" in misfit.stderr
    clash = start_failure("--distilled", f"{MODEL}={save_lora(other, tmp_path / 'clash')}")
    assert clash.returncode == 1 and "already the base model's name" in clash.stderr
    for result in (missing, misfit, clash):
        assert "Traceback" not in result.stderr
