"""Local services (moto S3, Prefect server and worker), the demo and generated sample faces."""
