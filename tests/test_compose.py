"""Static checks of the Docker stack: docker-compose.yaml, .env.example and the postgres init script.

No Docker engine is needed. The tests that run `docker-compose config` (or
`docker compose config`) are skipped when neither command is installed. The rest
read the YAML with PyYAML.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yaml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}
ALL_SERVICES = AIRFLOW_SERVICES | {"postgres", "redis", "mlflow"}
PLACEHOLDER = "change-me"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY($|_)")
# ${NAME}, ${NAME:-default} or ${NAME:?message}. `$${...}` is not one: it passes `${...}` to the container's shell.
VARIABLE_REFERENCE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}")
ONLY_REFERENCES = re.compile(rf"^(?:{VARIABLE_REFERENCE.pattern})*$")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<password>[^@\s]+)@")
# A YAML `key: value` line whose key is a plain name.
YAML_KEY_LINE = re.compile(r"^\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*):\s+(?P<value>\S.*)$")
VOLUME_ENTRY = re.compile(r"^(?P<source>.+?):(?P<target>/[^:]*)(?::(?P<mode>[a-z,]+))?$")


def find_compose_command() -> list[str] | None:
    """Return `docker-compose` or `docker compose`, whichever is installed, else None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


COMPOSE_COMMAND = find_compose_command()
requires_compose = pytest.mark.skipif(
    COMPOSE_COMMAND is None,
    reason="neither `docker-compose` nor `docker compose` is installed; on Debian: "
    "apt-get install -y --no-install-recommends docker-compose",
)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=value lines, ignoring comments and blank lines."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{path.name}: line without '=': {line!r}"
        values[key.strip()] = value.strip()
    return values


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess:
    """Run `config` against `env_file` with a bare environment, so no shell variable overrides it."""
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    return subprocess.run(
        [*COMPOSE_COMMAND, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=PROJECT_ROOT,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def resolved_config(tmp_path_factory) -> dict:
    """The output of `config` with a `.env` copied from `.env.example`, parsed."""
    folder = tmp_path_factory.mktemp("compose")
    env_file = folder / ".env"
    shutil.copyfile(ENV_EXAMPLE, env_file)
    result = run_compose_config(env_file)
    assert result.returncode == 0, f"{' '.join(COMPOSE_COMMAND)} config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def is_secret_name(name: str) -> bool:
    """Return whether a variable contains a secret. A `*_FILE` variable contains a path, not a secret."""
    return bool(SECRET_NAME.search(name)) and not name.endswith("_FILE")


def split_volume(entry: str) -> tuple[str, str]:
    """Return (source, target) of a short volume entry, whose source may contain ${NAME:-default}."""
    match = VOLUME_ENTRY.match(entry)
    assert match, f"unexpected volume entry {entry!r}"
    return match["source"], match["target"]


def mounts(volumes: list[str]) -> dict[str, str]:
    """Map each mount target to its source."""
    return {target: source for source, target in map(split_volume, volumes)}


def published_ports(service: dict) -> list:
    return service.get("ports", [])


def port_host_ip(port) -> str:
    """Return the host address of a short ("IP:HOST:CONTAINER") or long (mapping) port entry."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    parts = VARIABLE_REFERENCE.sub("VARIABLE", str(port)).split(":")
    return parts[0] if len(parts) == 3 else ""


@requires_compose
def test_compose_config_accepts_env_example(resolved_config):
    assert set(resolved_config["services"]) == ALL_SERVICES


@requires_compose
def test_compose_config_rejects_missing_secret(tmp_path, env_example):
    env_file = tmp_path / ".env"
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("POSTGRES_PASSWORD=")]
    env_file.write_text("\n".join(lines) + "\n")
    result = run_compose_config(env_file)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


@requires_compose
def test_resolved_ports_bind_to_loopback(resolved_config):
    for name, service in resolved_config["services"].items():
        for port in published_ports(service):
            assert port_host_ip(port) == "127.0.0.1", f"{name}: {port}"


@requires_compose
def test_resolved_tracking_uri_points_at_mlflow(resolved_config):
    for name in AIRFLOW_SERVICES:
        environment = resolved_config["services"][name]["environment"]
        assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name


def test_every_airflow_service_uses_shared_environment(compose, services):
    shared = compose["x-airflow-common"]["environment"]
    airflow_services = {name for name in services if name.startswith("airflow-")}
    assert airflow_services == AIRFLOW_SERVICES
    for name in AIRFLOW_SERVICES:
        environment = services[name]["environment"]
        for key, value in shared.items():
            assert environment.get(key) == value, f"{name}: {key}"


def test_every_airflow_service_mounts_shared_volumes(compose, services):
    shared = compose["x-airflow-common"]["volumes"]
    for name in AIRFLOW_SERVICES:
        assert services[name]["volumes"] == shared, name


def test_shared_volumes_mount_project_folders(compose):
    targets = mounts(compose["x-airflow-common"]["volumes"])
    assert targets["/opt/airflow/dags"] == "./dags"
    assert targets["/opt/airflow/plugins"] == "./plugins"
    assert "FER_HOST_DATA_DIR" in targets["/opt/airflow/data"]
    assert "FER_HOST_OUTPUT_DIR" in targets["/opt/airflow/output"]


def test_fer_folders_are_on_mounted_volumes(compose):
    environment = compose["x-airflow-common"]["environment"]
    mount_points = [Path(target) for target in mounts(compose["x-airflow-common"]["volumes"])]
    for key in ("FER_OUTPUT_DIR", "FER_CACHE_DIR", "FER_BUILTIN_DATA_DIR"):
        folder = Path(environment[key])
        assert any(folder == mount or mount in folder.parents for mount in mount_points), key


def test_tracking_uri_points_at_mlflow_service(compose, services):
    uri = urlsplit(compose["x-airflow-common"]["environment"]["MLFLOW_TRACKING_URI"])
    assert uri.scheme == "http"
    assert uri.hostname == "mlflow"
    assert uri.hostname in services
    assert f"--port={uri.port}" in services["mlflow"]["command"]


def test_mlflow_serves_artifacts_from_named_volume(compose, services):
    command = services["mlflow"]["command"]
    destination = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--artifacts-destination="))
    assert "--serve-artifacts" in command
    assert mounts(services["mlflow"]["volumes"])[destination] in compose["volumes"]


def test_mlflow_uses_postgres_backend(services):
    backend = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://")
    assert "@postgres:5432/" in backend


def test_every_service_has_healthcheck(services):
    for name, service in services.items():
        assert "healthcheck" in service, name
        healthcheck = service["healthcheck"]
        if not healthcheck.get("disable"):
            assert healthcheck.get("test"), name


def test_only_one_shot_services_disable_healthcheck(services):
    for name, service in services.items():
        if not service["healthcheck"].get("disable"):
            continue
        assert service.get("restart") == "no", name
        for other_name, other in services.items():
            condition = other.get("depends_on", {}).get(name, {}).get("condition")
            if condition is not None:
                assert condition == "service_completed_successfully", f"{other_name} -> {name}"


def test_published_ports_bind_to_loopback(services):
    for name, service in services.items():
        for port in published_ports(service):
            assert port_host_ip(port) == "127.0.0.1", f"{name}: {port}"


def test_depends_on_uses_conditions(services):
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must map services to conditions"
        for dependency, settings in depends_on.items():
            assert dependency in services, f"{name} -> {dependency}"
            condition = settings.get("condition")
            if services[dependency]["healthcheck"].get("disable"):
                assert condition == "service_completed_successfully", f"{name} -> {dependency}"
            else:
                assert condition == "service_healthy", f"{name} -> {dependency}"


def test_workers_can_be_scaled(services):
    worker = services["airflow-worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert {"airflow-apiserver", "mlflow"} <= set(worker["depends_on"])


def test_no_password_literal_in_environment(compose, services):
    blocks = {"x-airflow-common": compose["x-airflow-common"], **services}
    for block_name, block in blocks.items():
        for key, value in (block.get("environment") or {}).items():
            text = "" if value is None else str(value)
            if is_secret_name(key):
                assert ONLY_REFERENCES.match(text), f"{block_name}: {key} holds a literal value"
            for match in URL_PASSWORD.finditer(text):
                assert ONLY_REFERENCES.match(match["password"]), f"{block_name}: {key} has a password in its URL"


def test_no_password_literal_in_compose_text():
    text = COMPOSE_FILE.read_text()
    for match in URL_PASSWORD.finditer(text):
        assert ONLY_REFERENCES.match(match["password"]), match.group(0)
    for line in text.splitlines():
        match = YAML_KEY_LINE.match(line)
        if match and is_secret_name(match["key"]):
            assert ONLY_REFERENCES.match(match["value"].strip("\"'")), line


def test_secrets_are_required():
    text = COMPOSE_FILE.read_text()
    for match in VARIABLE_REFERENCE.finditer(text):
        if re.search(r"PASSWORD|SECRET", match["name"]):
            assert match["operator"] == ":?", f"{match.group(0)} needs ':?' so that it has no default"


def test_env_example_lists_every_setting(env_example):
    referenced = {match["name"] for match in VARIABLE_REFERENCE.finditer(COMPOSE_FILE.read_text())}
    assert referenced - set(env_example) == set()
    assert set(env_example) - referenced == set()


def test_env_example_matches_compose_defaults(env_example):
    for match in VARIABLE_REFERENCE.finditer(COMPOSE_FILE.read_text()):
        if match["operator"] == ":-":
            assert env_example[match["name"]] == match["argument"], match["name"]


def test_env_example_has_placeholders_for_secrets(env_example):
    for match in VARIABLE_REFERENCE.finditer(COMPOSE_FILE.read_text()):
        if match["operator"] == ":?":
            assert env_example[match["name"]] == PLACEHOLDER, match["name"]


def test_placeholders_are_rejected_at_start(services, env_example):
    """Each placeholder secret is checked by postgres or airflow-init before first use."""
    guards = services["postgres"]["command"][-1] + services["airflow-init"]["command"][-1]
    assert f"== {PLACEHOLDER}*" in services["postgres"]["command"][-1]
    assert f"== {PLACEHOLDER}*" in services["airflow-init"]["command"][-1]
    for name, value in env_example.items():
        if value == PLACEHOLDER:
            assert name in guards, name


def test_init_creates_training_pool_and_migrates(services):
    script = services["airflow-init"]["command"][-1]
    assert "airflow db migrate" in script
    assert "airflow pools set training" in script
    assert services["airflow-init"]["user"] == "0:0"
    assert "chown -R" in script


def test_worker_settings_spread_trainings(compose):
    environment = compose["x-airflow-common"]["environment"]
    assert environment["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "${AIRFLOW_WORKER_CONCURRENCY:-1}"
    assert "FER_TF_INTRA_OP_THREADS" in environment
    assert "FER_TF_INTER_OP_THREADS" in environment


def test_postgres_init_script_is_mounted(services):
    scripts = [
        (source, target)
        for target, source in mounts(services["postgres"]["volumes"]).items()
        if target.startswith("/docker-entrypoint-initdb.d/")
    ]
    assert len(scripts) == 1
    source, target = scripts[0]
    assert (PROJECT_ROOT / source).is_file()
    assert target.endswith(".sh")


def test_postgres_init_script_creates_mlflow_database():
    script = (PROJECT_ROOT / "docker/postgres/create-mlflow-database.sh").read_text()
    assert "CREATE ROLE :\"mlflow_user\"" in script
    assert "CREATE DATABASE :\"mlflow_database\" OWNER :\"mlflow_user\"" in script
    result = subprocess.run(
        ["bash", "-n", str(PROJECT_ROOT / "docker/postgres/create-mlflow-database.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_airflow_image_is_built_from_dockerfile(compose):
    image = compose["x-fer-image"]
    assert image["build"]["context"] == "."
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert "FROM apache/airflow:3.3.2-python3.11" in dockerfile
    assert "uv export --frozen --no-dev --no-hashes --no-emit-project" in dockerfile
