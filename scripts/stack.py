"""Start, stop and inspect the FER stack on this machine, without containers.

`make up` runs `python scripts/stack.py up`, which starts these processes:

- a PostgreSQL server with one database for Airflow's metadata and one for
  MLflow's backend store;
- `mlflow server`, which stores artifacts in the state folder and serves them, so
  tasks upload artifacts through it;
- the Airflow api-server, scheduler (LocalExecutor) and dag-processor.

Every server listens on 127.0.0.1 only.

All state lives in one folder (`.stack/` by default): generated passwords and
secrets (files of mode 0600), the PostgreSQL data, MLflow's artifacts, Airflow's
home with the task logs, one log file per service, and `stack.json` with the
ports and the process ids. `down` stops exactly the processes recorded there,
each by its own process group, and keeps the data for the next `up`.

PostgreSQL refuses to run as root. When this script runs as root, it starts
`initdb` and `postgres` as an unprivileged user (`postgres` if that user exists,
else `nobody`) and gives that user the PostgreSQL data folder.

Tests import `Stack` to start the stack on free ports in a temporary folder,
stop and start single services, and read the generated credentials.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
from run_dag import free_port  # noqa: F401 - tests import it from here with the Stack


PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "fer_pipeline"
DEFAULT_STATE_DIR = PROJECT_ROOT / ".stack"
DEFAULT_AIRFLOW_PORT = 8080
DEFAULT_MLFLOW_PORT = 5000
# Not 5432, so that a system PostgreSQL on its usual port does not block `make up`.
DEFAULT_POSTGRES_PORT = 15432

# Start order. `down` stops them in reverse.
SERVICES = ("postgres", "mlflow", "api-server", "scheduler", "dag-processor")
AIRFLOW_SERVICES = ("api-server", "scheduler", "dag-processor")

POSTGRES_SUPERUSER = "fer_admin"
AIRFLOW_DATABASE = "airflow"
MLFLOW_DATABASE = "mlflow"
AIRFLOW_USERNAME = "admin"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"

START_TIMEOUT_SECONDS = 240
STOP_TIMEOUT_SECONDS = 30
LOG_TAIL_CHARACTERS = 3000

logger = logging.getLogger("stack")


class StackError(RuntimeError):
    """Error raised when the stack cannot be started, stopped or reached, with the cause and the fix."""


@dataclasses.dataclass(frozen=True)
class StackSettings:
    """Ports and settings of one stack, which `up` stores in stack.json for `down` and `status`."""

    airflow_port: int = DEFAULT_AIRFLOW_PORT
    mlflow_port: int = DEFAULT_MLFLOW_PORT
    postgres_port: int = DEFAULT_POSTGRES_PORT
    # LocalExecutor task slots: at least 3, so that the three trainings run at once.
    parallelism: int = 4
    training_pool_slots: int = 3
    mlflow_workers: int = 2
    # Extra environment of the Airflow processes (and so of the tasks), such as FER_OUTPUT_DIR.
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        ports = {"airflow_port": self.airflow_port, "mlflow_port": self.mlflow_port,
                 "postgres_port": self.postgres_port}
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise StackError(f"{name} must be a TCP port in 1..65535, got {port}")
        if len(set(ports.values())) != len(ports):
            raise StackError(f"the three ports must differ, got {ports}")
        if self.parallelism < 3:
            raise StackError(f"parallelism must be at least 3 so the trainings run at once, got {self.parallelism}")


@dataclasses.dataclass(frozen=True)
class Credentials:
    """The Airflow UI login of the stack."""

    username: str
    password: str
    passwords_file: Path


def port_in_use(port: int) -> bool:
    """Return True when a program listens on `port` of 127.0.0.1.

    SO_REUSEADDR, as the servers set it, lets connections of a stopped server that
    linger in TIME_WAIT pass, so only a listening socket counts.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def find_postgres_bin() -> Path:
    """Return the folder of `initdb` and `postgres`: FER_POSTGRES_BIN, PATH, or Debian's newest version."""
    configured = os.environ.get("FER_POSTGRES_BIN")
    candidates = [Path(configured)] if configured else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda path: _version_key(path.parent.name))
    candidates.extend(reversed(debian))
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise StackError(
        "PostgreSQL server binaries (initdb, postgres) not found in FER_POSTGRES_BIN, on PATH or in "
        "/usr/lib/postgresql/*/bin. Install them, for example `apt-get install postgresql` on Debian, "
        "or set FER_POSTGRES_BIN to the folder that contains initdb."
    )


