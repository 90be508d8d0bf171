"""Judge backends: ``openai`` (any OpenAI-compatible endpoint) and ``embedding`` (offline)."""
