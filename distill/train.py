"""The train stage: a LoRA adapter that decodes like the power distribution, by one of three methods.

- `sft` (default), the offline surrogate of power self-distillation (docs/distillation.md):
  maximum likelihood of the teacher stage's samples given their prompts, i.e. forward KL to
  pi_alpha, with the loss on completion tokens only. The examples are the exact token ids the
  teacher sampled (no re-tokenising), trained with TRL's SFTTrainer.
- `self-reward` and `opd`: on-policy, on the prompts themselves, with TRL's GRPOTrainer
  (distill/onpolicy.py): RL on the reward alpha log p_base(y) - log pi(y), whose optimum is
  exactly p_base^alpha, and on-policy distillation from a teacher.
Every method trains a PEFT LoRA adapter on every linear layer of the base model, in WORKDIR/RUN
(RUN defaults to the method's name). Checkpoints go to RUN/checkpoints every --save-steps steps and
a rerun resumes from the last one; the finished adapter is RUN/adapter, which
`python -m server --distilled NAME=PATH` serves, and RUN/merged is the base model with it merged in.
"""

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from distill import teacher
from harness.cli import UsageError
from harness.results import read_records

logger = logging.getLogger("distill.train")

ADAPTER = "adapter"
MERGED = "merged"
SUMMARY = "train.json"
METHODS = ("sft", "self-reward", "opd")
OPD_REWARDS = ("power", "log-ratio")
# What each method's result depends on besides the fields every method has.
METHOD_FIELDS = {"sft": (), "self-reward": ("generations", "power_alpha"),
                 "opd": ("generations", "power_alpha", "opd_reward", "opd_exponent", "opd_teacher")}
# What a step's log keeps: the loss and gradient norm of every method, and the on-policy methods'
# self-reward, KL to the base model, self-reward RL's objective and the distillation reward.
LOGGED = ("loss", "grad_norm", "reward", "kl_to_base", "objective", "token_reward")
# What each method's gradient steps follow (distill/onpolicy.py for the on-policy two), in train.json.
OBJECTIVES = {
    "sft": "maximum likelihood of the teacher's samples: forward KL to the teacher's law",
    "self-reward": "E_pi[alpha log p_base(y) - log pi(y)], maximised by p_base^alpha: REINFORCE on that "
                   "sequence reward with the group's mean as baseline, no KL term",
    "opd": "per-token REINFORCE on the teacher's reward (--opd-reward), maximised by the teacher's "
           "per-token law",
}


@dataclass(frozen=True)
class TrainSettings:
    method: str = "sft"
    # The paper's setup: LoRA r = 16, lora_alpha = 32, 3 epochs (docs/distillation.md).
    epochs: float = 3.0
    rank: int = 16
    lora_alpha: int = 32
    learning_rate: float = 2e-4
    batch_size: int = 8
    save_steps: int = 20
    seed: int = 0
    # On-policy methods: completions per prompt (GRPO's group), and the target's alpha: self-reward's
    # target p^alpha, and the power_scalable teacher's exponent.
    generations: int = 4
    power_alpha: float = 4.0
    opd_reward: str = "power"
    opd_exponent: float = 5.0  # PowerOPD's a, as in its scripts (docs/distillation.md)
    opd_teacher: str = "power_scalable"  # or power_scalable:{json}, or a model directory

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.opd_reward not in OPD_REWARDS:
            raise UsageError(f"--opd-reward must be one of {', '.join(OPD_REWARDS)}, not {self.opd_reward!r}")
        for name, value in vars(self).items():
            if isinstance(value, str):
                continue
            if value < 0 or (value == 0 and name != "seed"):
                raise UsageError(f"--{name.replace('_', '-')} must be {'at least 0' if name == 'seed' else 'positive'}, "
                                 f"not {value}")
        if self.power_alpha <= 1:
            raise UsageError(f"--power-alpha must exceed 1 (p^alpha sharpens p only then), not {self.power_alpha}")
        if self.method == "opd":
            from distill.onpolicy import parse_teacher

            parse_teacher(self.opd_teacher)
        if self.method != "sft" and (self.generations < 2 or self.batch_size % self.generations):
            raise UsageError(f"--batch-size ({self.batch_size}) must be a multiple of --generations "
                             f"({self.generations}), which must be at least 2: GRPO steps on whole groups")

    def relevant(self) -> dict:
        """The settings this method's result depends on."""
        shared = {k: v for k, v in asdict(self).items() if not any(k in f for f in METHOD_FIELDS.values())}
        return shared | {k: getattr(self, k) for k in METHOD_FIELDS[self.method]}