def _version_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in name.split("."))


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a new file that only its owner can read (mode 0600)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _log_tail(path: Path) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    text = path.read_text(errors="replace")[-LOG_TAIL_CHARACTERS:]
    return f"last lines of {path}:\n{text}"


def request_json(url: str, method: str = "GET", body: Any = None, token: str | None = None,
                 timeout: float = 30) -> tuple[int, Any]:
    """Send one HTTP request and return (status, body decoded from JSON, else as text)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload or b"null")
    except ValueError:
        return status, payload.decode(errors="replace")


class Stack:
    """Manage the local stack whose state lives in `state_dir`."""

    def __init__(self, state_dir: Path | str = DEFAULT_STATE_DIR, settings: StackSettings | None = None):
        self.state_dir = Path(state_dir).expanduser().resolve()
        stored = self._read_state().get("settings")
        if settings is None:
            settings = StackSettings(**stored) if stored else StackSettings()
        self.settings = settings

    # Paths and addresses.

    @property
    def state_file(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def secrets_file(self) -> Path:
        return self.state_dir / "secrets.json"

    @property
    def passwords_file(self) -> Path:
        """The simple auth manager's passwords file: {username: password}."""
        return self.state_dir / "airflow-passwords.json"

    @property
    def postgres_dir(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def airflow_home(self) -> Path:
        return self.state_dir / "airflow"

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "mlflow-artifacts"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def log_path(self, service: str) -> Path:
        return self.logs_dir / f"{service}.log"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.mlflow_port}"

    # State and secrets.

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}

    def _write_state(self, state: dict) -> None:
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        temporary.replace(self.state_file)

    def _settings_record(self) -> dict:
        return {**dataclasses.asdict(self.settings), "environment": dict(self.settings.environment)}

    def _record_process(self, service: str, process: psutil.Process | None) -> None:
        state = self._read_state()
        state["settings"] = self._settings_record()
        processes = state.setdefault("processes", {})
        if process is None:
            processes.pop(service, None)
        else:
            processes[service] = {"pid": process.pid, "create_time": process.create_time()}
        self._write_state(state)

    def secrets(self) -> dict[str, str]:
        """Return the generated passwords and keys, creating them (mode 0600) on first use."""
        try:
            return json.loads(self.secrets_file.read_text())
        except FileNotFoundError:
            pass
        values = {
            # Hex, because the passwords become part of database URLs.
            "postgres_superuser_password": secrets.token_hex(24),
            "airflow_db_password": secrets.token_hex(24),
            "mlflow_db_password": secrets.token_hex(24),
            "jwt_secret": secrets.token_hex(32),
            "api_secret_key": secrets.token_hex(32),
        }
        _write_private(self.secrets_file, json.dumps(values, indent=2) + "\n")
        return values

    def credentials(self) -> Credentials:
        """Return the Airflow UI login, creating its password (mode 0600) on first use."""
        if not self.passwords_file.exists():
            passwords = {AIRFLOW_USERNAME: secrets.token_urlsafe(18)}
            _write_private(self.passwords_file, json.dumps(passwords) + "\n")
        passwords = json.loads(self.passwords_file.read_text())
        return Credentials(AIRFLOW_USERNAME, passwords[AIRFLOW_USERNAME], self.passwords_file)

    def airflow_token(self) -> str:
        """Return a JWT for Airflow's REST API, from POST /auth/token with the generated login."""
        login = self.credentials()
        status, body = request_json(
            f"{self.airflow_url}/auth/token", "POST", {"username": login.username, "password": login.password}
        )
        if status != 201:
            raise StackError(f"POST {self.airflow_url}/auth/token returned {status}: {body}")
        return body["access_token"]

    def database_url(self, database: str) -> str:
        password = self.secrets()[f"{database}_db_password"]
        return f"postgresql+psycopg2://{database}:{password}@127.0.0.1:{self.settings.postgres_port}/{database}"

    # Environments.

    def _base_environment(self) -> dict[str, str]:
        """Return the caller's environment without settings that would point the stack elsewhere."""
        dropped = ("AIRFLOW", "MLFLOW_", "FER_MLFLOW_UI_URL")
        environment = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
        environment["PYTHONUNBUFFERED"] = "1"
        return environment

    def airflow_environment(self) -> dict[str, str]:
        """Return the environment of the Airflow processes. The tasks inherit it from the scheduler."""
        generated = self.secrets()
        port = self.settings.airflow_port
        return {
            # TensorFlow's C++ start-up notices would land in task logs as stderr output.
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **self._base_environment(),
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.settings.parallelism),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url(AIRFLOW_DATABASE),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": generated["jwt_secret"],
            "AIRFLOW__API__SECRET_KEY": generated["api_secret_key"],
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{AIRFLOW_USERNAME}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            # The scheduler's health server would listen on 0.0.0.0, and the REST API reports health anyway.
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "FER_MLFLOW_UI_URL": self.mlflow_url,
            **self.settings.environment,
        }

    def mlflow_environment(self) -> dict[str, str]:
        # In the environment, not on the command line, so `ps` does not show the password.
        return {**self._base_environment(), "MLFLOW_BACKEND_STORE_URI": self.database_url(MLFLOW_DATABASE)}

    # PostgreSQL.

    def _postgres_account(self) -> pwd.struct_passwd | None:
        """Return the unprivileged account that runs PostgreSQL when this process is root, else None."""
        if os.geteuid() != 0:
            return None
        for name in (os.environ.get("FER_POSTGRES_USER"), "postgres", "nobody"):
            if not name:
                continue
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        raise StackError("running as root, and neither the user 'postgres' nor 'nobody' exists to run PostgreSQL")

    def _check_reachable(self, account: pwd.struct_passwd) -> None:
        """Fail unless `account` can pass through every folder above the PostgreSQL data folder."""
        for folder in [self.postgres_dir.parent, *self.postgres_dir.parent.parents]:
            mode = folder.stat()
            if mode.st_uid == account.pw_uid:
                allowed = mode.st_mode & stat.S_IXUSR
            elif mode.st_gid == account.pw_gid:
                allowed = mode.st_mode & stat.S_IXGRP
            else:
                allowed = mode.st_mode & stat.S_IXOTH
            if not allowed:
                raise StackError(
                    f"PostgreSQL runs as the user {account.pw_name!r} because this runs as root, but that user "
                    f"cannot enter {folder} (mode {stat.filemode(mode.st_mode)}). Choose a state folder that "
                    "it can reach, for example `make up STACK_DIR=/var/tmp/fer-stack`."
                )

    def _run_as_postgres(self, account: pwd.struct_passwd | None) -> dict[str, Any]:
        """Return the Popen arguments that start a PostgreSQL program as `account` (None: as this user)."""
        if account is None:
            return {}
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [],
                "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.postgres_dir),
                        "LC_ALL": "C.UTF-8"}}

    def _init_postgres(self, bin_dir: Path, account: pwd.struct_passwd | None) -> None:
        if (self.postgres_dir / "data" / "PG_VERSION").is_file():
            return
        self.postgres_dir.mkdir(mode=0o700, exist_ok=True)
        password_file = self.postgres_dir / "initdb-password"
        _write_private(password_file, self.secrets()["postgres_superuser_password"])
        if account is not None:
            for path in (self.postgres_dir, password_file):
                os.chown(path, account.pw_uid, account.pw_gid)
        log_path = self.log_path("postgres-initdb")
        command = [str(bin_dir / "initdb"), "--pgdata", str(self.postgres_dir / "data"),
                   "--username", POSTGRES_SUPERUSER, "--pwfile", str(password_file),
                   "--auth", "scram-sha-256", "--encoding", "UTF8", "--no-locale", "--no-instructions"]
        try:
            with open(log_path, "w") as log:
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.postgres_dir,
                                        check=False, **self._run_as_postgres(account))
        finally:
            password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(f"initdb failed with exit code {result.returncode}; {_log_tail(log_path)}")

    def _connect_postgres(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.settings.postgres_port, user=POSTGRES_SUPERUSER,
            password=self.secrets()["postgres_superuser_password"], dbname=database, connect_timeout=5,
        )

    def _create_databases(self) -> None:
        """Create the airflow and mlflow roles and databases, each database owned by its role."""
        from psycopg2 import sql

        connection = self._connect_postgres()
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                for name in (AIRFLOW_DATABASE, MLFLOW_DATABASE):
                    password = self.secrets()[f"{name}_db_password"]
                    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
                    verb = "ALTER" if cursor.fetchone() else "CREATE"
                    cursor.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(name)),
                                   (password,))
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if not cursor.fetchone():
                        cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(name), sql.Identifier(name)))
        finally:
            connection.close()

    def _start_postgres(self) -> None:
        account = self._postgres_account()
        if account is not None:
            self._check_reachable(account)
        bin_dir = find_postgres_bin()
        self._init_postgres(bin_dir, account)
        # No Unix socket: clients connect over TCP on 127.0.0.1 only.
        command = [str(bin_dir / "postgres"), "-D", str(self.postgres_dir / "data"),
                   "-c", "listen_addresses=127.0.0.1", "-p", str(self.settings.postgres_port),
                   "-c", "unix_socket_directories=", "-c", "max_connections=200"]
        process = self._spawn("postgres", command, **self._run_as_postgres(account))

        import psycopg2

        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            self._check_alive("postgres", process)
            try:
                self._connect_postgres().close()
                break
            except psycopg2.OperationalError as error:
                if time.monotonic() > deadline:
                    raise StackError(f"PostgreSQL did not accept connections within {START_TIMEOUT_SECONDS} s "
                                     f"({error}); {_log_tail(self.log_path('postgres'))}") from None
                time.sleep(0.5)
        self._create_databases()

    # Processes.

    def _spawn(self, service: str, command: list[str], env: Mapping[str, str] | None = None,
               **popen_arguments: Any) -> psutil.Process:
        """Start `service` in its own session (so its process group id is its pid) and record it."""
        self.logs_dir.mkdir(mode=0o700, exist_ok=True)
        with open(self.log_path(service), "a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S %Z')} starting {service}\n")
            log.flush()
            popen = subprocess.Popen(command, env=dict(env) if env is not None else None, cwd=self.state_dir,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, **popen_arguments)
        process = psutil.Process(popen.pid)
        # Keep the Popen object, so a long-lived caller (a test) reaps the process when it ends.
        self._children = {**getattr(self, "_children", {}), service: popen}
        self._record_process(service, process)
        logger.info("Started %s (pid %d, log %s)", service, popen.pid, self.log_path(service))
        return process

    def _check_alive(self, service: str, process: psutil.Process) -> None:
        if not _is_running(process):
            raise StackError(f"{service} exited during start-up; {_log_tail(self.log_path(service))}")

    def process(self, service: str) -> psutil.Process | None:
        """Return the running process recorded for `service`, or None.

        A recorded pid counts only while its start time matches the record, so a
        pid that the system has reused for another program is never touched.
        """
        record = self._read_state().get("processes", {}).get(service)
        if not record:
            return None
        try:
            process = psutil.Process(record["pid"])
            if abs(process.create_time() - record["create_time"]) > 0.01 or not _is_running(process):
                return None
            return process
        except psutil.NoSuchProcess:
            return None

    def _stop_processes(self, services: list[str]) -> list[str]:
        """Signal the given services at once, wait for them and their children, and return those that ran."""
        running = {service: self.process(service) for service in services}
        running = {service: process for service, process in running.items() if process is not None}
        waiting = []
        for service, process in running.items():
            waiting.extend([process, *_descendants(process)])
            # SIGINT is PostgreSQL's "fast" shutdown, which does not wait for clients to disconnect.
            if service == "postgres":
                process.send_signal(signal.SIGINT)
            else:
                _signal_group(process.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(waiting, timeout=STOP_TIMEOUT_SECONDS)
        if alive:
            logger.warning("Processes %s did not stop within %d s; killing them",
                           [item.pid for item in alive], STOP_TIMEOUT_SECONDS)
            for process in running.values():
                _signal_group(process.pid, signal.SIGKILL)
            for item in alive:
                try:
                    item.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=10)

        for service in services:
            popen = getattr(self, "_children", {}).get(service)
            if popen is not None:
                popen.poll()
            self._record_process(service, None)
        for service, process in running.items():
            logger.info("Stopped %s (pid %d)", service, process.pid)
        return list(running)

    # Readiness checks.

    def _wait_for(self, service: str, description: str, check, timeout: float = START_TIMEOUT_SECONDS):
        """Poll `check()` until it returns a true value; fail with the service's log when it exits or times out."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            if self.process(service) is None:
                raise StackError(f"{service} exited during start-up; {_log_tail(self.log_path(service))}")
            try:
                result = check()
                if result:
                    return result
            except (OSError, urllib.error.URLError) as error:
                last_error = error
            time.sleep(1)
        raise StackError(f"{description} not ready within {timeout:.0f} s (last error: {last_error}); "
                         f"{_log_tail(self.log_path(service))}")

    def _mlflow_healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.mlflow_url}/health", timeout=5) as response:
            return response.status == 200

    def _airflow_health(self) -> dict:
        status, body = request_json(f"{self.airflow_url}/api/v2/monitor/health", timeout=5)
        return body if status == 200 and isinstance(body, dict) else {}

    def _component_healthy(self, component: str) -> bool:
        return (self._airflow_health().get(component) or {}).get("status") == "healthy"

    def _dag_loaded(self) -> bool:
        """Return True once the DAG is in the database; raise when its file failed to import."""
        token = self.airflow_token()
        status, _ = request_json(f"{self.airflow_url}/api/v2/dags/{DAG_ID}", token=token, timeout=5)
        if status == 200:
            return True
        status, body = request_json(f"{self.airflow_url}/api/v2/importErrors", token=token, timeout=5)
        errors = body.get("import_errors", []) if status == 200 and isinstance(body, dict) else []
        if errors:
            details = "\n".join(f"{error['filename']}: {error['stack_trace'][-1500:]}" for error in errors)
            raise StackError(f"the dag-processor could not import DAG files:\n{details}")
        return False

    # Services.

    def start_service(self, service: str) -> None:
        """Start one service and wait until it is ready. The others need PostgreSQL running."""
        if service not in SERVICES:
            raise StackError(f"unknown service {service!r}; choose from {list(SERVICES)}")
        if self.process(service) is not None:
            raise StackError(f"{service} is already running (pid {self.process(service).pid})")
        if service == "postgres":
            self._start_postgres()
            return
        if self.process("postgres") is None:
            raise StackError(f"cannot start {service}: PostgreSQL is not running; run `make up`")
        if service == "mlflow":
            self._spawn_mlflow()
            self._wait_for("mlflow", f"MLflow server at {self.mlflow_url}", self._mlflow_healthy)
            return
        self._spawn_airflow(service)
        self._wait_airflow(service)

    def stop_service(self, service: str) -> None:
        """Stop one service that this stack started, by its recorded pid and process group."""
        if service not in SERVICES:
            raise StackError(f"unknown service {service!r}; choose from {list(SERVICES)}")
        self._stop_processes([service])

    def _spawn_mlflow(self) -> psutil.Process:
        self.artifacts_dir.mkdir(mode=0o700, exist_ok=True)
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        command = [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.settings.mlflow_port),
                   "--workers", str(self.settings.mlflow_workers),
                   "--serve-artifacts", "--artifacts-destination", str(self.artifacts_dir)]
        return self._spawn("mlflow", command, env=self.mlflow_environment())

    def _spawn_airflow(self, service: str) -> psutil.Process:
        airflow = str(Path(sys.executable).with_name("airflow"))
        commands = {
            "api-server": [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.settings.airflow_port)],
            # Without --skip-serve-logs the scheduler starts a log server on all interfaces.
            # The api-server reads the task logs from AIRFLOW_HOME/logs on this machine instead.
            "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
            "dag-processor": [airflow, "dag-processor"],
        }
        return self._spawn(service, commands[service], env=self.airflow_environment())

    def _wait_airflow(self, service: str) -> None:
        self._wait_for("api-server", f"Airflow api-server at {self.airflow_url}", self._airflow_health)
        if service == "scheduler":
            self._wait_for("scheduler", "Airflow scheduler", lambda: self._component_healthy("scheduler"))
        elif service == "dag-processor":
            self._wait_for("dag-processor", "Airflow dag-processor",
                           lambda: self._component_healthy("dag_processor"))
            self._wait_for("dag-processor", f"DAG {DAG_ID}", self._dag_loaded)

    def _run_airflow_command(self, name: str, arguments: list[str]) -> None:
        airflow = str(Path(sys.executable).with_name("airflow"))
        log_path = self.log_path(name)
        with open(log_path, "w") as log:
            result = subprocess.run([airflow, *arguments], env=self.airflow_environment(), stdout=log,
                                    stderr=subprocess.STDOUT, check=False, timeout=600)
        if result.returncode != 0:
            raise StackError(f"`airflow {' '.join(arguments)}` failed with exit code {result.returncode}; "
                             f"{_log_tail(log_path)}")

    # The whole stack.

    def running_services(self) -> list[str]:
        return [service for service in SERVICES if self.process(service) is not None]

    def _check_ports_free(self) -> None:
        ports = {"Airflow (STACK_AIRFLOW_PORT)": self.settings.airflow_port,
                 "MLflow (STACK_MLFLOW_PORT)": self.settings.mlflow_port,
                 "PostgreSQL (STACK_POSTGRES_PORT)": self.settings.postgres_port}
        taken = [f"{port} for {name}" for name, port in ports.items() if port_in_use(port)]
        if taken:
            raise StackError(
                f"port(s) already in use on 127.0.0.1: {', '.join(taken)}. Stop the programs that use them "
                "or choose other ports, for example `make up STACK_AIRFLOW_PORT=8081`."
            )

    def up(self) -> None:
        """Start every service and wait until the DAG is loaded. On failure, stop what this call started."""
        running = self.running_services()
        if running:
            raise StackError(f"the stack in {self.state_dir} is already running ({', '.join(running)}); "
                             "run `make down` first")
        self._check_ports_free()

        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Others may pass through (so an unprivileged PostgreSQL reaches its data folder) but not list it.
        self.state_dir.chmod(0o711)
        for folder in (self.airflow_home, self.logs_dir, self.artifacts_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
        self._write_state({"settings": self._settings_record(), "processes": {}})
        self.secrets()
        self.credentials()

        started = time.monotonic()
        try:
            self._start_postgres()
            # MLflow starts while Airflow migrates its database, and both are checked afterwards.
            mlflow = self._spawn_mlflow()
            self._run_airflow_command("airflow-db-migrate", ["db", "migrate"])
            slots = str(self.settings.training_pool_slots)
            self._run_airflow_command(
                "airflow-pools", ["pools", "set", "training", slots, "FER training tasks that may run at once"]
            )
            for service in AIRFLOW_SERVICES:
                self._spawn_airflow(service)

            self._check_alive("mlflow", mlflow)
            self._wait_for("mlflow", f"MLflow server at {self.mlflow_url}", self._mlflow_healthy)
            for service in AIRFLOW_SERVICES:
                self._wait_airflow(service)
        except BaseException:
            logger.error("Start-up failed; stopping the services that were started")
            self.down()
            raise
        logger.info("Stack up in %.0f s", time.monotonic() - started)

    def down(self) -> list[str]:
        """Stop every recorded service and return the names of those that were running.

        MLflow and the Airflow processes stop together, PostgreSQL after them,
        because they keep database connections open until they exit.
        """
        stopped = self._stop_processes([service for service in reversed(SERVICES) if service != "postgres"])
        stopped += self._stop_processes(["postgres"])
        return stopped

    def status(self) -> dict[str, Any]:
        """Return each service's pid (or None) and the health that Airflow and MLflow report."""
        services = {}
        for service in SERVICES:
            process = self.process(service)
            services[service] = process.pid if process else None
        health: dict[str, Any] = {}
        if services["mlflow"]:
            try:
                health["mlflow"] = "healthy" if self._mlflow_healthy() else "unhealthy"
            except (OSError, urllib.error.URLError) as error:
                health["mlflow"] = f"unreachable ({error})"
        if services["api-server"]:
            try:
                airflow = self._airflow_health()
                for component in ("metadatabase", "scheduler", "dag_processor"):
                    health[f"airflow {component}"] = (airflow.get(component) or {}).get("status")
            except (OSError, urllib.error.URLError) as error:
                health["airflow"] = f"unreachable ({error})"
        return {"state_dir": str(self.state_dir), "services": services, "health": health,
                "airflow_url": self.airflow_url, "mlflow_url": self.mlflow_url,
                "postgres": f"127.0.0.1:{self.settings.postgres_port}"}


