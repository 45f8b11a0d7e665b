"""The gRPC server: servicer, error mapping, interceptors and process lifecycle."""
