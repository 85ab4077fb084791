# One image for every service of docker-compose.yaml: Airflow 3.3.2 on Python 3.11
# with the project's locked dependencies, the fer_tasks package and the MLflow server.

# Stage 1: turn uv.lock into a pinned requirements file.
FROM apache/airflow:3.3.2-python3.11 AS requirements
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /tmp/uv
COPY pyproject.toml uv.lock /tmp/project/
WORKDIR /tmp/project
RUN /tmp/uv export --frozen --no-dev --no-hashes --no-emit-project --output-file /tmp/requirements.txt

# Stage 2: the image.
FROM apache/airflow:3.3.2-python3.11

# The MLflow service stores artifacts here. A named volume mounted on this path
# starts as a copy of it, so it belongs to `airflow` instead of root.
USER root
RUN mkdir -p /opt/mlflow/artifacts \
    && chown -R airflow:0 /opt/mlflow \
    && chmod -R g+rwX /opt/mlflow
USER airflow

# The lock pins every package, apache-airflow==3.3.2 included, so Airflow's
# constraints file is not used. psycopg2 is the postgres driver of both Airflow's
# metadata database and MLflow's backend store; uv.lock does not contain it.
# NOTE: the base image's providers (celery, postgres, redis and others) are not
# in uv.lock; pip keeps them, but their requirements were not checked against
# the lock's pins.
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt psycopg2-binary==2.9.13

COPY --chown=airflow:0 pyproject.toml README.md /opt/fer-pipeline/
COPY --chown=airflow:0 fer_tasks /opt/fer-pipeline/fer_tasks
RUN pip install --no-cache-dir --no-deps /opt/fer-pipeline
