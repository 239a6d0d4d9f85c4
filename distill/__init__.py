"""Power self-distillation: sample a model's power distribution, fit a LoRA adapter to the samples,
and compare it with the base model and the power sampler (`python -m distill --help`)."""
