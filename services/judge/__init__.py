"""The judge: scores answers 0-100 for a trait or for coherence, batched, cached and metered.

Workers use ``services.judge.client.JudgeClient``; ``services.judge.service`` serves it over NATS.
"""
