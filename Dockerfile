# The gpufleet image the Helm chart runs (operator and gateway). Engines run their own official
# images (vLLM, SGLang, llama.cpp). Not built by CI here (no registry access for base images).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --uid 1000 --no-create-home --home-dir /tmp gpufleet
USER 1000
ENV HOME=/tmp PYTHONUNBUFFERED=1
ENTRYPOINT ["gpufleet"]
