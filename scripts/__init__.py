"""Developer scripts; `scripts.feedsim` is importable so tests can run the simulated feed."""
