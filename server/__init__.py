"""algoplane: a gRPC control plane for time-based trading strategies."""
