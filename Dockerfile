# syntax=docker/dockerfile:1
# The moe-serve image: Ray 2.60 on CUDA with Python 3.11, plus torch and this package.
# The Helm chart runs <image.repository>:<appVersion>, so tag it with the package version:
#   docker build -t REGISTRY/moe-serve:0.1.0 . && docker push REGISTRY/moe-serve:0.1.0
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# PyPI's Linux torch wheels carry their own CUDA runtime, so they need only the node's driver.
# Another CUDA build comes from PyTorch's index, e.g.
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
# Its own layer: source edits do not reinstall a multi-GB torch.
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"

# Only what the package is built from; the base image's ray already satisfies ray[serve]==2.60.*.
WORKDIR /tmp/moe-serve
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 protos protos
COPY --chown=1000:100 router router
COPY --chown=1000:100 expert_service expert_service
COPY --chown=1000:100 attention_service attention_service
COPY --chown=1000:100 cluster cluster
RUN pip install --no-cache-dir . && rm -rf /tmp/moe-serve
WORKDIR /home/ray

# With no checkpoint given, the app serves the embedded tiny model. Serve builds the app on
# the head and runs replicas on other pods, so the model must sit at the same path in every
# pod: it is made here, once, instead of on first use.
ENV MOE_SERVE_CACHE=/home/ray/.cache/moe-serve
RUN python -c "from cluster.serve.app_config import default_model; print(default_model())"
