# The MLflow tracking server with its PostgreSQL driver and S3 client.
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/panet-on-ray/mlflow:3.17.0 infra/docker
FROM ghcr.io/mlflow/mlflow:v3.17.0

RUN pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.35.99

USER 1000
EXPOSE 5000