def _is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_group(group_id: int, signal_number: int) -> None:
    try:
        os.killpg(group_id, signal_number)
    except ProcessLookupError:
        pass


# Command line.


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("STACK_DIR") or DEFAULT_STATE_DIR),
                        help="folder with the stack's data, secrets, logs and pids (default: .stack/)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the stack and wait until the DAG is loaded")
    up.add_argument("--airflow-port", type=int, default=DEFAULT_AIRFLOW_PORT, help="Airflow UI and REST API port")
    up.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT, help="MLflow server port")
    up.add_argument("--postgres-port", type=int, default=DEFAULT_POSTGRES_PORT, help="PostgreSQL port")
    up.add_argument("--parallelism", type=int, default=4, help="LocalExecutor task slots (at least 3)")
    commands.add_parser("down", help="stop the processes that `up` started")
    commands.add_parser("status", help="show the services, their pids and health")
    for name in ("start", "stop"):
        command = commands.add_parser(name, help=f"{name} one service of a stack that is up")
        command.add_argument("service", choices=SERVICES)
    return parser.parse_args(argv)


def print_status(stack: Stack) -> bool:
    """Print the status; return True when every service runs."""
    report = stack.status()
    print(f"State folder: {report['state_dir']}")
    for service, pid in report["services"].items():
        print(f"  {service:14s} {'running, pid ' + str(pid) if pid else 'stopped'}")
    for name, value in report["health"].items():
        print(f"  {name:24s} {value}")
    return all(report["services"].values())