def train(workdir: Path, run: str, base_model: Path, settings: TrainSettings, prompts: dict,
          teacher_enforce_eager: bool = False) -> dict:
    """Train WORKDIR/RUN's adapter unless it exists; the training summary either way. `prompts`:
    what the on-policy methods train on (their `texts`, where they came from, and `max_tokens`)."""
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = workdir / run
    if settings.method == "sft":
        samples = read_records(workdir / teacher.FILE)
        if not samples:
            raise UsageError(f"{workdir / teacher.FILE} holds no teacher samples: run the teacher stage first")
        data = {"examples": len(samples)}
    else:
        samples, data = None, {k: v for k, v in prompts.items() if k != "texts"}
    # What an adapter or a checkpoint was made from: these settings on this data, by this objective.
    made_from = settings.relevant() | data | {"objective": OBJECTIVES[settings.method]}
    adapter, summary_path = run_dir / ADAPTER, run_dir / SUMMARY
    if (adapter / "adapter_config.json").is_file() and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary["settings"] != made_from:
            raise UsageError(f"{adapter} was trained with other settings or data ({summary['settings']}); "
                             "delete it to train again, or name another --run")
        logger.info("The adapter is already trained: %s (delete it to train again)", adapter)
        merge(run_dir, base_model)
        return summary
    checkpoints, settings_path = run_dir / "checkpoints", run_dir / "train-settings.json"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last and json.loads(settings_path.read_text()) != made_from:
        raise UsageError(f"{checkpoints} holds checkpoints of a run with other settings or data "
                         f"({settings_path.read_text().strip()}); rerun with those, or delete {checkpoints}")
    run_dir.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(made_from))

    start = time.perf_counter()
    if settings.method == "sft":
        trainer, closing = sft_trainer(samples, checkpoints, base_model, settings), None
    else:
        trainer, closing = onpolicy_trainer(prompts, checkpoints, base_model, settings, teacher_enforce_eager)
    if last:
        logger.info("Resuming training from %s", last)
    try:
        result = trainer.train(resume_from_checkpoint=last)
    finally:
        if closing:
            closing()
    save_whole(adapter, trainer.model.save_pretrained)
    log = [{"step": e["step"], "epoch": e["epoch"], **{k: e[k] for k in LOGGED if k in e}}
           for e in trainer.state.log_history if "loss" in e]
    summary = {"method": settings.method, "settings": made_from, "steps": result.global_step,
               "seconds_this_run": time.perf_counter() - start, "train_runtime_s": result.metrics["train_runtime"],
               "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
               "log": log}
    if samples:
        summary["completion_tokens"] = sum(len(s["token_ids"]) for s in samples)
    summary_path.write_text(json.dumps(summary, indent=2))
    logger.info("Adapter written to %s (%d steps, loss %s -> %s)", adapter, result.global_step,
                summary["first_loss"], summary["final_loss"])
    merge(run_dir, base_model)
    return summary


def common_arguments(checkpoints: Path, settings: TrainSettings) -> dict:
    """The TrainingArguments every method shares."""
    import torch

    gpu = torch.cuda.is_available()
    return dict(output_dir=str(checkpoints), num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
                per_device_train_batch_size=settings.batch_size, seed=settings.seed,
                # TRL turns on bf16 mixed precision by default; on a CPU, train in plain float32.
                use_cpu=not gpu, bf16=gpu, logging_steps=1, save_strategy="steps",
                save_steps=settings.save_steps, save_total_limit=2, report_to="none")


