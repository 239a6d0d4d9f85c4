"""The train stage: supervised fine-tuning of a LoRA adapter on the teacher's samples.

The offline surrogate of power self-distillation (algorithms.md section 3): maximum likelihood of
the teacher's completions given their prompts, i.e. forward KL to pi_alpha, with the loss on
completion tokens only. The examples are the exact token ids the teacher sampled (no re-tokenising),
trained with TRL's SFTTrainer and a PEFT LoRA adapter on every linear layer of the base model.
Checkpoints go to WORKDIR/checkpoints every --save-steps steps and a rerun resumes from the last
one; the finished adapter is WORKDIR/adapter, which `python -m server --distilled NAME=PATH` serves.
"""

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.load import UsageError
from benchmarks.quality import read_records
from distill import teacher

logger = logging.getLogger("distill.train")

ADAPTER = "adapter"
MERGED = "merged"
SUMMARY = "train.json"


@dataclass(frozen=True)
class TrainSettings:
    # The paper's setup: LoRA r = 16, lora_alpha = 32, 3 epochs (algorithms.md section 3).
    epochs: float = 3.0
    rank: int = 16
    lora_alpha: int = 32
    learning_rate: float = 2e-4
    batch_size: int = 8
    save_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0 or (value == 0 and name != "seed"):
                raise UsageError(f"--{name.replace('_', '-')} must be {'at least 0' if name == 'seed' else 'positive'}, "
                                 f"not {value}")


def train(workdir: Path, base_model: Path, settings: TrainSettings) -> dict:
    """Train the adapter unless WORKDIR/adapter exists; the training summary either way."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    samples = read_records(workdir / teacher.FILE)
    if not samples:
        raise UsageError(f"{workdir / teacher.FILE} holds no teacher samples: run the teacher stage first")
    # What an adapter or a checkpoint was made from: these settings on this many teacher samples.
    made_from = asdict(settings) | {"examples": len(samples)}
    adapter, summary_path = workdir / ADAPTER, workdir / SUMMARY
    if (adapter / "adapter_config.json").is_file() and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary["settings"] | {"examples": summary["examples"]} != made_from:
            raise UsageError(f"{adapter} was trained with other settings or samples "
                             f"({summary['settings']}, {summary['examples']} samples); delete it to train again")
        logger.info("The adapter is already trained: %s (delete it to train again)", adapter)
        merge(workdir, base_model)
        return summary
    checkpoints, settings_path = workdir / "checkpoints", workdir / "train-settings.json"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last and json.loads(settings_path.read_text()) != made_from:
        raise UsageError(f"{checkpoints} holds checkpoints of a run with other settings or samples "
                         f"({settings_path.read_text().strip()}); rerun with those, or delete {checkpoints}")
    settings_path.write_text(json.dumps(made_from))

    dataset = Dataset.from_list(list(teacher.iter_training_examples(samples)))
    gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(checkpoints), num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size, seed=settings.seed,
        # TRL turns on bf16 mixed precision by default; on a CPU, train in plain float32.
        use_cpu=not gpu, bf16=gpu,
        completion_only_loss=True, max_length=None, logging_steps=1, save_strategy="steps",
        save_steps=settings.save_steps, save_total_limit=2, report_to="none")
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32), args=config,
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(base_model), peft_config=lora)
    if last:
        logger.info("Resuming training from %s", last)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    save_whole(adapter, trainer.model.save_pretrained)
    losses = [{"step": e["step"], "epoch": e["epoch"], "loss": e["loss"]}
              for e in trainer.state.log_history if "loss" in e]
    summary = {"settings": asdict(settings), "examples": len(samples),
               "completion_tokens": sum(len(s["token_ids"]) for s in samples), "steps": result.global_step,
               "seconds_this_run": time.perf_counter() - start, "train_runtime_s": result.metrics["train_runtime"],
               "first_loss": losses[0]["loss"] if losses else None,
               "final_loss": losses[-1]["loss"] if losses else None, "losses": losses}
    summary_path.write_text(json.dumps(summary, indent=2))
    logger.info("Adapter written to %s (%d steps, loss %s -> %s)", adapter, result.global_step,
                summary["first_loss"], summary["final_loss"])
    merge(workdir, base_model)
    return summary


def merge(workdir: Path, base_model: Path) -> None:
    """WORKDIR/merged: the base model with the adapter folded into its weights, in the base model's
    dtype, with its tokenizer. Served with `--model`, it decodes at exactly plain-decoding cost,
    which a LoRA adapter served beside the base model does not on vLLM's CPU engine."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = workdir / MERGED
    if (merged / "config.json").is_file():
        return
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    model = PeftModel.from_pretrained(base, workdir / ADAPTER).merge_and_unload()

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
