# GPU serving image: unipool-serve on top of vLLM's own OpenAI image.
#
#   docker build -t unipool-serve:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#     -v /srv/models/my-unipool:/models:ro -v /srv/steering:/steering:ro \
#     unipool-serve:0.1.0 --api-key "$KEY"
#
# The model and the steering profiles are volumes; nothing is downloaded at start.
FROM vllm/vllm-openai:v0.32.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

WORKDIR /opt/unipool-serve
# .dockerignore lets in only pyproject.toml, README.md, the three code folders and
# models/ (the bundled demo model).
COPY . .

# Install the plugin into the image's Python without touching its CUDA stack:
# vllm, torch and triton are pinned to the versions the image ships, so pip either
# keeps them or fails loudly (no `[cuda]` extra, no second vLLM). Editable, so the
# sources stay here and the demo model is found beside them
# (demo/eval.py looks in ../models/unipool-demo).
RUN python3 -m pip list --format=freeze \
        | grep -iE '^(vllm|torch|triton)==' > /tmp/image-pins.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/image-pins.txt --editable . \
    && rm -f /tmp/image-pins.txt \
    && python3 -c "import unipool_serve.server, unipool_serve.model_executor" \
    && command -v unipool-serve

# Non-root user; /models and /steering are mount points it can read.
RUN useradd --create-home --home-dir /home/unipool --uid 10001 --user-group \
        --shell /usr/sbin/nologin unipool \
    && mkdir -p /models /steering \
    && chown unipool:unipool /models /steering
USER 10001:10001
ENV HOME=/home/unipool \
    HF_HOME=/home/unipool/.cache/huggingface
WORKDIR /home/unipool

VOLUME ["/models", "/steering"]
EXPOSE 8000

# vLLM opens the HTTP port only once the engine is built, so the start period
# covers weight loading and CUDA graph capture.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["unipool-serve"]
CMD ["--model", "/models", "--steering-dir", "/steering", "--host", "0.0.0.0", "--port", "8000"]
