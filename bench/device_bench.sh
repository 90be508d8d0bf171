# Run on the lent GPU machine after the staging calls (see bench/RESULTS.md): every benchmark
# of issues 2 and 5 in one command, each result written to $OUT as soon as it exists, so a
# command cut short by the device's time limit still returns what finished.
#   . bench/device_setup.sh && bash bench/device_bench.sh
set -u
mkdir -p "$OUT"
run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
  echo "$name rc=$? ${SECONDS}s-$start" | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run gpu_check 120 python bench/gpu_check.py
run steerer_bf16 300 python bench/bench_steerer.py --precision bf16 --device cuda --probes 5,4,1
run loader_bf16 120 python bench/bench_loader.py --precision bf16 --device cuda
run loader_nf4 150 python bench/bench_loader.py --precision nf4 --device cuda
run loader_int8 400 python bench/bench_loader.py --precision int8 --device cuda --repeats 3
