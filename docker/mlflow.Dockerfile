# The MLflow tracking server for k8s/ (PostgreSQL backend, artifacts proxied by the server):
# MLflow at the version raybooth is tested with, plus the PostgreSQL driver. Non-root.
#
#   docker build -f docker/mlflow.Dockerfile -t registry.example.com/raybooth-mlflow:3.17.2 docker
FROM python:3.11.14-slim-bookworm
RUN python -m pip install --no-cache-dir --only-binary=:all: \
        "mlflow==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
    && useradd --uid 1000 --gid 100 --no-create-home --home-dir /nonexistent mlflow \
    && mkdir -p /mlartifacts && chown 1000:100 /mlartifacts
USER 1000:100
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
