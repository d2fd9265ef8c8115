"""The gRPC surface: servicer (translation only), interceptors, health and reflection."""
