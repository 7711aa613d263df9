# One image for every streamlearn command (train, serve, produce, dlq, status...).
# CPU torch by default. The CUDA variant (for the trainer on a GPU):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t streamlearn:0.1.0-cuda .
# The CUDA wheels bring their CUDA libraries; the host needs only the NVIDIA driver and the
# container toolkit. BASE_IMAGE swaps the base (an nvidia/cuda image with Python 3.11, say).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 10001 streamlearn && useradd --create-home --uid 10001 --gid 10001 streamlearn \
    && mkdir /snapshots && chown 10001:10001 /snapshots
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
# torch first, from TORCH_INDEX_URL, so that installing streamlearn never pulls another build.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" && pip install ".[s3]"

USER 10001:10001
VOLUME ["/snapshots"]
EXPOSE 8000 9101
ENTRYPOINT ["streamlearn"]
CMD ["--help"]
