# The MLflow tracking server: MLflow with its basic-auth app (which needs Flask-WTF), the
# PostgreSQL driver (psycopg) and the S3 client (boto3), every package pinned by
# requirements-mlflow.txt (written by lock.py; tests/infra/test_mlflow_auth.py runs a server
# from the same file). Build context: this folder (mlflow.Dockerfile.dockerignore keeps .env out).
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/panet-on-ray/mlflow:3.17.0 infra/docker
FROM python:3.11-slim-bookworm

COPY requirements-mlflow.txt /tmp/requirements-mlflow.txt
RUN pip install --no-cache-dir -r /tmp/requirements-mlflow.txt \
    && python -c "import flask_wtf, psycopg, boto3, mlflow.server.auth" \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin mlflow

WORKDIR /home/mlflow
USER 1000
EXPOSE 5000
