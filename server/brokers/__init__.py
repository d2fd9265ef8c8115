"""Brokers: the `Broker` protocol and its adapters (PaperBroker is the embedded default)."""
