# Run on the lent GPU machine after the staging calls (see bench/RESULTS.md): every benchmark
# of issues 2 and 5 in one command. Results go to a work folder and, after every step, into ONE
# archive under $OUT ($OUT/results.tgz): the device returns at most 8 files from a command and
# a command cut short by its time limit still returns what finished.
#   . bench/device_setup.sh && bash bench/device_bench.sh [STEP ...]
# STEPs (default: all, in this order): steerer gpu_check bf16 nf4 capture_sizes profile int8.
set -u
STEPS=${*:-steerer gpu_check bf16 nf4 capture_sizes profile int8}
want() { [[ " $STEPS " == *" $1 "* ]]; }
WORK=/tmp/qsens-bench
mkdir -p "$OUT" "$WORK"
run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.json" 2>"$WORK/$name.log"
  echo "$name rc=$? $((SECONDS - start))s" | tee -a "$WORK/summary.txt"
  tar czf "$OUT/results.tgz" -C "$WORK" .
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$WORK/gpu.txt"
want steerer && run steerer_bf16 300 python bench/bench_steerer.py --precision bf16 --device cuda --probes 5,4,1
want gpu_check && run gpu_check 120 python bench/gpu_check.py
want bf16 && run loader_bf16 120 python bench/bench_loader.py --precision bf16 --device cuda
want nf4 && run loader_nf4 150 python bench/bench_loader.py --precision nf4 --device cuda
for copies in 16 64; do  # capture at 320 and 1 280 rows: launch-bound vs compute-bound
  want capture_sizes && run "capture_bf16_x$copies" 90 python bench/bench_loader.py \
    --precision bf16 --device cuda --parts capture --capture-copies "$copies"
done
want profile && run capture_profile 150 python bench/capture_profile.py --device cuda --copies 4,16,64
want int8 && run loader_int8 540 python bench/bench_loader.py --precision int8 --device cuda --repeats 3
true
