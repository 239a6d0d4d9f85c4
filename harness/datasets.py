"""The question sets the tools answer (GSM8K from the shared data folder, generated arithmetic) and
how an answer is checked."""

import json
import random
import re
from pathlib import Path

from harness.cli import UsageError

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"


ANSWER_EXTRACTION = "the last number in the completion (commas and a trailing period dropped) equals the reference"


def gsm8k(count: int) -> list[dict]:
    if not GSM8K.exists():
        raise UsageError(f"GSM8K is not at {GSM8K} (the shared data folder beside the repository)")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:count]]
    return [{"question": r["question"], "answer": r["answer"].split("####")[-1].strip().replace(",", "")}
            for r in rows]


def arithmetic(count: int) -> list[dict]:
    """Sums and differences of two numbers below 20, seeded: easy enough for a 135M model to get some right."""
    rng = random.Random(0)
    problems = []
    for _ in range(count):
        a, b = rng.randint(1, 19), rng.randint(1, 19)
        op = rng.choice("+-")
        a, b = (a, b) if op == "+" or a >= b else (b, a)
        problems.append({"question": f"What is {a} {op} {b}? Answer with the number only.",
                         "answer": str(a + b if op == "+" else a - b)})
    return problems


DATASETS = {"gsm8k": gsm8k, "arithmetic": arithmetic}


def last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def is_correct(text: str, reference: str) -> bool:
    answer = last_number(text)
    try:
        return answer is not None and float(answer) == float(reference)
    except ValueError:
        return False
