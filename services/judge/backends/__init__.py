"""Judge backends: ``openai`` (any OpenAI-compatible endpoint), ``embedding`` (offline) and
``loader`` (a loader-hosted model scoring the integers as sequences)."""
