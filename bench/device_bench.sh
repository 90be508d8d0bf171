# Run on the lent GPU machine after `. bench/device_setup.sh` (see bench/RESULTS.md): the
# benchmarks of issues 2, 5 and 16 as named steps. Results go to a work folder and, after every
# step, into ONE archive under $OUT ($OUT/results.tgz): the device returns at most 8 files from
# a command, and a command cut short by its time limit still returns what finished. Each loader
# step prints its roofline table (stderr of bench_loader.py) so that it shows in the reply.
#   . bench/device_setup.sh && bash bench/device_bench.sh STEP ...
# Issue 16 (Llama-3.1-8B-shaped random models; built on first use, cached in $QSENS_CACHE_DIR):
#   check_mid   gpu_check on a mid-size tiny Llama, bf16 and nf4 (graph replay == eager, ...)
#   check_8b    gpu_check on the 16-layer 8B shape, bf16
#   bf16_8b     bench_loader, 16 layers, bf16, transformers' path and the seed loop alongside,
#               kernel profile of the sweep
#   nf4_8b      the same at nf4 (no transformers' path)
#   steerer_8b  one trait's adaptive search (11 layers x 20 questions x 64 tokens) over gRPC
#   bf16_32l    bench_loader sweep, 32 layers (the full 8B shape), bf16
#   steerer_32l the study cell on the 32-layer model
# Issues 2 and 5 (SmolLM2-135M: stage the GGUF first): steerer gpu_check bf16 nf4
#   capture_sizes profile int8
set -u
STEPS=${*:-check_mid bf16_8b nf4_8b}
want() { [[ " $STEPS " == *" $1 "* ]]; }
WORK=/tmp/qsens-bench
mkdir -p "$OUT" "$WORK"
SHAPE='hidden=4096&heads=32&kv_heads=8&intermediate=14336&bf16=1'
M16="tiny:llama?layers=16&$SHAPE"
M32="tiny:llama?layers=32&$SHAPE"
MID='tiny:llama?layers=6&hidden=1024&heads=16&kv_heads=4&intermediate=2816'
run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.json" 2>"$WORK/$name.log"
  echo "$name rc=$? $((SECONDS - start))s" | tee -a "$WORK/summary.txt"
  tar czf "$OUT/results.tgz" -C "$WORK" .
}
table() {  # the roofline table a loader bench printed last
  tail -26 "$WORK/$1.log"
}
checks() {  # the verdicts of a gpu_check run
  python - "$WORK/$1.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    f = r.get("fast_generation", {})
    keep = {k: f.get(k) for k in ("graph", "graph_replays", "graphs_disabled",
            "graph_replay_equals_eager", "coef0_generation_exact")}
    cmp = {k: v for k, v in f.items() if isinstance(v, dict)}
    print(r["variant"], keep, "coef0", r["coef0_identity"], "abl", r["ablation_relative_residue"],
          "graphs", r["capture_graphs"].get("graph_vs_static_eager_max_rel_err"))
    for k, v in cmp.items():
        print("  ", k, v)
PY
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$WORK/gpu.txt"
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$WORK/gpu.txt"
if want bf16_8b; then
  run loader_bf16_8b 420 python bench/bench_loader.py --model "$M16" --precision bf16 \
    --device cuda --repeats 3 --profile
  table loader_bf16_8b
fi
want check_mid && run gpu_check_mid 240 python bench/gpu_check.py --model "$MID" \
  --precisions bf16,nf4 && checks gpu_check_mid
want check_8b && run gpu_check_8b 240 python bench/gpu_check.py --model "$M16" \
  --precisions bf16 && checks gpu_check_8b
if want nf4_8b; then
  run loader_nf4_8b 420 python bench/bench_loader.py --model "$M16" --precision nf4 \
    --device cuda --repeats 3 --no-compare-hf
  table loader_nf4_8b
fi
want steerer_8b && run steerer_8b 420 python bench/bench_steerer.py --model "$M16" \
  --precision bf16 --device cuda --max-new-tokens 64 --probes 5
if want bf16_32l; then
  run loader_bf16_32l 420 python bench/bench_loader.py --model "$M32" --precision bf16 \
    --device cuda --repeats 2 --parts sweep,capture --no-compare-hf --no-seed-loop
  table loader_bf16_32l
fi
want steerer_32l && run steerer_32l 420 python bench/bench_steerer.py --model "$M32" \
  --precision bf16 --device cuda --max-new-tokens 64 --probes 5
# Issues 2 and 5 (SmolLM2-135M).
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
cat "$WORK/summary.txt"
true
