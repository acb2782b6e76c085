# MLflow tracking server: PostgreSQL backend, S3-compatible (MinIO) artifacts, optional basic auth.
#   docker build -f infra/docker/mlflow.Dockerfile -t qwen-sft-mlflow .   (from the repo root)
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary boto3
# Scripts only; /opt/mlflow-server is not on sys.path, so it cannot shadow the mlflow package.
COPY mlflow/server.sh mlflow/basic_auth.ini /opt/mlflow-server/
ENV MLFLOW_HOST=0.0.0.0 \
    MLFLOW_PORT=5000 \
    MLFLOW_HOME=/var/lib/mlflow \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONUNBUFFERED=1
EXPOSE 5000
ENTRYPOINT ["bash", "/opt/mlflow-server/server.sh"]
CMD ["postgres"]
