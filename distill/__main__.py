"""`python -m distill [STAGE] --workdir DIR`: distil a served model's power distribution into a LoRA adapter.

Stages (default `all`, which runs them in order; each can also run alone):
  teacher  power samples of the base model for a prompt set -> WORKDIR/teacher.jsonl
           (only --method sft needs them)
  train    a LoRA adapter trained with TRL by --method -> WORKDIR/RUN/adapter (checkpoints on the
           way), and the base model with it merged in -> WORKDIR/RUN/merged. RUN is --run, by
           default the method's name. Methods:
             sft          fine-tune on the teacher's samples (offline power self-distillation)
             self-reward  GRPO with reward alpha log p_base(y) - log pi(y), maximised by p^alpha
             opd          on-policy distillation: per-token reward --opd-reward (power or
                          log-ratio) from --opd-teacher (power_scalable[:{json}] or a model directory)
  report   base direct vs power sampler vs every trained RUN on held-out GSM8K questions
           -> WORKDIR/report.json and report.md (or --report PATH)
Every stage resumes where an interrupted run stopped. Serve a result beside the base model with
`python -m server --distilled NAME=WORKDIR/RUN/adapter`, or alone with `--model WORKDIR/RUN/merged`.
"""

import argparse
import json
import logging
import re
import signal
import sys
from pathlib import Path

from openai import APIConnectionError, APIStatusError

from distill import report, teacher, train
from harness.cli import UsageError, parse_sampler, positive
from harness.datasets import GSM8K
from harness.results import header
from harness.servers import UNGATED, embedded_server, free_port

GSM8K_TRAIN = GSM8K.with_name("train.jsonl")
DEFAULT_SAMPLER = 'power_mcmc:{"power_alpha": 4}'


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", choices=["all", "teacher", "train", "report"], default="all")
    parser.add_argument("--workdir", type=Path, required=True, help="where every stage keeps its files")
    parser.add_argument("--base-model", type=Path,
                        help="Hugging Face directory of the model to distil (default: the embedded model)")
    group = parser.add_argument_group("teacher")
    group.add_argument("--prompts", type=Path, default=GSM8K_TRAIN,
                       help="JSONL prompt file, also the on-policy methods' training prompts (default: GSM8K train)")
    group.add_argument("--prompt-field", default="question", help="the field with the prompt text (default: %(default)s)")
    group.add_argument("--limit", type=positive, default=256, help="the first N prompts (default: %(default)s)")
    group.add_argument("--sampler", type=parse_sampler, default=parse_sampler(DEFAULT_SAMPLER),
                       help="power sampler as NAME:{json request fields}; the report's too (default: %(default)s)")
    group.add_argument("--max-tokens", type=positive, default=128,
                       help="per completion: teacher, on-policy training and report (default: %(default)s)")
    group.add_argument("--concurrency", type=positive, default=8,
                       help="requests at a time, teacher and report (default: %(default)s)")
    group.add_argument("--base-url", help="sample from this power sampling server instead of starting ours")
    group.add_argument("--model", help="with --base-url: its served name of the base model")
    group.add_argument("--api-key", default="none", help="with --base-url: its API key")
    group = parser.add_argument_group("train")
    group.add_argument("--run", help="the run's directory name in WORKDIR (default: the method's name)")
    choices = {"method": train.METHODS, "opd_reward": train.OPD_REWARDS}
    for name, value in vars(train.TrainSettings()).items():
        group.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                           choices=choices.get(name), help="(default: %(default)s)")
    group.add_argument("--teacher-enforce-eager", action="store_true",
                       help="start opd's teacher engine without torch compilation: ready in seconds instead of "
                       "minutes, for short runs")
    group = parser.add_argument_group("report")
    group.add_argument("--eval-prompts", type=positive, default=64,
                       help="the first N GSM8K test questions (default: %(default)s)")
    group.add_argument("--report", type=Path, help="result JSON (default: WORKDIR/report.json); the table beside it")
    args = parser.parse_args(argv)
    if args.base_url and not args.model:
        parser.error("--base-url needs --model, the name it serves the base model under")
    if args.run is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.run) or args.run == report.SERVED):
        parser.error(f"--run {args.run!r}: a run is named by letters, digits, '.', '_' and '-', and not "
                     f"'{report.SERVED}' (the base model's served name)")
    return args


def run_teacher(args: argparse.Namespace, base_model: Path) -> None:
    from openai import OpenAI

    prompts = teacher.load_prompts(args.prompts, args.prompt_field, args.limit)
    label, fields = args.sampler
    if not fields.get("sampler", "").startswith("power_"):
        raise UsageError(f"the teacher must be a power sampler (power_mcmc or power_scalable), not {label!r}")
    settings = {"sampler": fields, "max_tokens": args.max_tokens, "prompts": str(args.prompts.resolve()),
                "prompt_field": args.prompt_field}
    path = args.workdir / teacher.FILE
    todo = teacher.pending(path, len(prompts), settings)
    if not todo:
        return
    if args.base_url:
        client = OpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key, max_retries=3, timeout=7200)
        teacher.draw(client, args.model, prompts, todo, settings, args.concurrency, path)
        return
    with embedded_server("base", free_port(), UNGATED, base_model, args.workdir / "server.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=7200)
        teacher.draw(client, "base", prompts, todo, settings, args.concurrency, path)


def run_train(args: argparse.Namespace, base_model: Path, settings: train.TrainSettings) -> None:
    prompts = {"max_tokens": args.max_tokens}
    if settings.method != "sft":
        texts = teacher.load_prompts(args.prompts, args.prompt_field, args.limit)
        prompts |= {"texts": texts, "prompts": str(args.prompts.resolve()), "prompt_field": args.prompt_field,
                    "count": len(texts)}
    train.train(args.workdir, args.run or settings.method, base_model, settings, prompts, args.teacher_enforce_eager)


def run_report(args: argparse.Namespace, base_model: Path) -> None:
    result = report.report(args.workdir, base_model, args.sampler[1], args.max_tokens, args.eval_prompts,
                           args.concurrency)
    path = args.report or args.workdir / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(header("distill", sys.argv[1:]) | result, indent=2) + "\n")
    path.with_suffix(".md").write_text(report.table(result))
    report.plot(result, path.with_suffix(".png"))
    print(report.table(result))
    logging.getLogger("distill").info("Wrote %s, and beside it the table (.md) and the plot (.png)", path)


def main(argv: list[str] | None = None) -> int:
    # A termination signal unwinds like Ctrl-C, so that the servers and engines a stage started
    # (vLLM's engine runs in processes of its own) are shut down rather than left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):  # a line per request would bury the progress bars
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.base_model and not (args.base_model / "config.json").is_file():
            raise UsageError(f"--base-model {args.base_model} is not a Hugging Face model directory")
        training = train.TrainSettings(**{name: getattr(args, name) for name in vars(train.TrainSettings())})
        from server import embedded_model

        base_model = args.base_model or embedded_model.prepare()
        args.workdir.mkdir(parents=True, exist_ok=True)
        if args.stage == "teacher" or (args.stage == "all" and training.method == "sft"):
            run_teacher(args, base_model)
        if args.stage in ("all", "train"):
            run_train(args, base_model, training)
        if args.stage in ("all", "report"):
            run_report(args, base_model)
    except APIStatusError as exc:
        print(f"error: the server refused a request (HTTP {exc.status_code}): {exc.message}", file=sys.stderr)
        return 2
    except APIConnectionError as exc:
        print(f"error: cannot reach {exc.request.url.copy_with(path='/')}: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
