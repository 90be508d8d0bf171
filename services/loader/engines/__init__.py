"""Engines behind the loader API (``services.loader.engine.Engine``), one package each."""
