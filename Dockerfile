# One image for every streamlearn command. CPU torch by default; for CUDA pass a CUDA base
# image and a CUDA torch: --build-arg BASE_IMAGE=... --build-arg TORCH_INDEX_URL=...
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 streamlearn && mkdir /snapshots && chown streamlearn /snapshots
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" && pip install .

USER streamlearn
VOLUME ["/snapshots"]
ENTRYPOINT ["streamlearn"]
CMD ["--help"]
