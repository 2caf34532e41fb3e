"""MLflow: runs, params, metrics, pictures and models."""
