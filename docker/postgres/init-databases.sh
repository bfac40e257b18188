#!/bin/sh
# First start of the PostgreSQL container only: one database per service.
#   prefect      Prefect server (flows, deployments, work pools)
#   mlflow       MLflow tracking + model registry
#   mlflow_auth  MLflow basic-auth users and permissions
set -eu
for db in prefect mlflow mlflow_auth; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
       -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\";"
done
