"""The vLLM engine: serves the ``vllm`` backend (``engine.VLLMEngine``).

Modules: ``hooks`` (per-row steering and capture on vLLM's flat batches and
``(hidden, residual)`` decoder layers; no vLLM import), ``workers`` (one call's hooks as plain
data, installed on a model runner here or in each tensor-parallel worker) and ``engine`` (the
``Engine`` interface over ``vllm.LLM``, its engine core in this process).
"""
