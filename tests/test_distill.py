"""The distillation pipeline (`python -m distill`), run for real at miniature scale: power samples
from our server, LoRA adapters trained with TRL by each method (fine-tuning on those samples,
self-reward RL, on-policy distillation from power_scalable), and the report that serves them all."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill import teacher, train
from harness import tiny_models
from harness.results import read_records
from tests.conftest import API_KEY, MODEL
from tests.test_distilled import save_lora

# A cheap power sampler: blocks of 4 tokens, K = M = 2 candidates and rollouts of 4 tokens.
SAMPLER = 'power_scalable:{"power_alpha": 4, "block_size": 4, "candidates": 2, "rollouts": 2, "rollout_horizon": 4}'


def distill(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, timeout=timeout)


# The on-policy methods' miniature: 2 prompts, 2 completions of each per step (one batch of 4),
# two steps saving a checkpoint after each; power_scalable's teacher with K = 3, M = 2, H = 4.
ON_POLICY = ("--limit", "2", "--max-tokens", "8", "--batch-size", "4", "--generations", "2", "--epochs", "2",
             "--save-steps", "1", "--learning-rate", "0.001")
OPD_TEACHER = 'power_scalable:{"candidates": 3, "rollouts": 2, "rollout_horizon": 4}'
# The teacher's engine compiled would take minutes to start here, longer than the miniature's training.
OPD = ("--method", "opd", "--opd-teacher", OPD_TEACHER, "--teacher-enforce-eager")


@pytest.fixture(scope="module")
def miniature(model_dir, tmp_path_factory) -> Path:
    """Self-reward RL on 2 GSM8K train prompts; then the whole offline loop on 4 prompts, 8 tokens
    each: three steps of training on one batch of all four; and the report of both runs. A learning
    rate of 1e-3 is high enough that each adapter visibly moves the model. (On-policy distillation
    trains in a test of its own, which also stops and resumes it.)"""
    workdir = tmp_path_factory.mktemp("distill")
    result = distill("train", "--workdir", str(workdir), "--base-model", str(model_dir), "--method", "self-reward",
                     *ON_POLICY)
    assert result.returncode == 0, result.stderr[-3000:]
    result = distill("all", "--workdir", str(workdir), "--base-model", str(model_dir), "--limit", "4",
                     "--max-tokens", "8", "--sampler", SAMPLER, "--epochs", "3", "--batch-size", "4",
                     "--learning-rate", "0.001", "--eval-prompts", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_teacher_keeps_every_sample_with_its_provenance(miniature, model_dir):
    from transformers import AutoModelForCausalLM

    from harness.scoring import completion_logp

    samples = read_records(miniature / teacher.FILE)
    assert sorted(s["index"] for s in samples) == [0, 1, 2, 3]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for s in samples:
        assert s["settings"]["sampler"]["sampler"] == "power_scalable"
        assert s["settings"]["sampler"]["rollouts"] == 2 and s["settings"]["max_tokens"] == 8
        assert 1 <= len(s["token_ids"]) <= 8 and s["completion"]
        assert s["prompt"] == json.loads(Path(s["settings"]["prompts"]).read_text().splitlines()[s["index"]])["question"]
        # The engine's own log p (bf16 weights here) against a float32 forward pass.
        assert s["base_logp"] == pytest.approx(completion_logp(base, s["prompt_token_ids"], s["token_ids"]),
                                               abs=0.05 * len(s["token_ids"]))


def test_training_loss_is_the_completion_tokens_negative_log_likelihood(miniature, model_dir):
    """Before the first update the adapter is zero (LoRA's B starts at 0), so the first logged loss
    is the base model's mean negative log-likelihood over exactly the teacher's completion tokens of
    the one batch holding all four samples: prompts excluded, nothing re-tokenised. Both are float32
    sums of a few dozen terms, which agree far below the 1e-4 allowed."""
    from transformers import AutoModelForCausalLM

    from harness.scoring import completion_logp

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    samples = read_records(miniature / teacher.FILE)
    summary = json.loads((miniature / "sft" / "train.json").read_text())
    logp = sum(completion_logp(base, s["prompt_token_ids"], s["token_ids"]) for s in samples)
    expected = -logp / sum(len(s["token_ids"]) for s in samples)
    assert summary["first_loss"] == pytest.approx(expected, abs=1e-4)
    assert summary["steps"] == 3 and summary["final_loss"] < summary["first_loss"]
    assert sorted(p.name for p in (miniature / "sft" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3"]


def test_adapter_and_merged_model_raise_the_likelihood_of_the_teacher_samples(miniature, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harness.scoring import completion_logp

    samples = read_records(miniature / teacher.FILE)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    student = PeftModel.from_pretrained(base, miniature / "sft" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(miniature / "sft" / "merged", dtype=torch.float32)
    for s in samples:
        with student.disable_adapter():
            before = completion_logp(student, s["prompt_token_ids"], s["token_ids"])
        after = completion_logp(student, s["prompt_token_ids"], s["token_ids"])
        assert after > before
        # The merged weights are the adapted ones rounded to the base model's bf16.
        assert completion_logp(merged, s["prompt_token_ids"], s["token_ids"]) == pytest.approx(
            after, abs=0.05 * len(s["token_ids"]))


def test_report_serves_every_adapter_beside_the_base_model(miniature, model_dir):
    """The report's server loaded each run's adapter as a distilled model, LoRA and merged: the
    log p it reported for each token of a row's answers is nearer a float32 forward pass of the base
    model plus that run's adapter than of the base model alone. Measured on a bf16 server: 0.07 to
    0.70 nats from the adapter against 0.83 to 4.9 from the base model, summed over the 16 tokens
    (on-policy distillation's two steps, in the report then, moved the model least: 0.19-0.31
    against 0.83-0.95). Comparing the answers with the base model's, drawn with the same seeds,
    would not do: so small a move can draw the same 16 tokens, as it did once in CI."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harness.scoring import completion_token_logps

    report = json.loads((miniature / "report.json").read_text())
    assert report["command"].startswith("python -m distill all")
    summary = report["evaluation"]["summary"]
    runs = ["sft", "self-reward"]
    distilled = [f"{run} (LoRA adapter), direct" for run in runs] + [f"{run} (merged), direct" for run in runs]
    assert list(summary) == ["base model, direct", "base model, power_scalable", *distilled]
    assert all(row["completions"] == 2 for row in summary.values())
    assert report["teacher"]["samples"] == 4 and report["training"]["sft"]["steps"] == 3
    assert {run: report["training"][run]["method"] for run in runs} == dict(zip(runs, runs))
    assert "| self-reward (merged), direct |" in (miniature / "report.md").read_text()
    assert (miniature / "report.png").read_bytes().startswith(b"\x89PNG")
    records = [json.loads(line) for line in (miniature / "eval.jsonl").read_text().splitlines()]

    def distance(model, row: str) -> float:
        """Summed over the row's answers' tokens: |log p reported by the server - log p under model|."""
        return sum(abs(served - own) for r in records if r["sampler"] == row for served, own in
                   zip(r["served_logprobs"], completion_token_logps(model, r["prompt_token_ids"], r["token_ids"]),
                       strict=True))

    for run in runs:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        student = PeftModel.from_pretrained(base, miniature / run / "adapter").eval()
        for row in (f"{run} (LoRA adapter), direct", f"{run} (merged), direct"):
            with student.disable_adapter():
                to_base = distance(student, row)
            to_adapter = distance(student, row)
            assert to_adapter < to_base, (row, to_adapter, to_base)


def test_rerun_redoes_nothing(miniature, model_dir):
    before = {name: (miniature / name).read_bytes() for name in (teacher.FILE, "sft/train.json", "eval.jsonl")}
    result = distill("teacher", "--workdir", str(miniature), "--limit", "4", "--max-tokens", "8", "--sampler", SAMPLER)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 of 4 prompts already sampled, 0 to go" in result.stderr and "Starting ours" not in result.stderr
    result = distill("train", "--workdir", str(miniature), "--base-model", str(model_dir), "--epochs", "3",
                     "--batch-size", "4", "--learning-rate", "0.001")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already trained" in result.stderr
    assert {name: (miniature / name).read_bytes() for name in before} == before
    other = distill("train", "--workdir", str(miniature), "--base-model", str(model_dir), "--epochs", "4",
                    "--batch-size", "4", "--learning-rate", "0.001")
    assert_clear_failure(other, "was trained with other settings or data")


def assert_logged_every_step(summary: dict, run: str, own_metric: str) -> None:
    """An on-policy run's train.json after its two steps: loss, gradient norm, reward, KL to the
    base model and the method's own figure at each step; GRPO's KL term off."""
    assert summary["method"] == run and summary["steps"] == 2
    assert summary["settings"]["objective"] == train.OBJECTIVES[run]
    assert [entry["step"] for entry in summary["log"]] == [1, 2]
    for entry in summary["log"]:
        assert {"loss", "grad_norm", "reward", "kl_to_base", own_metric} <= set(entry)
        assert "kl" not in entry  # GRPO's KL term is off
        assert entry["reward"] < 0  # the base model's log-likelihood of the completions
    # Before the first update the adapter is zero (LoRA's B starts at 0): the policy is the base model.
    assert summary["log"][0]["kl_to_base"] == 0 and summary["log"][1]["kl_to_base"] != 0


def test_self_reward_logs_its_objective_every_step(miniature):
    """`objective` is alpha log p_base(y) - log pi(y); before the first update pi = p, so it is
    (alpha - 1) log p."""
    summary = json.loads((miniature / "self-reward" / "train.json").read_text())
    assert_logged_every_step(summary, "self-reward", "objective")
    first = summary["log"][0]
    assert first["objective"] == pytest.approx((summary["settings"]["power_alpha"] - 1) * first["reward"], rel=1e-3)
    assert sorted(p.name for p in (miniature / "self-reward" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2"]


def test_on_policy_distillation_stopped_by_sigterm_frees_its_engine_and_resumes(model_dir, tmp_path):
    """On-policy distillation from power_scalable, sent SIGTERM in its second step, once the first
    step's checkpoint is written: the teacher's vLLM engine (processes of the run's own) is shut
    down rather than left running. Run again, it resumes from that checkpoint and trains only the
    second step; the first step's log entry is the one the checkpoint kept."""
    import psutil

    log = tmp_path / "stderr.log"
    command = [sys.executable, "-m", "distill", "train", "--workdir", str(tmp_path), "--base-model", str(model_dir),
               *OPD, *ON_POLICY]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    checkpoints = tmp_path / "opd" / "checkpoints"
    state = checkpoints / "checkpoint-1" / "trainer_state.json"  # the checkpoint's last file written
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None and not complete_json(state):
        time.sleep(0.1)
    assert process.poll() is None and complete_json(state), log.read_text()[-3000:]
    engine = psutil.Process(process.pid).children(recursive=True)
    assert engine, "the teacher's engine runs in processes of its own"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    gone, alive = psutil.wait_procs(engine, timeout=30)
    assert not alive
    assert not (checkpoints / "checkpoint-2").exists()  # stopped inside the second step

    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming training from" in result.stderr and "checkpoint-1" in result.stderr
    summary = json.loads((tmp_path / "opd" / "train.json").read_text())
    assert_logged_every_step(summary, "opd", "token_reward")
    kept = next(e for e in json.loads(state.read_text())["log_history"] if "loss" in e)
    assert summary["log"][0]["loss"] == kept["loss"] and summary["log"][0]["token_reward"] == kept["token_reward"]
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "opd" / "adapter" / "adapter_model.safetensors").is_file()


def complete_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def test_interrupted_teacher_resumes_without_repeats_or_losses(live_server, tmp_path):
    """Kill the teacher (SIGKILL: no clean-up) once two samples are written, leave a half-written
    line as a crash mid-write would, and run it again: every prompt exactly once, and the samples
    written before the kill kept as they were."""
    out = tmp_path / teacher.FILE
    command = [sys.executable, "-m", "distill", "teacher", "--workdir", str(tmp_path), "--limit", "6",
               "--max-tokens", "16", "--sampler", SAMPLER, "--concurrency", "1", "--base-url", live_server.url,
               "--model", MODEL, "--api-key", API_KEY, "--base-model", str(live_server.model_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = out.read_text()
    assert 2 <= kept.count("\n") < 6
    with open(out, "a") as f:
        f.write('{"index": 5, "prompt": "cut sh')
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text().startswith(kept)
    assert sorted(s["index"] for s in read_records(out)) == list(range(6))


def test_resuming_with_other_settings_is_refused(tmp_path):
    (tmp_path / teacher.FILE).write_text(json.dumps({"index": 0, "settings": {"sampler": {}, "max_tokens": 1}}) + "\n")
    result = distill("teacher", "--workdir", str(tmp_path), "--limit", "1", "--base-url", "http://127.0.0.1:9",
                     "--model", "m")
    assert_clear_failure(result, "other settings")


def test_unfinished_last_line_is_dropped(tmp_path):
    path = tmp_path / teacher.FILE
    path.write_text('{"index": 0}\n{"index": 1}\n{"ind')
    assert [s["index"] for s in read_records(path)] == [0, 1]
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'


def assert_clear_failure(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"text": "What is 1 + 1?"}\n', "line 1, has no text in the field 'question'"),
    ("What is 1 + 1?\n", "line 1, is not JSON"),
    ("\n", "holds no prompts"),
])
def test_bad_prompt_files_end_with_a_clear_message(content, message, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts.write_text(content)
    result = distill("teacher", "--workdir", str(tmp_path), "--prompts", str(prompts),
                     "--base-url", "http://127.0.0.1:9", "--model", "m")
    assert_clear_failure(result, message)


def test_teacher_must_be_a_power_sampler(tmp_path):
    result = distill("teacher", "--workdir", str(tmp_path), "--sampler", "direct", "--limit", "1",
                     "--base-url", "http://127.0.0.1:9", "--model", "m")
    assert_clear_failure(result, "must be a power sampler")


def test_unreachable_teacher_server_ends_with_a_clear_message(tmp_path):
    result = distill("teacher", "--workdir", str(tmp_path), "--limit", "1", "--base-url", "http://127.0.0.1:9",
                     "--model", "m")
    assert_clear_failure(result, "cannot reach http://127.0.0.1:9")


def test_training_needs_teacher_samples(tmp_path):
    assert_clear_failure(distill("train", "--workdir", str(tmp_path)), "run the teacher stage first")


def test_training_settings_must_be_positive(tmp_path):
    assert_clear_failure(distill("train", "--workdir", str(tmp_path), "--learning-rate", "0"),
                         "--learning-rate must be positive")


@pytest.mark.parametrize("flags, message", [
    (("--method", "opd", "--opd-teacher", "/no/such/model"), "neither power_scalable nor a Hugging Face model"),
    (("--method", "opd", "--opd-teacher", 'power_scalable:{"block_size": 4}'), "block_size must be 1"),
    (("--method", "opd", "--opd-teacher", "power_scalable:{oops"), "not power_scalable's parameters as JSON"),
    (("--method", "self-reward", "--batch-size", "6", "--generations", "4"), "must be a multiple of --generations"),
    (("--method", "self-reward", "--power-alpha", "1"), "--power-alpha must exceed 1"),
    (("--method", "rl",), "invalid choice: 'rl'"),
    (("--run", "base"), "not 'base'"),
])
def test_bad_on_policy_settings_end_with_a_clear_message(flags, message, tmp_path):
    assert_clear_failure(distill("train", "--workdir", str(tmp_path), *flags), message)


def test_opd_teacher_must_share_the_base_models_tokenizer(model_dir, tmp_path):
    teacher_model = tiny_models.build(tmp_path / "tiny", seed=0, sharpness=1.0, eos_bias=0.0)
    result = distill("train", "--workdir", str(tmp_path), "--base-model", str(model_dir), "--method", "opd",
                     "--opd-teacher", str(teacher_model), *ON_POLICY)
    assert_clear_failure(result, "its tokenizer is not the base model's")


def test_base_model_must_be_a_model_directory(tmp_path):
    result = distill("train", "--workdir", str(tmp_path), "--base-model", str(tmp_path))
    assert_clear_failure(result, "is not a Hugging Face model directory")


def test_report_refuses_an_adapter_that_does_not_fit(tmp_path):
    """Trained for another model (the tiny Llama of the sampler tests): vLLM would serve it as if it
    were absent, so the report stops before it starts a server."""
    (tmp_path / teacher.FILE).write_text(json.dumps({"index": 0, "settings": {"sampler": {}, "max_tokens": 1}}) + "\n")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "train.json").write_text("{}")
    save_lora(tiny_models.build(tmp_path / "tiny", seed=0, sharpness=1.0, eos_bias=0.0), tmp_path / "sft" / "adapter")
    assert_clear_failure(distill("report", "--workdir", str(tmp_path)), "no merged model: rerun its train stage")
    shutil.copytree(tmp_path / "tiny", tmp_path / "sft" / "merged")
    assert_clear_failure(distill("report", "--workdir", str(tmp_path)), "does not fit the model")