def lora_config(settings: TrainSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def base_and_tokenizer(base_model: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32),
            AutoTokenizer.from_pretrained(base_model))


def sft_trainer(samples: list[dict], checkpoints: Path, base_model: Path, settings: TrainSettings):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = base_and_tokenizer(base_model)
    config = SFTConfig(**common_arguments(checkpoints, settings), completion_only_loss=True, max_length=None)
    return SFTTrainer(model=model, args=config, processing_class=tokenizer, peft_config=lora_config(settings),
                      train_dataset=Dataset.from_list(list(teacher.iter_training_examples(samples))))


def onpolicy_trainer(prompts: dict, checkpoints: Path, base_model: Path, settings: TrainSettings,
                     teacher_enforce_eager: bool):
    """The GRPO trainer of an on-policy method, and what closes its teacher's engine (or None)."""
    from distill import onpolicy

    if settings.method == "self-reward":
        return grpo_trainer(prompts, checkpoints, base_model, settings), None
    engine, opd_teacher = onpolicy.open_teacher(settings.opd_teacher, base_model, settings.power_alpha,
                                                teacher_enforce_eager)
    try:
        return grpo_trainer(prompts, checkpoints, base_model, settings, opd_teacher), engine.close
    except BaseException:
        engine.close()
        raise


def grpo_trainer(prompts: dict, checkpoints: Path, base_model: Path, settings: TrainSettings, teacher=None):
    """The GRPO trainer of self-reward RL, or of on-policy distillation from `teacher` (an object
    with distill/onpolicy.py's teachers' `token_logps`)."""
    from datasets import Dataset
    from trl import GRPOConfig

    from distill import onpolicy

    model, tokenizer = base_and_tokenizer(base_model)
    config = GRPOConfig(
        **common_arguments(checkpoints, settings), num_generations=settings.generations,
        max_completion_length=prompts["max_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        # No KL term: self-reward's entropy term is in its reward, and distillation's whole signal
        # is the teacher's reward (distill/onpolicy.py).
        beta=0.0,
        # TRL's advantages (rewards centred, not divided by the group's spread) are replaced by the
        # trainer; losses summed over tokens and divided by a constant, so that long completions
        # weigh as their log-likelihood does (GRPO's per-sequence mean would not).
        scale_rewards="none", loss_type="dr_grpo", log_completions=False)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": text}]} for text in prompts["texts"]])
    return onpolicy.trainer_class()(
        model=model, args=config, processing_class=tokenizer, peft_config=lora_config(settings),
        reward_funcs=[onpolicy.SelfReward(base_model, tokenizer)], train_dataset=dataset,
        power_alpha=settings.power_alpha if settings.method == "self-reward" else None,
        teacher=teacher, reward_kind=settings.opd_reward, exponent=settings.opd_exponent)


def merge(run_dir: Path, base_model: Path) -> None:
    """RUN/merged: the base model with the adapter folded into its weights, in the base model's
    dtype, with its tokenizer. Served with `--model`, it decodes at exactly plain-decoding cost,
    which a LoRA adapter served beside the base model does not on vLLM's CPU engine."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = run_dir / MERGED
    if (merged / "config.json").is_file():
        return
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    model = PeftModel.from_pretrained(base, run_dir / ADAPTER).merge_and_unload()

    def save(directory: Path) -> None:
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(base_model).save_pretrained(directory)

    save_whole(merged, save)
    logger.info("Merged model written to %s", merged)


def save_whole(target: Path, save: Callable[[Path], None]) -> None:
    """Let `save` write a directory beside `target`, then rename it into place: `target` is
    either whole or absent, whenever the process is interrupted."""
    partial = target.with_name(f"{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
