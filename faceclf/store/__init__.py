"""Object store (S3 or a local folder), atomic writes and the model registry: everything that persists."""
