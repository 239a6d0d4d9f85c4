"""The teacher stage: power samples of the base model, one JSON line per sample.

Each prompt is sent as a chat message to a power sampling server (ours on the base model, started
for the run, or any at --base-url), seed = the prompt's index. Every sample is appended to
WORKDIR/teacher.jsonl as soon as it arrives, with the settings it was made under, so a rerun skips
the prompts already done: an interrupted run loses at most the samples in flight.
"""

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from harness.cli import UsageError
from harness.results import read_records

logger = logging.getLogger("distill.teacher")

FILE = "teacher.jsonl"


def load_prompts(path: Path, field: str, limit: int | None) -> list[str]:
    """The first `limit` prompts of a JSONL file whose objects hold the text in `field`."""
    if not path.is_file():
        raise UsageError(f"the prompt file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}, line {number}, is not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field].strip():
            raise UsageError(f"{path}, line {number}, has no text in the field '{field}' "
                             "(choose the field with --prompt-field)")
        prompts.append(row[field])
        if len(prompts) == limit:
            break
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def pending(path: Path, count: int, settings: dict) -> list[int]:
    """The indices of the first `count` prompts that `path` has no sample of yet."""
    samples = read_records(path)
    if samples and samples[0]["settings"] != settings:
        raise UsageError(f"{path} holds samples made with other settings ({samples[0]['settings']}); "
                         "rerun with those settings to resume, or use another --workdir")
    done = {s["index"] for s in samples}
    todo = [i for i in range(count) if i not in done]
    logger.info("Teacher: %d of %d prompts already sampled, %d to go", count - len(todo), count, len(todo))
    return todo


def draw(client, model: str, prompts: list[str], todo: list[int], settings: dict, concurrency: int,
         path: Path) -> None:
    """Sample the prompts `todo` with the sampler in settings, appending each sample to `path` as it
    comes. On an interruption, the requests in flight are abandoned, not waited for."""
    from tqdm import tqdm

    def sample(index: int) -> dict:
        start = time.perf_counter()
        r = client.chat.completions.create(
            model=model, max_tokens=settings["max_tokens"], seed=index, logprobs=True, top_logprobs=0,
            messages=[{"role": "user", "content": prompts[index]}],
            extra_body={**settings["sampler"], "return_token_ids": True})
        choice = r.choices[0]
        if choice.token_ids is None or choice.logprobs is None:
            raise UsageError("the server returned no token ids or logprobs: it must support `return_token_ids`")
        return {"index": index, "prompt": prompts[index], "completion": choice.message.content,
                "prompt_token_ids": r.prompt_token_ids, "token_ids": choice.token_ids,
                # A power sampler reports each token's log p under the base model: their sum is
                # the sample's self-reward, log p(y|x) (docs/distillation.md).
                "base_logp": sum(t.logprob for t in choice.logprobs.content),
                "finish_reason": choice.finish_reason, "latency_s": time.perf_counter() - start,
                "sampler_usage": getattr(r, "sampler_usage", None), "settings": settings}

    pool = ThreadPoolExecutor(concurrency)
    futures = [pool.submit(sample, i) for i in todo]
    try:
        with open(path, "a") as out:
            for future in tqdm(as_completed(futures), total=len(futures), desc="teacher samples"):
                out.write(json.dumps(future.result()) + "\n")
                out.flush()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def statistics(samples: list[dict]) -> dict:
    """What the report says about the teacher's samples."""
    tokens = sum(len(s["token_ids"]) for s in samples)
    return {
        "samples": len(samples),
        "sampler": samples[0]["settings"]["sampler"],
        "max_tokens": samples[0]["settings"]["max_tokens"],
        "mean_length": tokens / len(samples),
        "ended_by_eos": sum(s["finish_reason"] == "stop" for s in samples) / len(samples),
        "mean_base_logp_per_token": sum(s["base_logp"] for s in samples) / max(tokens, 1),
        "mean_base_logp_per_completion": sum(s["base_logp"] for s in samples) / len(samples),
        "mean_latency_s": sum(s["latency_s"] for s in samples) / len(samples),
    }


def iter_training_examples(samples: list[dict]) -> Iterator[dict]:
    """Token ids of prompt plus completion, and which of them are the completion's (the loss's)."""
    for s in sorted(samples, key=lambda s: s["index"]):
        prompt, completion = s["prompt_token_ids"], s["token_ids"]
        yield {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
