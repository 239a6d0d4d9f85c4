"""The load tool and the quality harness end to end against the live test server, on a tiny workload.

Each runs as its users run it, `python -m benchmarks.load` / `python -m benchmarks.quality` in a
subprocess; the JSON it writes must match its documented schema (benchmarks/schemas/).
"""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import API_KEY, MODEL

SCHEMAS = Path(__file__).resolve().parent.parent / "benchmarks" / "schemas"
CHEAP_SCALABLE = 'power_scalable:{"block_size": 4, "candidates": 2, "rollouts": 2, "rollout_horizon": 4}'


def tool(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True,
                          timeout=timeout)


def validate(path: Path, schema: str) -> dict:
    report = json.loads(path.read_text())
    jsonschema.validate(report, json.loads((SCHEMAS / schema).read_text()))
    return report


@pytest.fixture(scope="module")
def load_result(live_server, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("load") / "load.json"
    done = tool("load", "run", "--base-url", live_server.url, "--model", MODEL, "--api-key", API_KEY,
                "--tokenizer", str(live_server.model_dir), "--sampler", "direct", "--sampler", CHEAP_SCALABLE,
                "--concurrency", "1", "2", "--num-prompts", "2", "--input-len", "8", "--output-len", "8",
                "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    return output


def test_load_run_reports_latency_and_spend_per_sampler(load_result):
    report = validate(load_result, "load.schema.json")
    assert report["workload"]["sweep"] == "concurrency"
    for label, result in report["samplers"].items():
        assert [p["concurrency"] for p in result["points"]] == [1, 2]
        for point in result["points"]:
            assert point["completed"] == 2 and point["failed"] == 0, point["errors"]
            assert point["total_output_tokens"] == 16
            assert 0 < point["median_ttft_ms"] <= point["median_e2el_ms"]
            multiplier = point["spend"]["engine_tokens_per_output_token"]
            engine = point["spend"]["engine_tokens"]
            if label == "direct":
                # Its output, and its prompts' prefills (those the prefix cache did not hold).
                assert engine["generated"] == 16 and engine["scored"] == 0
                assert multiplier == (16 + engine["prefilled"]) / 16
            else:
                # Two blocks of 4 per request; the first rolls out 2 x 2 x 4 tokens after 2 candidate blocks.
                assert multiplier > 1
                assert point["spend"]["events"]["decisions"] == 2 * 2
    assert load_result.with_suffix(".png").stat().st_size > 0


def test_compare_gives_ratios_per_sampler_and_point(load_result):
    done = tool("load", "compare", str(load_result), str(load_result))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| direct", "| power_scalable"))]
    assert len(rows) == 4
    assert all(cell.strip() == "1.00" for row in rows for cell in row.strip("|").split("|")[2:])


def test_load_generator_survives_keep_alives(live_server, tmp_path):
    # power_mcmc streams nothing until its chains finish, so a run longer than the server's
    # heartbeat interval (5 s) sends keep-alives; vLLM's streaming client must still read it. Without
    # steps the chain is its first pass alone: as many tokens as this machine decodes in 10 s.
    output = tmp_path / "mcmc.json"
    sampler = 'power_mcmc:{"mcmc_steps": 0}'
    done = tool("load", "run", "--base-url", live_server.url, "--model", MODEL, "--api-key", API_KEY,
                "--tokenizer", str(live_server.model_dir), "--sampler", sampler,
                "--concurrency", "1", "--num-prompts", "1", "--input-len", "8",
                "--output-len", str(live_server.pace.tokens_for(10)), "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    (point,) = json.loads(output.read_text())["samplers"][sampler]["points"]
    assert point["completed"] == 1, point["errors"]
    assert point["median_e2el_ms"] > 5000  # long enough to have carried a keep-alive


@pytest.mark.fast
@pytest.mark.parametrize("args, message", [
    (["run", "--sampler", "power_scalable:{bad"], "must be a JSON object"),
    (["run", "--duration", "5"], "--duration needs --request-rate"),
    (["run", "--concurrency", "0"], "must be at least 1"),
    (["compare", "/nonexistent.json", "/nonexistent.json"], "is not a result file"),
])
def test_load_bad_arguments_get_a_clear_message(args, message):
    done = tool("load", *args, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_load_reports_a_sampler_the_server_refuses(live_server, tmp_path):
    done = tool("load", "run", "--base-url", live_server.url, "--model", MODEL, "--api-key", API_KEY,
                "--tokenizer", str(live_server.model_dir), "--sampler", 'power_scalable:{"rollouts": 0}',
                "--output", str(tmp_path / "x.json"), timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "refuses sampler" in done.stderr and "rollouts" in done.stderr


def test_quality_harness_scores_and_resumes(live_server, tmp_path):
    output = tmp_path / "quality.json"
    args = ["--base-url", live_server.url, "--model", MODEL, "--api-key", API_KEY, "--dataset", "arithmetic",
            "--prompts", "3", "--max-tokens", "6", "--concurrency", "3", "--sampler", "direct",
            "--sampler", CHEAP_SCALABLE, "--output", str(output)]
    done = tool("quality", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = validate(output, "quality.schema.json")
    assert set(report["summary"]) == {"direct", CHEAP_SCALABLE}
    for label, summary in report["summary"].items():
        assert summary["completions"] == 3 and summary["mean_length"] <= 6
        assert summary["engine_tokens_per_output_token"] == 1 if label == "direct" else \
            summary["engine_tokens_per_output_token"] > 1
    records = output.with_suffix(".jsonl").read_text().splitlines()
    assert len(records) == 6
    assert all(json.loads(r)["token_ids"] for r in records)
    # The power sampler's completions have a higher base log p per token than plain sampling's,
    # but three 6-token answers are too few to assert it; each summary's log p is a real log p
    # (scored after the answers, from the records' token ids).
    assert all(summary["mean_logp_per_completion"] < 0 for summary in report["summary"].values())

    # A rerun finds every answer in the records and asks the server nothing more.
    again = tool("quality", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert output.with_suffix(".jsonl").read_text().splitlines() == records
    assert validate(output, "quality.schema.json")["summary"] == report["summary"]


@pytest.mark.parametrize("args, message", [
    (["--sampler", "nosuch"], "Unknown sampler"),
    (["--base-model", "/nonexistent"], "not a Hugging Face model directory"),
])
def test_quality_bad_arguments_get_a_clear_message(live_server, tmp_path, args, message):
    done = tool("quality", "--base-url", live_server.url, "--model", MODEL, "--api-key", API_KEY,
                "--prompts", "1", "--output", str(tmp_path / "q.json"), *args, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message.lower() in done.stderr.lower()


def test_frontier_interleaves_rounds_keeps_to_its_budget_and_resumes(live_server, tmp_path):
    output = tmp_path / "frontier.json"
    args = ["--base-url", live_server.url, "--model", MODEL, "--api-key", API_KEY, "--dataset", "arithmetic",
            "--questions", "4", "--max-tokens", "6", "--concurrency", "2", "--sampler", "direct",
            "--sampler", CHEAP_SCALABLE, "--bootstrap", "200", "--output", str(output)]
    # The first round always runs; a budget of a few milliseconds holds no second one.
    done = tool("frontier", *args, "--budget-minutes", "0.0001")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Stopping before round 2 of 2" in done.stderr
    first = output.with_suffix(".jsonl").read_text().splitlines()
    assert [(json.loads(r)["sampler"], json.loads(r)["index"]) for r in first] == [
        ("direct", 0), ("direct", 1), (CHEAP_SCALABLE, 0), (CHEAP_SCALABLE, 1)]
    assert validate(output, "frontier.schema.json")["summary"]["direct"]["questions"] == 2

    # Without a budget the run resumes: only the second round is asked, in the rotated order.
    done = tool("frontier", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    records = output.with_suffix(".jsonl").read_text().splitlines()
    assert records[:4] == first
    assert [(json.loads(r)["sampler"], json.loads(r)["index"]) for r in records[4:]] == [
        (CHEAP_SCALABLE, 2), (CHEAP_SCALABLE, 3), ("direct", 2), ("direct", 3)]
    report = validate(output, "frontier.schema.json")
    direct, scalable = report["summary"]["direct"], report["summary"][CHEAP_SCALABLE]
    assert direct["questions"] == scalable["questions"] == 4
    assert direct["latency_ratio"] == 1 and direct["latency_ratio_ci"] == [1, 1]
    assert scalable["engine_tokens_per_output_token"] > direct["engine_tokens_per_output_token"] >= 1
    for s in (direct, scalable):
        for name in ("self_reward_per_token", "latency_ratio", "engine_tokens_per_output_token", "accuracy"):
            low, high = s[f"{name}_ci"]
            assert low <= s[name] <= high
    assert direct["on_front_latency_ratio"]  # nothing is cheaper
    assert output.with_suffix(".png").stat().st_size > 0
    assert "| direct |" in output.with_suffix(".md").read_text()


@pytest.mark.fast
def test_frontier_statistics_on_hand_computed_numbers():
    from benchmarks.frontier import pareto_front, wilson

    # Wilson at 0 of 8: centre z^2/(2n) / (1 + z^2/n) = 0.1936, half width the same: [0, 0.3244].
    low, high = wilson(0, 8)
    assert low == 0 and high == pytest.approx(0.3244, abs=1e-4)
    # 16 of 32 is symmetric about one half: 0.5 +- 0.1637.
    assert wilson(16, 32) == pytest.approx((0.3363, 0.6637), abs=1e-4)
    # (cost, quality): b beats a on both; c is dearer than b and better; d is dearer and worse than c.
    points = {"a": (2.0, -1.0), "b": (1.0, -0.5), "c": (5.0, -0.3), "d": (6.0, -0.4), "e": (1.0, -0.5)}
    assert pareto_front(points) == ["b", "c", "e"]


@pytest.mark.fast
def test_frontier_bad_arguments_get_a_clear_message(tmp_path):
    done = tool("frontier", "--sampler", "direct", "--reference", "nosuch", "--output", str(tmp_path / "f.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--reference 'nosuch' is none of the settings" in done.stderr
