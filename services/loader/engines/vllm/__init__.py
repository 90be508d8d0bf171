"""The vLLM engine: serves the ``vllm`` backend (``engine.VLLMEngine``).

Modules: ``hooks`` (per-row steering and capture on vLLM's flat batches and
``(hidden, residual)`` decoder layers; no vLLM import) and ``engine`` (the ``Engine``
interface over ``vllm.LLM``, run in-process so the hooks reach the model).
"""
