"""The transformers engine: serves the hf, bnb, gptq and awq backends (``engine.HFEngine``).

Modules: ``core`` (the loaded model, its fast paths and the batching it shares), ``tokens``,
``batching``, ``sampling``, and one module per computation (``generate``, ``capture``,
``score``, ``next_token``); ``engine`` puts them behind the ``Engine`` interface.
"""
