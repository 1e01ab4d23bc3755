"""The Dockerfile and deploy/docker-compose.yml, checked without a Docker engine: the Dockerfile's
instructions are parsed and linted, its HEALTHCHECK command runs here against a small local HTTP
server, and the compose file is read as YAML."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pool.config import ENVIRONMENT

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"://[^/@\s]+:[^/@\s]+@")


@dataclass
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments and blank lines dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # Docker skips comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    values = {}
    for item in instructions:
        if item.keyword == "ENV":
            for pair in shlex.split(item.args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {pair}: use the key=value form"
                values[key] = value
    return values


def healthcheck(instructions: list[Instruction]) -> tuple[dict[str, str], str]:
    """The HEALTHCHECK's options and its shell-form command."""
    [check] = [item for item in instructions if item.keyword == "HEALTHCHECK"]
    options, command = {}, check.args
    while match := re.match(r"--([a-z-]+)=(\S+)\s+", command):
        options[match[1]] = match[2]
        command = command[match.end():]
    keyword, _, shell = command.partition(" ")
    assert keyword == "CMD", check.args
    assert not shell.startswith("["), "shell form: Docker runs it with /bin/sh -c"
    return options, shell


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_the_parser_joins_continuations_and_skips_comments() -> None:
    parsed = parse_dockerfile("# c\nFROM a\nRUN x \\\n  # inside\n  && y\n\nCMD [\"z\"]\n")
    assert parsed == [Instruction("FROM", "a"), Instruction("RUN", "x && y"), Instruction("CMD", '["z"]')]


def test_builds_on_a_slim_python_image(instructions: list[Instruction]) -> None:
    assert instructions[0].keyword == "FROM"
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", instructions[0].args)
    assert [item.keyword for item in instructions].count("FROM") == 1


def test_runs_as_a_user_that_is_not_root(instructions: list[Instruction]) -> None:
    keywords = [item.keyword for item in instructions]
    users = [(index, item.args) for index, item in enumerate(instructions) if item.keyword == "USER"]
    assert users, "no USER: the container would run as root"
    last_index, last_user = users[-1]
    assert last_user.split(":")[0] not in ("root", "0")
    assert last_index < keywords.index("CMD")
    assert all(keyword != "RUN" for keyword in keywords[last_index:]), "a RUN after USER needs root"
    # The user it switches to is created by the image, with a fixed uid for volume permissions.
    run = " ".join(item.args for item in instructions if item.keyword == "RUN")
    assert re.search(rf"useradd .*--uid \d+ {re.escape(last_user)}\b", run)


def test_runs_pool_start_and_stops_with_sigterm(instructions: list[Instruction]) -> None:
    [cmd] = [item for item in instructions if item.keyword == "CMD"]
    assert yaml.safe_load(cmd.args) == ["pool", "start"]  # exec form: pool is PID 1 and gets SIGTERM
    assert instructions[-1] is cmd
    assert [item.args for item in instructions if item.keyword == "STOPSIGNAL"] == ["SIGTERM"]


def test_exposes_the_metrics_port_and_binds_every_address(instructions: list[Instruction]) -> None:
    env = env_values(instructions)
    exposed = [item.args for item in instructions if item.keyword == "EXPOSE"]
    assert exposed == [env["PULSE_METRICS_PORT"]]
    assert env["PULSE_METRICS_HOST"] == "0.0.0.0"  # reachable through a published port


def test_no_secrets_in_env(instructions: list[Instruction]) -> None:
    env = env_values(instructions)
    assert env, "the image sets its defaults with ENV"
    for key, value in env.items():
        assert not SECRET_NAME.search(key), key
        assert not URL_WITH_PASSWORD.search(value), key
    assert "PULSE_DB_URL" not in env and "PULSE_BROKER_URL" not in env


def test_copies_only_what_exists_and_installs_the_package(instructions: list[Instruction]) -> None:
    for item in instructions:
        if item.keyword == "COPY":
            *sources, _destination = item.args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignored and ".git" in ignored


def test_healthcheck_asks_readyz_within_its_timeout(instructions: list[Instruction]) -> None:
    options, command = healthcheck(instructions)
    assert "/readyz" in command and "/metrics" not in command
    timeout = float(options["timeout"].removesuffix("s"))
    client_timeout = float(re.search(r"timeout=(\d+(?:\.\d+)?)", command)[1])
    assert client_timeout < timeout  # the client gives up first, with a clear failure
    assert float(options["start-period"].removesuffix("s")) >= 10


