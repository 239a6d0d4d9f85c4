"""What the benchmarks, the distillation pipeline and the tests share.

- cli: one-line usage errors and the NAME:{json} sampler specs of the command-line tools
- results: where results go, the header every result starts with, append-only records files
- servers: our server and vLLM's in processes of their own, on free ports, until they are stopped
- datasets: GSM8K's and generated arithmetic questions, and how an answer is checked
- scoring: a Hugging Face model's log p of a completion (the self-reward of the base model)
- tiny_models: enumerable Llama models whose every completion's probability is exact
"""