def print_access(stack: Stack) -> None:
    login = stack.credentials()
    print(f"Airflow UI: {stack.airflow_url}  (user {login.username!r}, password in {login.passwords_file})")
    print(f"MLflow UI:  {stack.mlflow_url}")
    print(f"PostgreSQL: 127.0.0.1:{stack.settings.postgres_port}  (passwords in {stack.secrets_file})")
    print(f"Logs:       {stack.logs_dir}  (task logs in {stack.airflow_home / 'logs'})")
    print("The DAG fer_pipeline starts paused: unpause it in the UI, then trigger it. Stop everything with `make down`.")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    arguments = parse_arguments(argv)
    try:
        if arguments.command == "up":
            settings = StackSettings(airflow_port=arguments.airflow_port, mlflow_port=arguments.mlflow_port,
                                     postgres_port=arguments.postgres_port, parallelism=arguments.parallelism)
            stack = Stack(arguments.state_dir, settings)
            stack.up()
            print_access(stack)
            return 0
        stack = Stack(arguments.state_dir)
        if arguments.command == "down":
            stopped = stack.down()
            print(f"Stopped: {', '.join(stopped)}" if stopped else "Nothing was running.")
            return 0
        if arguments.command == "status":
            return 0 if print_status(stack) else 3
        if arguments.command == "stop":
            stack.stop_service(arguments.service)
            return 0
        stack.start_service(arguments.service)
        return 0
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
