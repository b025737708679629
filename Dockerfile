# lit-rlhf for cloud GPUs: CUDA runtime base, pinned Python dependencies, the package, a non-root user,
# and `lit-rlhf` as the entry point.
#
#   docker build -t lit-rlhf .
#   docker run --gpus all --rm -e WANDB_API_KEY -e HF_TOKEN \
#     -v lit-rlhf-cache:/cache -v "$PWD/outputs:/workspace/outputs" \
#     lit-rlhf fit --config recipes/qwen2.5-0.5b-lora.yaml
#
# Python comes from uv (a standalone CPython build), so no apt packages are needed.
FROM ghcr.io/astral-sh/uv:0.8.0 AS uv

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# CUDA variant of the torch wheel; must match the base image's CUDA (12.8 -> cu128)
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

COPY docker/requirements.txt /tmp/requirements.txt
RUN uv venv --python 3.11 /opt/venv \
    && uv pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" \
    && uv pip install -r /tmp/requirements.txt \
    && uv pip uninstall torchaudio torchcodec

WORKDIR /opt/lit-rlhf
COPY pyproject.toml README.md ./
COPY lit_rlhf ./lit_rlhf
RUN uv pip install --no-deps . \
    && groupadd --gid 10001 rlhf \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin rlhf \
    && mkdir -p /workspace/outputs /cache \
    && chown -R rlhf:rlhf /workspace /cache

WORKDIR /workspace
COPY --chown=10001:10001 recipes ./recipes

# Model downloads and built-in tiny models go to /cache; logs, checkpoints and W&B files to outputs/.
# Pass secrets at run time (-e WANDB_API_KEY -e HF_TOKEN); none is baked into the image.
ENV HF_HOME=/cache/huggingface \
    LIT_RLHF_CACHE=/cache/lit_rlhf \
    WANDB_DIR=/workspace/outputs
VOLUME ["/cache", "/workspace/outputs"]

USER 10001:10001
ENTRYPOINT ["lit-rlhf"]
CMD ["--help"]
