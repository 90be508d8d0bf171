# Builds the staging parts that bench/device_vllm.sh assembles on the lent GPU machine (run it
# here, where PyPI answers): vLLM 0.26.0's wheel (the newest that pins torch==2.11.0, the
# machine's), repacked without what a dense Llama on a Hopper GPU never loads, xz-compressed and
# split into .stage/v1 and .stage/v2 (55 MiB parts: with the tree each call stays under the
# 64 MiB a call carries), plus the wheels of vLLM's import-time requirements in
# .stage/v2/wheels (the image's own torch, transformers, numpy, pillow... are not carried).
#
#   bash bench/stage_vllm.sh        # about 3 minutes (xz -9 on two cores)
set -eu
VERSION=0.26.0
STAGE=${STAGE:-.stage}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
  --platform manylinux_2_5_x86_64"
# shellcheck disable=SC2086
download() {
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLATFORMS "$@"
}
mkdir -p .whl/vllm-src .whl/vdeps
download --no-deps -d .whl/vllm-src "vllm==$VERSION"
# What vLLM imports when it starts a dense model (read from its sources and checked by an
# import of its engine, worker, model runner and attention modules): the structured-output
# backends load at import, flashinfer, opencv, numba, ray, cutlass-dsl only on other paths.
download -d .whl/vdeps regex cachetools psutil requests tqdm blake3 py-cpuinfo aiohttp openai \
  prometheus_client prometheus-fastapi-instrumentator partial-json-parser jsonschema pyzmq \
  msgspec pyyaml einops depyf==0.20.0 cloudpickle pybase64 cbor2 ijson setproctitle \
  'openai-harmony>=0.0.3' uvloop six filelock
# opentelemetry-api: added for the first GPU run (the image's own OpenTelemetry packages
# reached vLLM's tracing import without it).
download --no-deps -d .whl/vdeps compressed-tensors==0.17.0 'llguidance>=1.7,<1.8' \
  'xgrammar>=0.2.1,<1.0' outlines_core==0.2.14 apache-tvm-ffi==0.1.11 opentelemetry-api==1.45.3
# The loader's own wheels (.whl/rest, carried beside) and the image's pillow stay out.
(cd .whl/vdeps && rm -f annotated_types-* pydantic-* pydantic_core-* starlette-* \
  typing_extensions-* typing_inspection-* pillow-*)

work=$(mktemp -d)
unzip -q .whl/vllm-src/vllm-$VERSION-*.whl -d "$work" \
  -x 'vllm/third_party/deep_gemm/*' 'vllm/third_party/fmha_sm100/*' \
  'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' 'vllm/_moe_C_stable_libtorch.abi3.so' \
  'vllm/_flashmla_C.abi3.so' 'vllm/_flashmla_extension_C.abi3.so' 'vllm/_qutlass_C.abi3.so' \
  'vllm/_rust_tool_parser.abi3.so' 'vllm/vllm-rs' 'vllm/fs_io_C.abi3.so'
(cd "$work" && tar cf - vllm "vllm-$VERSION.dist-info" | xz -T2 -9 > vllm.tar.xz)
rm -rf "$STAGE/v1" "$STAGE/v2"
mkdir -p "$STAGE/v1" "$STAGE/v2/wheels"
split -d -a 1 -b $((55 * 1048576)) "$work/vllm.tar.xz" "$work/part."
[ ! -e "$work/part.2" ] || { echo "the archive needs more than two parts"; exit 1; }
mv "$work/part.0" "$STAGE/v1/vllm.tar.xz.part0"
mv "$work/part.1" "$STAGE/v2/vllm.tar.xz.part1"
(cd "$work" && sha256sum vllm.tar.xz) > "$STAGE/v2/vllm.tar.xz.sha256"
cp .whl/vdeps/*.whl "$STAGE/v2/wheels/"
rm -rf "$work"
du -sb "$STAGE/v1" "$STAGE/v2"
