"""Everything Ray and MLflow: data, training, evaluation, tuning, tracking, the CLI."""
