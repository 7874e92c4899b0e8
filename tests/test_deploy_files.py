"""The deployment files: deploy/docker-compose.yml (with the files it includes), deploy/Dockerfile,
deploy/k8s/, deploy/redis/redis.conf and deploy/mysql/.

Docker and Kubernetes cannot run here, so most checks are static: every file parses, every command
is one the package provides, every COUPON_* variable is a documented one and the values form valid
Settings, every image is pinned, and the Kubernetes manifests validate against the Kubernetes JSON
schemas bundled in the kubernetes-validate package (offline). Two pieces do run for real: the
compose Redis command line with redis.conf in a real redis-server, and the MariaDB service-account
script against the test MariaDB, whose account must then be able to migrate and do nothing more.
scripts/run is run in a copy up to its supervisord (a stand-in): the programs and environment it
sets up, and what it refuses.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pymysql
import pytest
import redis as redis_sync
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from dockerfile_parse import DockerfileParser
from mirakuru import TCPExecutor
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.mysql.migrations import migrate
from shared.ops import cli
from shared.settings import ENVIRONMENT, MySQLDsn, Settings
from tests.helpers import REPO
from tests.servers import find_binary, free_port

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"
SERVICE_USER_SCRIPT = DEPLOY / "mysql" / "initdb.d" / "10-service-user.sh"
# Several gateway processes in one container: supervisord with this file, copied into the image.
SUPERVISED_GATEWAYS = DEPLOY / "supervisord" / "gateway.conf"
SUPERVISED_GATEWAYS_IN_IMAGE = "/opt/coupon-drop/supervisord/gateway.conf"

# Our own image: every service that runs it must run a command of this package.
OWN_IMAGE = "coupon-drop"
# Values for the secrets compose requires (${NAME:?...}); letters and digits as the docs demand.
DUMMY_SECRETS = {
    "COUPON_ADMIN_TOKEN": "adminTokenForTheDeployCheck0123",
    "REDIS_PASSWORD": "redisPassword0123456789",
    "MYSQL_PASSWORD": "mysqlPassword0123456789",
    "MYSQL_ROOT_PASSWORD": "mysqlRootPassword0123456789",
    "GRAFANA_ADMIN_PASSWORD": "grafanaPassword0123456789",
}
# Kubernetes versions the manifests must be valid for: the oldest supported and the newest known.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
COUPON_VARIABLE = re.compile(r"\bCOUPON_[A-Z0-9_]*[A-Z0-9]\b")
# A tag that names a version: it has digits separated by dots ("7.4.2-bookworm", "v3.1.0").
VERSION_TAG = re.compile(r"^v?\d+(\.\d+)+([.-][A-Za-z0-9._-]+)?$")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# Reading the files


class MissingVariable(LookupError):
    """A ${NAME:?message} variable of a compose file is unset or empty."""


# Compose interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ...
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_]\w*)|"
    r"\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute variables the way ``docker compose`` does before it reads the YAML."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["bare"] or match["name"]
        op, arg = match["op"] or "", match["arg"] or ""
        value = env.get(name)
        present = bool(value) if op.startswith(":") else value is not None
        if op.endswith("-"):
            return value if present and value is not None else arg
        if op.endswith("?"):
            if not present or value is None:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op.endswith("+"):
            return arg if present else ""
        return value or ""

    return _INTERPOLATION.sub(substitute, text)


def compose_variables(text: str) -> dict[str, str]:
    """Every variable a compose file interpolates, with its operator ('' when plain)."""
    found = {}
    for match in _INTERPOLATION.finditer(text):
        if not match["escaped"]:
            found[match["bare"] or match["name"]] = match["op"] or ""
    return found


def load_compose(path: Path, env: Mapping[str, str] = DUMMY_SECRETS) -> dict[str, Any]:
    document = yaml.safe_load(interpolate(path.read_text(encoding="utf-8"), env))
    assert isinstance(document, dict), f"{path} is not a mapping"
    return document


def compose_files() -> list[Path]:
    """The main compose file and every file it includes, in order."""
    files = [COMPOSE]
    for entry in load_compose(COMPOSE).get("include", []):
        paths = entry if isinstance(entry, str) else entry["path"]
        for relative in [paths] if isinstance(paths, str) else paths:
            files.append((COMPOSE.parent / relative).resolve())
    return files


def compose_services() -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every service of the project with the file that defines it."""
    services: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in compose_files():
        for name, service in load_compose(path).get("services", {}).items():
            assert name not in services, (
                f"service {name!r} is defined in both {services[name][0]} and {path}"
            )
            services[name] = (path, service)
    return services


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/k8s (the kustomization itself is not one)."""
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document and document.get("kind") != "Kustomization":
                documents.append((path, document))
    return documents


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in k8s_documents() if document["kind"] == kind]


def k8s_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) for every container of every workload."""
    for document in k8s_objects("Deployment") + k8s_objects("Job"):
        pod = document["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield document["metadata"]["name"], pod, container


def console_scripts() -> dict[str, str]:
    """``name -> module:function`` from setup.cfg's console_scripts."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    scripts = {}
    for line in config["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


def package_version() -> str:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    return config["metadata"]["version"]


def readme_configuration_variables() -> set[str]:
    """The variables named in the first column of the README's configuration table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `COUPON_"):
            names.update(COUPON_VARIABLE.findall(line.split("|")[1]))
    return names


def image_is_pinned(image: str) -> bool:
    if DIGEST.search(image):
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(VERSION_TAG.match(tag))


def _command(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


# --------------------------------------------------------------------------------------------
# Parsing and commands


def test_every_deploy_yaml_file_parses() -> None:
    paths = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert COMPOSE in paths
    assert K8S / "gateway.yaml" in paths
    for path in paths:
        text = interpolate(path.read_text(encoding="utf-8"), DUMMY_SECRETS)
        documents = [document for document in yaml.safe_load_all(text) if document is not None]
        assert documents, f"{path} holds no YAML document"


def test_compose_files_define_each_service_once_and_include_existing_files() -> None:
    for path in compose_files():
        assert path.is_file(), f"{COMPOSE} includes {path}, which does not exist"
    services = compose_services()  # asserts that no name is defined twice
    for name in ("redis", "mysql", "migrate", "gateway", "worker", "prometheus", "grafana"):
        assert name in services, f"compose has no {name!r} service"
    locust = {
        name for name, (_, service) in services.items() if "locust" in service.get("image", "")
    }
    assert len(locust) >= 2, f"compose needs a locust master and workers, has {sorted(locust)}"


def _check_own_command(where: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``argv`` runs a console script or ``python -m`` module of this package, with arguments it
    accepts, or supervisord with the image's gateway file, whose program is one of those."""
    if argv[:1] == ["supervisord"]:
        assert argv[1:] == ["-c", SUPERVISED_GATEWAYS_IN_IMAGE], f"{where}: {argv}"
        copied = DockerfileParser(path=str(DOCKERFILE)).content
        assert f"COPY deploy/supervisord/gateway.conf {SUPERVISED_GATEWAYS_IN_IMAGE}" in copied
        program = _supervised_program()
        assert program["numprocs"] == "%(ENV_COUPON_GATEWAY_PROCESSES)s", program["numprocs"]
        _check_own_command(f"{where} (supervised)", program["command"].split(), capsys)
        return
    assert argv, f"{where}: no command; the image's default would be implied"
    scripts = console_scripts()
    if argv[0] in ("python", "python3") and argv[1:2] == ["-m"]:
        module, args = argv[2], argv[3:]
        assert importlib.util.find_spec(f"{module}.__main__") or importlib.util.find_spec(module), (
            f"{where}: no module {module!r}"
        )
        target = {"gateway": scripts["coupon-gateway"], "stream_worker": scripts["coupon-worker"]}
        entry = target.get(module, "")
    else:
        assert argv[0] in scripts, f"{where}: {argv[0]!r} is not a console script of setup.cfg"
        entry, args = scripts[argv[0]], argv[1:]
    module_name, _, function = entry.partition(":")
    assert callable(getattr(importlib.import_module(module_name), function, None)), (
        f"{where}: {entry} is not a function"
    )
    if entry == scripts["couponctl"]:
        # couponctl parses its arguments: a valid command line answers --help with exit 0.
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*args, "--help"])
        capsys.readouterr()
        assert exit_info.value.code == 0, f"{where}: couponctl rejects {args}"
    else:
        # The gateway and the worker take every setting from the environment.
        assert args == [], f"{where}: {argv[0]} takes no arguments, got {args}"


def _supervised_program() -> configparser.SectionProxy:
    config = configparser.ConfigParser(interpolation=None)
    config.read(SUPERVISED_GATEWAYS, encoding="utf-8")
    return config["program:gateway"]


def test_supervised_gateways_restart_the_dead_stop_gracefully_and_keep_the_output() -> None:
    """What the shipped file promises (its behaviour is tested in test_gateway_processes.py)."""
    program = _supervised_program()
    assert program["autorestart"] == "unexpected"
    assert program["exitcodes"] == "0"
    assert program["stopsignal"] == "TERM"
    # Room for the shutdown grace period of every process, and then some.
    assert int(program["stopwaitsecs"]) > Settings().shutdown_grace_seconds
    assert program["stdout_logfile"] == "/dev/stdout"
    assert program["stdout_logfile_maxbytes"] == "0"


def test_compose_services_of_our_image_run_commands_of_the_package(
    capsys: pytest.CaptureFixture[str],
) -> None:
    own = {
        name: service
        for name, (_, service) in compose_services().items()
        if service.get("image", "").startswith(f"{OWN_IMAGE}:")
    }
    assert set(own) >= {"migrate", "gateway", "worker"}
    for name, service in own.items():
        _check_own_command(f"compose service {name}", _command(service), capsys)
    assert _command(own["migrate"]) == ["couponctl", "db", "migrate"]


def test_k8s_containers_run_commands_of_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    containers = list(k8s_containers())
    assert {name for name, _, _ in containers} >= {"coupon-gateway", "coupon-worker"}
    for name, _, container in containers:
        assert container["image"].startswith(f"{OWN_IMAGE}:"), container["image"]
        _check_own_command(f"k8s {name}", container["command"], capsys)


def _container_path_on_host(path: Path, service: Mapping[str, Any], inside: str) -> Path | None:
    """Where a path inside a service's container comes from in this checkout (bind mounts)."""
    wanted = PurePosixPath(inside)
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith(".") and wanted.is_relative_to(target):
            return path.parent / source / wanted.relative_to(target)
    return None


def test_locust_services_run_the_mounted_locustfile() -> None:
    for name, (path, service) in compose_services().items():
        if "locust" not in service.get("image", ""):
            continue
        command = _command(service)
        if "-f" in command:
            locustfile = command[command.index("-f") + 1]
        else:
            locustfile = service.get("environment", {}).get("LOCUST_LOCUSTFILE", "")
        assert locustfile, f"{name}: no locustfile (-f or LOCUST_LOCUSTFILE)"
        on_host = _container_path_on_host(path, service, locustfile)
        assert on_host is not None, f"{name}: {locustfile} is not inside a mounted folder"
        assert on_host.is_file(), f"{name}: {on_host} does not exist"


def test_included_locust_aims_at_the_gateway_service() -> None:
    """Included, the locust file is interpolated with the include's env_file: its load must go
    to the gateway service on the project's network, not to the Docker host."""
    (entry,) = [item for item in load_compose(COMPOSE)["include"] if "locust" in str(item["path"])]
    env_file = COMPOSE.parent / entry["env_file"]
    values = dict(
        line.split("=", 1)
        for line in env_file.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    included = load_compose((COMPOSE.parent / entry["path"]).resolve(), values)
    gateway_port = compose_services()["gateway"][1]["environment"]["COUPON_HTTP_PORT"]
    hosts = {
        name: service["environment"]["LOCUST_HOST"]
        for name, service in included["services"].items()
        if "LOCUST_HOST" in service.get("environment", {})
    }
    assert hosts, "no locust service sets LOCUST_HOST"
    for name, host in hosts.items():
        assert host == f"http://gateway:{gateway_port}", f"{name} aims at {host}"


# --------------------------------------------------------------------------------------------
# Configuration


def _deploy_texts() -> dict[Path, str]:
    paths = [
        *compose_files(),
        *sorted((DEPLOY / "compose").iterdir()),
        DOCKERFILE,
        DEPLOY / "env.example",
        SERVICE_USER_SCRIPT,
        *sorted(K8S.glob("*.yaml")),
    ]
    return {path: path.read_text(encoding="utf-8") for path in paths}


def test_every_coupon_variable_in_deploy_files_is_documented() -> None:
    documented = set(ENVIRONMENT) | readme_configuration_variables()
    for path, text in _deploy_texts().items():
        unknown = set(COUPON_VARIABLE.findall(text)) - documented
        assert not unknown, f"{path.relative_to(REPO)} uses undocumented {sorted(unknown)}"


def _own_compose_environments() -> dict[str, dict[str, str]]:
    return {
        name: {key: str(value) for key, value in service.get("environment", {}).items()}
        for name, (_, service) in compose_services().items()
        if service.get("image", "").startswith(f"{OWN_IMAGE}:")
    }


def _k8s_data(kind: str, field: str) -> dict[str, str]:
    (document,) = k8s_objects(kind)
    return {key: str(value) for key, value in document[field].items()}


def test_service_environments_hold_only_settings_with_valid_values() -> None:
    """What reaches the processes is read by Settings (nothing else is), and Settings accepts it:
    a deployment that would stop at start with a configuration error fails here instead."""
    dockerfile_env = DockerfileParser(path=str(DOCKERFILE)).envs
    environments = {
        f"compose {name}": {**dockerfile_env, **env}
        for name, env in _own_compose_environments().items()
    }
    configmap, secret = _k8s_data("ConfigMap", "data"), _k8s_data("Secret", "stringData")
    for name, _, container in k8s_containers():
        env = dict(dockerfile_env)
        for source in container.get("envFrom", []):
            env.update(configmap if "configMapRef" in source else secret)
        for variable in container.get("env", []):
            reference = variable.get("valueFrom", {})
            if "secretKeyRef" in reference:
                env[variable["name"]] = secret[reference["secretKeyRef"]["key"]]
            elif "fieldRef" in reference:
                env[variable["name"]] = f"{name}-5d9c7b-x2x7q"
            else:
                env[variable["name"]] = str(variable["value"])
        environments[f"k8s {name}"] = env
    for where, env in environments.items():
        passed = {key for key in env if key.startswith("COUPON_")}
        assert passed <= set(ENVIRONMENT), (
            f"{where}: not Settings: {sorted(passed - set(ENVIRONMENT))}"
        )
        Settings.from_env(env)  # raises ConfigError with the variable's name


def test_compose_requires_every_secret_and_env_example_lists_them() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    required = {name for name, op in compose_variables(text).items() if op.endswith("?")}
    assert required == set(DUMMY_SECRETS)
    for name in required:
        with pytest.raises(MissingVariable, match=name):
            interpolate(text, {**DUMMY_SECRETS, name: ""})
    example = (DEPLOY / "env.example").read_text(encoding="utf-8")
    listed = set(re.findall(r"^([A-Z_]+)=$", example, flags=re.MULTILINE))
    assert listed == required, "deploy/env.example must list exactly the required secrets, empty"


def test_k8s_secret_example_is_kept_out_of_kustomization() -> None:
    """``kubectl apply -k`` must never overwrite the operator's real Secret with placeholders,
    and must apply every other manifest."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    resources = set(kustomization["resources"])
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert "secret.example.yaml" not in resources
    assert resources == manifests - {"secret.example.yaml"}
    assert kustomization["namespace"] == "coupon-drop"


# --------------------------------------------------------------------------------------------
# Images


def test_every_image_is_pinned_to_a_version() -> None:
    images = [
        (f"compose {name}", service["image"]) for name, (_, service) in compose_services().items()
    ]
    images += [(f"k8s {name}", container["image"]) for name, _, container in k8s_containers()]
    images += [
        ("Dockerfile", image) for image in DockerfileParser(path=str(DOCKERFILE)).parent_images
    ]
    assert len(images) >= 10
    for where, image in images:
        assert image_is_pinned(image), f"{where}: image {image!r} is not pinned to a version"
        if image.startswith(f"{OWN_IMAGE}:"):
            assert image == f"{OWN_IMAGE}:{package_version()}", f"{where}: tag != setup.cfg version"


def test_pin_check_rejects_floating_tags() -> None:
    for floating in ("redis", "redis:latest", "redis:7", "mariadb:lts", "python:3-slim"):
        assert not image_is_pinned(floating), floating
    for pinned in ("redis:7.4.2-bookworm", "prom/prometheus:v3.1.0", f"python@sha256:{'a' * 64}"):
        assert image_is_pinned(pinned), pinned


def test_dockerfile_is_pinned_runs_unprivileged_and_installs_the_package(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = DockerfileParser(path=str(DOCKERFILE))
    instructions = [(item["instruction"], item["value"]) for item in parser.structure]
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    users = [value for op, value in final_stage if op == "USER"]
    assert users, "the final stage never leaves root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit(), users[-1]
    assert int(uid) > 0, users[-1]
    assert not gid or int(gid) > 0, users[-1]
    for name, pod, _ in k8s_containers():
        assert pod["securityContext"]["runAsUser"] == int(uid), name
    assert parser.baseimage.startswith("python:3.11."), parser.baseimage
    _check_own_command("Dockerfile CMD", json.loads(parser.cmd), capsys)

    copied = set()
    for op, value in instructions:
        if op == "COPY" and not value.startswith("--from"):
            *sources, _ = value.split()
            copied.update(sources)
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    packages = {
        line.strip().split(".")[0]
        for line in config["options.packages.find"]["include"].split()
        if line.strip()
    }
    assert packages <= copied, f"the image misses packages {sorted(packages - copied)}"
    assert {"setup.cfg", "pyproject.toml", "README.md"} <= copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    for source in copied:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"dockerignore hides {source}"


# --------------------------------------------------------------------------------------------
# Compose topology


def test_compose_worker_scales_with_unique_consumer_names() -> None:
    """``docker compose up --scale worker=N`` needs a worker without a fixed name or host port;
    a fixed COUPON_WORKER_NAME or hostname would make the replicas share one consumer."""
    _, worker = compose_services()["worker"]
    for fixed in ("container_name", "hostname", "ports"):
        assert fixed not in worker, f"worker sets {fixed}: --scale would break"
    assert "COUPON_WORKER_NAME" not in worker.get("environment", {})
    assert worker["stop_grace_period"]


def test_compose_publishes_ports_on_loopback_only_and_keeps_data_stores_private() -> None:
    for name, (path, service) in compose_services().items():
        if path != COMPOSE:
            continue  # deploy/locust/ publishes its own UI; its file decides where
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every address"
    services = compose_services()
    for store in ("redis", "mysql"):
        assert "ports" not in services[store][1], f"{store} must stay on the private network"


def test_compose_start_order_and_health_checks() -> None:
    services = {name: service for name, (_, service) in compose_services().items()}
    for name in ("redis", "mysql", "gateway"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert "/readyz" in " ".join(services["gateway"]["healthcheck"]["test"])
    for name in ("gateway", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    assert services["migrate"]["depends_on"]["mysql"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    gateway_env = services["gateway"]["environment"]
    assert "COUPON_GATEWAY_PROCESSES" in gateway_env
    assert (
        compose_variables(COMPOSE.read_text(encoding="utf-8"))["COUPON_GATEWAY_PROCESSES"] == ":-"
    )


def test_compose_bind_mounts_exist() -> None:
    for name, (path, service) in compose_services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), f"{name} mounts missing {source}"


def test_compose_mounts_the_monitoring_and_database_files() -> None:
    services = {name: service for name, (_, service) in compose_services().items()}
    mounts = {
        name: [str(volume) for volume in service.get("volumes", [])]
        for name, service in services.items()
    }
    assert "./compose/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts["prometheus"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts["grafana"]
    assert any(mount.startswith("./grafana/dashboards:") for mount in mounts["grafana"])
    assert "./mysql/initdb.d:/docker-entrypoint-initdb.d:ro" in mounts["mysql"]
    assert "./redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in mounts["redis"]


def test_compose_prometheus_scrapes_the_services_with_the_local_jobs_and_alerts() -> None:
    """compose/prometheus.yml is deploy/prometheus/prometheus.yml aimed at the services: the same
    job names (dashboards and alerts rely on them), the same rule files, service targets."""
    services = {name: service for name, (_, service) in compose_services().items()}
    prometheus = services["prometheus"]
    config_path = _container_path_on_host(COMPOSE, prometheus, "/etc/prometheus/prometheus.yml")
    assert config_path is not None
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    local = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {job["job_name"] for job in local["scrape_configs"]}
    assert config.get("rule_files") == local.get("rule_files")
    for rule_file in config.get("rule_files", []):
        on_host = _container_path_on_host(COMPOSE, prometheus, f"/etc/prometheus/{rule_file}")
        assert on_host is not None, f"{rule_file} is not mounted beside the config"
        assert on_host.is_file(), on_host
    targets = [
        target.split(":")
        for job in jobs.values()
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ] + [
        [name, str(sd["port"])]
        for job in jobs.values()
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    ]
    assert targets
    ports = {
        "gateway": services["gateway"]["environment"]["COUPON_HTTP_PORT"],
        "worker": services["worker"]["environment"]["COUPON_WORKER_METRICS_PORT"],
    }
    for host, port in targets:
        assert ports.get(host) == port, f"Prometheus scrapes {host}:{port}, not a service's port"


def test_compose_grafana_loads_the_provisioned_datasource_and_dashboards() -> None:
    _, grafana = compose_services()["grafana"]
    provisioning = _container_path_on_host(COMPOSE, grafana, "/etc/grafana/provisioning")
    assert provisioning is not None
    for provider_file in (provisioning / "dashboards").glob("*.y*ml"):
        provider_config = yaml.safe_load(provider_file.read_text(encoding="utf-8"))
        for provider in provider_config["providers"]:
            folder = _container_path_on_host(COMPOSE, grafana, provider["options"]["path"])
            assert folder is not None, f"{provider_file.name}: its path is not mounted"
            assert any(folder.glob("*.json")), f"no dashboard in {folder}"
    datasources = " ".join(
        path.read_text(encoding="utf-8") for path in (provisioning / "datasources").glob("*.y*ml")
    )
    for variable in compose_variables(datasources):
        value = str(grafana["environment"].get(variable, ""))
        assert value, f"the datasources need {variable} in Grafana's environment"
    if "PROMETHEUS_URL" in compose_variables(datasources):
        assert grafana["environment"]["PROMETHEUS_URL"] == "http://prometheus:9090"


# --------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    documents = k8s_documents()
    kinds = {document["kind"] for _, document in documents}
    assert kinds >= {
        "Namespace", "ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "Job",
    }  # fmt: skip
    bundled = kubernetes_validate.utils.all_versions()
    for version in K8S_VERSIONS:
        assert version in bundled, f"kubernetes-validate no longer ships schemas for {version}"
        for path, document in documents:
            # strict: unknown fields (a typo, a field of another version) are errors too.
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(part) for part in exc.path)
                pytest.fail(
                    f"{path.name} {document['kind']} (k8s {version}) at {where}: {exc.message}"
                )


def test_schema_validation_catches_a_bad_manifest() -> None:
    (deployment,) = [
        d for d in k8s_objects("Deployment") if d["metadata"]["name"] == "coupon-gateway"
    ]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _probe(container: Mapping[str, Any], kind: str) -> tuple[str, int]:
    """(path, container port number) of an httpGet probe."""
    probe = container[kind]["httpGet"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    port = probe["port"]
    return probe["path"], ports[port] if isinstance(port, str) else port


def test_k8s_deployments_probe_health_routes_and_request_resources() -> None:
    deployments = {d["metadata"]["name"]: d for d in k8s_objects("Deployment")}
    assert set(deployments) == {"coupon-gateway", "coupon-worker"}
    configmap = _k8s_data("ConfigMap", "data")
    expected_ports = {
        "coupon-gateway": int(configmap["COUPON_HTTP_PORT"]),
        "coupon-worker": int(configmap["COUPON_WORKER_METRICS_PORT"]),
    }
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        # Service links would put COUPON_GATEWAY_PORT=tcp://... and the like into the settings'
        # namespace.
        assert pod["enableServiceLinks"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            assert _probe(container, "readinessProbe") == ("/readyz", expected_ports[name]), name
            assert _probe(container, "livenessProbe") == ("/healthz", expected_ports[name]), name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), name
            assert "memory" in resources["limits"], name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > float(configmap["COUPON_SHUTDOWN_GRACE_SECONDS"]) + 5, name


def test_k8s_workers_take_the_pod_name_as_consumer_name() -> None:
    (worker,) = [d for d in k8s_objects("Deployment") if d["metadata"]["name"] == "coupon-worker"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    env = {variable["name"]: variable for variable in container["env"]}
    field = env["COUPON_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.name"
    # The worker gets the database URLs, never the admin token.
    assert "secretRef" not in str(container.get("envFrom", []))
    assert "COUPON_ADMIN_TOKEN" not in env


def test_k8s_hpa_pdbs_and_services_select_the_deployments() -> None:
    deployments = {d["metadata"]["name"]: d for d in k8s_objects("Deployment")}
    pod_labels = {
        name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()
    }

    def selected(selector: Mapping[str, str]) -> set[str]:
        return {name for name, labels in pod_labels.items() if selector.items() <= labels.items()}

    (hpa,) = k8s_objects("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "coupon-gateway"
    assert "replicas" not in deployments["coupon-gateway"]["spec"], "the HPA owns the count"
    assert hpa["spec"]["minReplicas"] >= 2
    budgets = {pdb["metadata"]["name"]: pdb for pdb in k8s_objects("PodDisruptionBudget")}
    for name in deployments:
        assert selected(budgets[name]["spec"]["selector"]["matchLabels"]) == {name}
    for service in k8s_objects("Service"):
        (target,) = selected(service["spec"]["selector"])
        (container,) = deployments[target]["spec"]["template"]["spec"]["containers"]
        names = {port["name"] for port in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"{service['metadata']['name']}: {port}"


def test_k8s_migration_job_runs_migrate_once() -> None:
    (job,) = k8s_objects("Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["couponctl", "db", "migrate"]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"].get("parallelism", 1) == 1


# --------------------------------------------------------------------------------------------
# Redis and MariaDB, for real


def _redis_command_for_this_machine(tmp_path: Path, port: int) -> list[str]:
    """The compose Redis command line with the config file at its path in this checkout and the
    address, port and data folder of this test appended (later arguments win)."""
    _, service = compose_services()["redis"]
    command = _command(service)
    mounts = {}  # container path -> host path
    for volume in service["volumes"]:
        source, target, *_ = str(volume).split(":")
        mounts[target] = source
    command = [str(COMPOSE.parent / mounts[arg]) if arg in mounts else arg for arg in command]
    binary = find_binary("redis-server")
    assert command[0] == "redis-server", command
    assert Path(command[1]) == REDIS_CONF, command
    return [
        binary,
        *command[1:],
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(tmp_path),
    ]


def test_redis_conf_loads_in_redis_server_with_durable_settings(tmp_path: Path) -> None:
    port = free_port()
    executor = TCPExecutor(
        _redis_command_for_this_machine(tmp_path, port), host="127.0.0.1", port=port, timeout=30
    )
    executor.start()
    try:
        # No retries: the refusal is the answer, not a fault to wait out.
        anonymous = redis_sync.Redis(port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis_sync.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        client = redis_sync.Redis(
            port=port, password=DUMMY_SECRETS["REDIS_PASSWORD"], socket_timeout=5
        )
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["save"] == ""
        assert int(config["maxmemory"]) == 1024**3
        assert client.info("persistence")["aof_enabled"] == 1
        client.xadd("{coupon:1}:requests", {"user_id": "42"})
        assert any(tmp_path.rglob("*.aof")), "no append-only file was written"
        client.close()
    finally:
        executor.stop()


def _run_service_user_script(
    mysql_proc: Any, home: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the script as the image would, with the mariadb client pointed at the test server by
    the user's option file (it overrides the system's [client] socket; environment does not)."""
    (home / ".my.cnf").write_text(f"[client]\nsocket={mysql_proc.unixsocket}\n", encoding="utf-8")
    child_env = {key: value for key, value in os.environ.items() if not key.startswith("MYSQL")}
    # MariaDB's root on the test server authenticates through the unix socket.
    child_env.update(HOME=str(home), **env)
    return subprocess.run(
        ["sh", str(SERVICE_USER_SCRIPT)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _root(mysql_proc: Any) -> pymysql.Connection[Any]:
    return pymysql.connect(unix_socket=mysql_proc.unixsocket, user="root", autocommit=True)


async def test_mysql_service_account_can_migrate_and_nothing_more(
    mysql_proc: Any, tmp_path: Path
) -> None:
    suffix = secrets.token_hex(4)
    user, database, password = f"deploy_{suffix}", f"coupon_deploy_{suffix}", secrets.token_hex(16)
    try:
        for _ in range(2):  # a second run (a restarted init) changes nothing and succeeds
            result = _run_service_user_script(
                mysql_proc,
                tmp_path,
                SERVICE_DB_USER=user,
                SERVICE_DB_NAME=database,
                SERVICE_DB_PASSWORD=password,
            )
            assert result.returncode == 0, result.stderr
        dsn = MySQLDsn(
            host="127.0.0.1", port=mysql_proc.port, user=user, password=password, database=database
        )
        applied = await migrate(dsn)
        assert applied, "no migration was applied to the fresh database"
        connection = pymysql.connect(
            host="127.0.0.1", port=mysql_proc.port, user=user, password=password
        )
        try:
            with connection.cursor() as cur:
                cur.execute(f"SELECT COUNT(*) FROM `{database}`.coupons")
                for forbidden in (
                    "SELECT user FROM mysql.user",
                    f"CREATE DATABASE `other_{suffix}`",
                    f"DROP TABLE `{database}`.coupons",
                    f"GRANT SELECT ON `{database}`.* TO '{user}'@'%'",
                ):
                    with pytest.raises(pymysql.err.OperationalError) as denied:
                        cur.execute(forbidden)
                    assert denied.value.args[0] in (1044, 1142, 1045, 1227), (
                        forbidden,
                        denied.value,
                    )
        finally:
            connection.close()
    finally:
        root = _root(mysql_proc)
        with root.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        root.close()


def test_mysql_service_user_script_refuses_unsafe_values(mysql_proc: Any, tmp_path: Path) -> None:
    for variable, value in (
        ("SERVICE_DB_PASSWORD", "it's"),
        ("SERVICE_DB_PASSWORD", "p@ss/word"),
        ("SERVICE_DB_USER", "x'@'%"),
        ("SERVICE_DB_NAME", "coupon`; DROP"),
    ):
        env = {"SERVICE_DB_PASSWORD": "fine0123", "SERVICE_DB_USER": "nobody_here", variable: value}
        result = _run_service_user_script(mysql_proc, tmp_path, **env)
        assert result.returncode != 0, (variable, value)
        assert variable in result.stderr
    root = _root(mysql_proc)
    with root.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM mysql.user WHERE user IN ('nobody_here', 'x')")
        assert cur.fetchone() == (0,)
    root.close()
    assert os.access(SERVICE_USER_SCRIPT, os.X_OK), "the image runs it only when executable"


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    runbook = REPO / "docs" / "RUNBOOK.md"
    headings = {
        line[3:].strip().lower()
        for line in runbook.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    rules = [rule for group in alerts["groups"] for rule in group["rules"]]
    assert rules
    for rule in rules:
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/RUNBOOK.md", f"{rule['alert']}: runbook_url {url!r}"
        assert anchor == rule["alert"].lower(), f"{rule['alert']}: runbook_url {url!r}"
        assert anchor in headings, f"no section '## {rule['alert']}' in docs/RUNBOOK.md"


def _locked() -> dict[str, tuple[str, int]]:
    """Package name -> (pinned version, number of hashes) of deploy/requirements.lock."""
    text = (DEPLOY / "requirements.lock").read_text(encoding="utf-8").replace("\\\n", " ")
    pins: dict[str, tuple[str, int]] = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", " ")):
            continue
        requirement, *options = line.split()
        name, _, version = requirement.partition("==")
        hashes = sum(option.startswith("--hash=sha256:") for option in options)
        pins[canonicalize_name(name)] = (version, hashes)
    return pins


def test_the_image_installs_locked_dependencies_with_hashes_within_the_ranges() -> None:
    """deploy/requirements.lock pins every runtime dependency (setup.cfg's install_requires and
    the [run] extra the image installs) inside its range, each with its files' hashes; the
    image installs it with --require-hashes before the package, with --no-deps."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    lines = [
        *config["options"]["install_requires"].splitlines(),
        *config["options.extras_require"]["run"].splitlines(),
    ]
    wanted = [Requirement(line.strip()) for line in lines if line.strip() and line[0] != "#"]
    pins = _locked()
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in deploy/requirements.lock"
        version, _ = pins[name]
        assert requirement.specifier.contains(version), f"{name}=={version} outside {requirement}"
    unhashed = sorted(name for name, (_, hashes) in pins.items() if not hashes)
    assert not unhashed, f"locked without a hash: {unhashed}"
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert "pip install --require-hashes -r deploy/requirements.lock" in dockerfile
    assert 'pip install --no-deps ".[run]"' in dockerfile


# --------------------------------------------------------------------------------------------
# The production overlay (deploy/k8s/production)

PRODUCTION = K8S / "production"


def _merged(base: Any, patch: Any) -> Any:
    """A strategic merge as kustomize does it for what the overlay patches: maps merge, lists
    of named items (containers, ports) merge by name, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merged(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(item, dict) and "name" in item for item in [*base, *patch]
    ):
        by_name = {item["name"]: item for item in base}
        for item in patch:
            by_name[item["name"]] = _merged(by_name.get(item["name"], {}), item)
        return list(by_name.values())
    return patch


def _production_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, as ``kubectl apply -k deploy/k8s/production`` would apply it."""
    kustomization = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text(encoding="utf-8"))
    objects = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}
    for resource in kustomization["resources"]:
        if resource == "..":
            continue
        for document in yaml.safe_load_all((PRODUCTION / resource).read_text(encoding="utf-8")):
            objects[(document["kind"], document["metadata"]["name"])] = document
    for patch in kustomization["patches"]:
        document = yaml.safe_load((PRODUCTION / patch["path"]).read_text(encoding="utf-8"))
        key = (document["kind"], document["metadata"]["name"])
        assert key in objects, f"{patch['path']} patches {key}, which the base lacks"
        objects[key] = _merged(objects[key], document)
    return objects


def _rsa_public_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def test_production_overlay_is_valid_and_builds_on_the_base() -> None:
    kustomization = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["resources"][0] == ".."
    assert kustomization["namespace"] == "coupon-drop"
    for (kind, name), document in _production_objects().items():
        try:
            kubernetes_validate.validate(document, K8S_VERSIONS[-1], strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"production {kind} {name}: {exc.message}")


def test_production_settings_are_the_readmes_production_advice() -> None:
    objects = _production_objects()
    env = dict(objects[("ConfigMap", "coupon-drop")]["data"])
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text(encoding="utf-8"))
    env.update(secret["stringData"])
    env.update(COUPON_ADMIN_TOKEN="x" * 32, COUPON_JWT_PUBLIC_KEY=_rsa_public_pem())
    settings = Settings.from_env(env)  # the values are valid together
    assert settings.auth == "jwt"
    assert settings.admin_port
    assert settings.ops_on_admin_port
    assert settings.rate_limit_ip_per_second > 0
    assert settings.rate_limit_user_per_second > 0
    assert settings.rate_limit_read_per_second > 0
    assert settings.trusted_proxies
    # The admin listener has a Service of its own; the public one never reaches it.
    deployment = objects[("Deployment", "coupon-gateway")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["admin"] == settings.admin_port
    admin = objects[("Service", "coupon-gateway-admin")]
    assert admin["spec"]["type"] == "ClusterIP"
    assert [port["targetPort"] for port in admin["spec"]["ports"]] == ["admin"]
    public = objects[("Service", "coupon-gateway")]
    assert "admin" not in [port["targetPort"] for port in public["spec"]["ports"]]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.admin_port)
    # The probes stay on the public port, which keeps /healthz and /readyz.
    assert _probe(container, "readinessProbe") == ("/readyz", settings.http_port)


# --------------------------------------------------------------------------------------------
# ./scripts/run, up to the start of its supervisord (a stand-in that records its environment)

RUN_SCRIPT = REPO / "scripts" / "run"
STAND_IN = """#!/bin/sh
# supervisord -c CONF: record what its programs would inherit, then exit (the script stops).
env >"$(dirname "$2")/supervisord.env"
"""


def _run_script(tmp_path: Path, **variables: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """scripts/run copied into ``tmp_path`` (its .run/ is there) with a stand-in supervisord and
    an external MySQL, so it starts no server: nothing of the checkout's .run/ is touched."""
    (tmp_path / "scripts" / "lib").mkdir(parents=True)
    for part in ("run", "lib/bootstrap.sh"):
        copy = tmp_path / "scripts" / part
        copy.write_text((REPO / "scripts" / part).read_text(encoding="utf-8"), encoding="utf-8")
        copy.chmod(0o755)
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(os.path.realpath(sys.executable))
    (venv / "supervisord").write_text(STAND_IN, encoding="utf-8")
    (venv / "supervisord").chmod(0o755)
    (tmp_path / ".venv" / ".installed").write_text("test,run\n", encoding="utf-8")
    # ensure_system_packages wants curl; a stand-in keeps it from calling apt-get where none is.
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "curl").write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    (stubs / "curl").chmod(0o755)
    env = {
        "PATH": f"{os.environ['PATH']}:{stubs}",
        "HOME": str(tmp_path),
        "COUPON_MYSQL_URL": "mysql://coupon:secret@127.0.0.1:1/coupon",
        **variables,
    }
    done = subprocess.run(
        [str(tmp_path / "scripts" / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, tmp_path / ".run"


def _supervisor_programs(run: Path) -> dict[str, configparser.SectionProxy]:
    config = configparser.ConfigParser(interpolation=None)
    config.read(run / "supervisord.conf", encoding="utf-8")
    return {
        name.removeprefix("program:"): config[name]
        for name in config.sections()
        if name.startswith("program:")
    }


def _recorded_env(run: Path) -> dict[str, str]:
    lines = (run / "supervisord.env").read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_run_script_with_replicas_starts_replicas_and_sentinels_and_points_at_them(
    tmp_path: Path,
) -> None:
    done, run = _run_script(tmp_path, COUPON_REDIS_REPLICAS="2")
    assert "supervisord exited" in done.stderr, done.stderr  # the stand-in, as intended
    programs = _supervisor_programs(run)
    assert {"redis", "redis-replica-1", "redis-replica-2"} <= set(programs)
    assert {name for name in programs if name.startswith("sentinel-")} == {
        "sentinel-1",
        "sentinel-2",
        "sentinel-3",
    }
    assert "mariadb" not in programs  # COUPON_MYSQL_URL: an external one
    primary = programs["redis"]["command"].split()
    password = (run / "redis-password").read_text(encoding="utf-8").strip()
    for number, port in ((1, 6381), (2, 6382)):
        replica = programs[f"redis-replica-{number}"]
        argv = replica["command"].split()
        assert argv[argv.index("--port") + 1] == str(port)
        assert argv[argv.index("--replicaof") + 1 : argv.index("--replicaof") + 3] == [
            "127.0.0.1",
            "6380",
        ]
        assert argv[argv.index("--dir") + 1] == str(run / f"redis-replica-{number}")
        # The primary's durability flags, and its password both ways (requirepass, masterauth).
        assert argv[argv.index("--appendonly") :] == primary[primary.index("--appendonly") :]
        conf = Path(argv[1]).read_text(encoding="utf-8").split()
        assert conf == ["requirepass", password, "masterauth", password]
        assert int(replica["priority"]) < int(programs["sentinel-1"]["priority"])
    assert "masterauth" in (run / "redis.conf").read_text(encoding="utf-8")
    sentinel_ports = []
    for number in (1, 2, 3):
        argv = programs[f"sentinel-{number}"]["command"].split()
        assert argv[2:] == ["--sentinel"]
        lines = Path(argv[1]).read_text(encoding="utf-8").splitlines()
        assert "bind 127.0.0.1" in lines
        assert "sentinel monitor coupon 127.0.0.1 6380 2" in lines
        assert f"sentinel auth-pass coupon {password}" in lines
        assert "sentinel down-after-milliseconds coupon 5000" in lines
        assert "sentinel failover-timeout coupon 60000" in lines
        sentinel_ports.append(int(lines[0].removeprefix("port ")))
    assert sentinel_ports == [26380, 26381, 26382]
    env = _recorded_env(run)
    assert env["COUPON_REDIS_SENTINELS"] == "127.0.0.1:26380,127.0.0.1:26381,127.0.0.1:26382"
    assert env["COUPON_REDIS_SENTINEL_MASTER"] == "coupon"
    assert env["COUPON_REDIS_MIN_REPLICAS"] == "1"
    assert "COUPON_REDIS_SENTINEL_PASSWORD" not in env
    assert env["COUPON_REDIS_URL"] == f"redis://:{password}@127.0.0.1:6380/0"
    settings = Settings.from_env(env)  # what the gateway and the workers will accept
    assert settings.redis_sentinel_addresses == tuple(("127.0.0.1", p) for p in sentinel_ports)


def test_run_script_keeps_a_chosen_min_replicas_and_starts_none_by_default(
    tmp_path: Path,
) -> None:
    _, run = _run_script(
        tmp_path / "chosen", COUPON_REDIS_REPLICAS="1", COUPON_REDIS_MIN_REPLICAS="0"
    )
    assert _recorded_env(run)["COUPON_REDIS_MIN_REPLICAS"] == "0"
    _, run = _run_script(tmp_path / "default")
    programs = _supervisor_programs(run)
    assert "redis" in programs
    assert not [name for name in programs if "replica" in name or "sentinel" in name]
    env = _recorded_env(run)
    assert "COUPON_REDIS_SENTINELS" not in env
    assert "COUPON_REDIS_MIN_REPLICAS" not in env


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"COUPON_REDIS_REPLICAS": "-1"}, "COUPON_REDIS_REPLICAS must be 0..9"),
        ({"COUPON_REDIS_REPLICAS": "two"}, "COUPON_REDIS_REPLICAS must be 0..9"),
        ({"COUPON_REDIS_REPLICAS": "10"}, "COUPON_REDIS_REPLICAS must be 0..9"),
        (
            {"COUPON_REDIS_REPLICAS": "1", "COUPON_REDIS_URL": "redis://redis.example:6379/0"},
            "cannot be used with COUPON_REDIS_URL",
        ),
    ],
)
def test_run_script_refuses_bad_replica_settings_before_starting_anything(
    tmp_path: Path, variables: dict[str, str], message: str
) -> None:
    done, run = _run_script(tmp_path, **variables)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: "), line
    assert message in line, line
    assert not (run / "supervisord.conf").exists()
    assert not (run / "redis-password").exists()
