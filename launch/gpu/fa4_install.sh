#!/usr/bin/env bash
# Install flash-attn-4 on the lent GPU machine (no network there) from wheels downloaded here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 --platform any flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
#     nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
#     quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
# The 92 MB libs-cu13 wheel is over one call's 64 MiB, so it travels split in two (`split -b 48M`,
# its sha256 in cu13.sha256) over two back-to-back calls while the machine stays warm:
#   call 1: bash launch/gpu/fa4_install.sh stage .fa4a
#   call 2: bash launch/gpu/fa4_install.sh stage .fa4b && bash launch/gpu/fa4_install.sh install
# then: export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages  (--target skips .pth files)
set -euo pipefail
STAGE=/tmp/fa4
case "${1:-}" in
  stage)
    mkdir -p "$STAGE" && cp "$2"/* "$STAGE"/ && ls -la "$STAGE" ;;
  install)
    cd "$STAGE"
    cat cu13.part.* > "$(awk '{print $2}' cu13.sha256)"
    sha256sum -c cu13.sha256
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ./*.whl
    PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 -c \
      "from flash_attn.cute import flash_attn_func; print('flash-attn-4 imports')" ;;
  *)
    echo "usage: $0 stage DIR | install" >&2; exit 2 ;;
esac
