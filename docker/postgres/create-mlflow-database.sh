#!/usr/bin/env bash
# Create MLflow's role and database beside Airflow's metadata database.
#
# The postgres image runs this from /docker-entrypoint-initdb.d only on the first
# start of an empty data volume. Later changes to the MLFLOW_DB_* settings need
# ALTER ROLE by hand or a new volume (`docker compose down -v` deletes all runs).
#
# psql quotes the values itself (:"name" as an identifier, :'name' as a literal).
# The connection URLs in docker-compose.yaml do not, so passwords must be
# URL-safe, hex for example.
set -euo pipefail

psql --set=ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" \
    --dbname "$POSTGRES_DB" \
    --set=mlflow_user="$MLFLOW_DB_USER" \
    --set=mlflow_password="$MLFLOW_DB_PASSWORD" \
    --set=mlflow_database="$MLFLOW_DB_NAME" <<'SQL'
CREATE ROLE :"mlflow_user" WITH LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE :"mlflow_database" OWNER :"mlflow_user";
SQL
