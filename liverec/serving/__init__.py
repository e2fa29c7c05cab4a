"""gRPC Recommend service, state replica, scorer, request batching."""
