"""The versioned gRPC API of the prediction service (``serving.api.v1``: package ``headwater.serving.v1``)."""