class ReadyServer:
    """Answers GET /readyz with the status it is set to; records the paths asked."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.status = 200
        self.paths: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the base class's naming
                server.paths.append(self.path)
                code = server.status if self.path == "/readyz" else 404
                body = b'{"ready": %s}' % (b"true" if code == 200 else b"false")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})
        self.httpd = server_class((host, 0), Handler)
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ready_server() -> Iterator[ReadyServer]:
    server = ReadyServer()
    yield server
    server.close()


def run_healthcheck(command: str, port: int, **pulse: str) -> subprocess.CompletedProcess:
    """The HEALTHCHECK's command as Docker runs it (/bin/sh -c), with this Python as `python`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
    env["PULSE_METRICS_PORT"] = str(port)
    env.update(pulse)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)


def test_healthcheck_command_passes_on_200_and_fails_on_503(instructions, ready_server: ReadyServer) -> None:
    _options, command = healthcheck(instructions)
    assert run_healthcheck(command, ready_server.port).returncode == 0
    ready_server.status = 503
    failed = run_healthcheck(command, ready_server.port)
    assert failed.returncode != 0
    assert "503" in failed.stderr
    assert ready_server.paths == ["/readyz", "/readyz"]


@pytest.mark.parametrize(("bound", "server_host"), [("::", "::1"), ("::1", "::1"), ("0.0.0.0", "127.0.0.1")])
def test_healthcheck_asks_the_loopback_address_of_the_bound_family(instructions, bound: str,
                                                                  server_host: str) -> None:
    try:
        server = ReadyServer(server_host)
    except OSError:
        pytest.skip(f"this machine cannot bind {server_host}")
    try:
        _options, command = healthcheck(instructions)
        result = run_healthcheck(command, server.port, PULSE_METRICS_HOST=bound)
        assert result.returncode == 0, result.stderr
        assert server.paths == ["/readyz"]
    finally:
        server.close()


def test_healthcheck_command_fails_when_nothing_listens(instructions, ready_server: ReadyServer) -> None:
    _options, command = healthcheck(instructions)
    port = ready_server.port
    ready_server.close()
    assert run_healthcheck(command, port).returncode != 0


# --- deploy/docker-compose.yml -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else shlex.split(command)


def test_compose_has_the_database_the_broker_and_pools_three_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert command_of(services["init-db"]) == ["pool", "init-db"]
    assert command_of(services["pool"]) == ["pool", "start"]
    assert command_of(services["worker"])[:2] == ["pool", "worker"]


def test_compose_pool_services_are_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    for name in ("init-db", "pool", "worker"):
        build = compose["services"][name]["build"]
        dockerfile = COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")
        assert dockerfile.resolve() == DOCKERFILE, name


def test_compose_points_pool_at_its_postgres_and_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    user = services["postgres"]["environment"]["POSTGRES_USER"]
    database = services["postgres"]["environment"]["POSTGRES_DB"]
    for name in ("init-db", "pool", "worker"):
        env = services[name]["environment"]
        assert set(env) >= {"PULSE_DB_URL", "PULSE_BROKER_URL"}, name
        assert re.fullmatch(rf"postgresql://{user}:\$\{{POSTGRES_PASSWORD[^}}]*\}}@postgres:5432/{database}",
                            env["PULSE_DB_URL"]), env["PULSE_DB_URL"]
        assert env["PULSE_BROKER_URL"].startswith("redis://redis:6379/")
        assert {key for key in env if key.startswith("PULSE_")} <= set(ENVIRONMENT.values()), name


def test_compose_orders_start_up_and_drains_on_stop(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["init-db"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["init-db"]["restart"] == "no"
    for name in ("pool", "worker"):
        depends = services[name]["depends_on"]
        assert depends["init-db"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
        grace = int(services[name]["stop_grace_period"].removesuffix("s"))
        assert grace > 30, name  # above PULSE_SHUTDOWN_TIMEOUT's default
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name


def test_compose_turns_the_readyz_check_off_where_nothing_serves_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "healthcheck" not in services["pool"]  # the image's /readyz check applies
    for name in ("init-db", "worker"):
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_compose_publishes_the_metrics_port_on_loopback_only(compose: dict[str, Any]) -> None:
    env = env_values(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")))
    port = env["PULSE_METRICS_PORT"]
    assert compose["services"]["pool"]["ports"] == [f"127.0.0.1:{port}:{port}"]
