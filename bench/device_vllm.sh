# The vLLM engine on a lent GPU machine (torch 2.11.0+cu130, no network): vLLM 0.26.0, the
# newest whose wheel pins torch 2.11.0, travels in parts of at most 55 MiB (.stage/v1, v2, ...:
# a repacked wheel as vllm.tar.xz.partN, plus the wheels of its import-time requirements in
# .stage/v*/wheels), one part per call while the machine stays warm (30 s between calls).
#
#   bash bench/device_vllm.sh stage        # any call: copy the carried parts to /tmp/vstage
#   bash bench/device_vllm.sh run [ARGS]   # last call: stage, assemble, install, smoke, bench
#
# run: checks the archive's sha256, unpacks vLLM into /tmp/vsite, installs the carried wheels
# whose distribution the image lacks (the image's own torch, transformers, numpy stay), the
# loader's wheels (.whl/rest) into /tmp/site, imports vLLM and its CUDA kernels, then runs
# bench/bench_engines.py (ARGS replace its defaults) with a time limit. Results in $OUT:
# engines.json (written after every phase), engines.log, freeze.txt, smoke.txt.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/vstage
PIP="python3 -m pip"
$PIP --version >/dev/null 2>&1 || PIP=pip  # a venv made without pip: the PATH's pip
for part in .stage/v*/; do
  [ -d "$part" ] && cp -r "$part". /tmp/vstage/
done
ls -la /tmp/vstage /tmp/vstage/wheels 2>/dev/null | tail -n +1 > "$OUT/staged.txt"
$PIP freeze > "$OUT/freeze.txt" 2>&1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -V; } \
  >> "$OUT/staged.txt" 2>&1
[ "${1:-stage}" = "stage" ] && { cat "$OUT/staged.txt"; exit 0; }
shift

export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD QSENS_CACHE_DIR=/tmp/qcache PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
if [ ! -f /tmp/vsite/.done ]; then
  echo "assemble: $(date -u +%T)"
  (cd /tmp/vstage && cat vllm.tar.xz.part* | sha256sum -c --status <(sed 's/ .*/  -/' vllm.tar.xz.sha256)) \
    || { echo "vllm.tar.xz parts do not match vllm.tar.xz.sha256"; ls -la /tmp/vstage; exit 3; }
  mkdir -p /tmp/vsite /tmp/site
  cat /tmp/vstage/vllm.tar.xz.part* | python3 -c \
    "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/vsite', filter='tar')" \
    || exit 3
  # The carried wheels whose distribution the image does not have.
  missing=$(python3 - <<'EOF'
import glob, importlib.metadata as md, re
for wheel in sorted(glob.glob("/tmp/vstage/wheels/*.whl")):
    name = re.split(r"-\d", wheel.rsplit("/", 1)[1], maxsplit=1)[0]
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
  echo "installing: $(echo $missing | wc -w) wheels"
  # shellcheck disable=SC2086
  [ -z "$missing" ] || $PIP install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/vsite $missing || exit 3
  $PIP install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/rest/*.whl || exit 3
  touch /tmp/vsite/.done
  echo "installed: $(date -u +%T)"
fi
python3 - > "$OUT/smoke.txt" 2>&1 <<'EOF'
import torch, transformers, vllm
from vllm import LLM  # noqa: F401
from vllm.platforms import current_platform
current_platform.import_kernels()
import vllm.v1.worker.gpu_model_runner  # noqa: F401
import vllm.model_executor.models.llama  # noqa: F401
from vllm.vllm_flash_attn.flash_attn_interface import FA3_AVAILABLE, FA3_UNAVAILABLE_REASON
print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
print("platform", type(current_platform).__name__, "FA3", FA3_AVAILABLE, FA3_UNAVAILABLE_REASON)
print("_C ops", hasattr(torch.ops._C, "rms_norm"), hasattr(torch.ops._C, "silu_and_mul"))
EOF
rc=$?
cat "$OUT/smoke.txt"
[ $rc -eq 0 ] || exit 4
echo "bench: $(date -u +%T)"
timeout "${QSENS_VLLM_BENCH_TIMEOUT:-500}" python3 bench/bench_engines.py --device cuda \
  --model 'tiny:llama?layers=16&hidden=4096&heads=32&kv_heads=8&intermediate=14336&bf16=1' \
  --repeats 3 --total "${QSENS_VLLM_BENCH_TOTAL:-480}" --out "$OUT/engines.json" "$@" \
  > "$OUT/engines.log" 2>&1
rc=$?
tail -c 6000 "$OUT/engines.log"
echo "bench rc $rc at $(date -u +%T)"
exit $rc
