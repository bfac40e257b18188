#!/bin/sh
# Start `mlflow server` with basic auth whose user store lives in PostgreSQL.
#
# MLflow reads the auth database URI only from an ini file, so this script writes one from the
# environment at start (no secret is stored in the image or the repository). The admin account
# is bootstrapped from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD on first start.
# Backend store and artifact destination come from MLFLOW_BACKEND_STORE_URI and
# MLFLOW_ARTIFACTS_DESTINATION (read by `mlflow server` itself).
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?MLFLOW_AUTH_DATABASE_URI must be set}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH_ADMIN_PASSWORD must be set}"

umask 077
config="$(mktemp -d)/basic_auth.ini"
cat > "$config" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"

exec mlflow server "$@"
