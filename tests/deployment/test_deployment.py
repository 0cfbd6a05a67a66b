"""The deployment in docker/, checked piece by piece where it can run here (containers cannot):
the compose file through the compose CLI, the Helm values against the chart's documented keys,
docker/dagster.yaml loaded by a real DagsterInstance on a real PostgreSQL server, and the code
location served by `dagster api grpc` and queried over gRPC. Plus the conventions that make the
GPU settings hold for every asset."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import jsonschema
import pytest
import yaml
from dagster._core.remote_origin import GrpcServerCodeLocationOrigin
from dagster._core.remote_representation.code_location import GrpcServerCodeLocation

from tests.support import ROOT
from unicorn_assets.partitions import GPU_OP_TAGS, SHARD_BACKFILL

DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
SECRETS = {"POSTGRES_PASSWORD": "pw", "MINIO_ROOT_PASSWORD": "minio-pw",
           "UNICORN_LLM_API_KEY": "llm-key"}
COMPOSE_FILES = ("docker-compose.yaml", "docker-compose.gpu.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- docker compose ---------------------------------------------------------------------------------

def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no compose CLI here, so docker/ cannot be validated: install Debian's "
                "docker-compose (`sudo apt-get install docker-compose`, as .ci/run does) or "
                "Docker's compose plugin", pytrace=False)


def compose_config(*files: str, env: dict[str, str], profile: str | None = None
                   ) -> subprocess.CompletedProcess:
    args = [*compose_cli(), *[a for f in files for a in ("-f", f)]]
    if profile:
        args += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run([*args, "config"], cwd=DOCKER, env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=False)


def test_compose_file_is_valid_and_binds_the_webserver_to_localhost():
    result = compose_config("docker-compose.yaml", env=SECRETS)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) >= {"postgres", "minio", "minio-init", "code", "webserver",
                                       "daemon", "llm"}
    vllm = config["services"].get("vllm")  # compose v2 leaves it out, v1 lists it
    assert vllm is None or vllm["profiles"] == ["gpu"]  # started only with --profile gpu
    ports = json.dumps(config["services"]["webserver"]["ports"])
    assert "127.0.0.1" in ports and "3000" in ports
    code_env = config["services"]["code"]["environment"]
    assert code_env["UNICORN_PROFILE"] == "docker"
    assert code_env["AWS_ENDPOINT_URL"] == "http://minio:9000"


def test_compose_gpu_profile_and_override_add_vllm_and_the_code_gpu():
    result = compose_config("docker-compose.yaml", "docker-compose.gpu.yaml", env=SECRETS,
                            profile="gpu")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("vllm", "code"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(missing):
    result = compose_config("docker-compose.yaml", env={k: v for k, v in SECRETS.items()
                                                        if k != missing})
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_compose_refuses_to_start_with_the_example_env_as_it_is():
    """env.example, copied to .env unedited, must not start a stack with known secrets."""
    env = dict(line.split("=", 1) for line in (DOCKER / "env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert {k: env[k] for k in SECRETS} == dict.fromkeys(SECRETS, "")
    result = compose_config("docker-compose.yaml", env=env)
    assert result.returncode != 0 and "set " in result.stderr


def test_no_secret_has_a_default_and_every_image_is_pinned():
    """Read from the files themselves, so it holds where no compose CLI is installed: each secret
    is required (${NAME:?...}, or $${NAME}, the container's own variable), and every image names
    a release: a tag with a version number, never `latest` or none."""
    for name in COMPOSE_FILES:
        text = (DOCKER / name).read_text()
        assert "change-me" not in text, name
        for secret in SECRETS:
            uses = re.findall(r"(?<!\$)\$\{" + secret + r"([^}]*)\}", text)
            assert all(use.startswith(":?") for use in uses), (name, secret, uses)
        for service, spec in yaml.safe_load(text)["services"].items():
            if "image" not in spec:
                continue
            image = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", spec["image"])  # its default
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag and tag != "latest", (name, service, image)
            assert re.search(r"\d", tag), (name, service, image)
    assert "change-me" not in (DOCKER / "env.example").read_text()
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG PYTHON_VERSION="):
            assert line.split("=")[1].count(".") == 2, line  # a patch release


# --- every service as `docker-compose config` resolves it, against what the images expect ---------

INSTANCE_SERVICES = ("code", "webserver", "daemon")  # the processes that open docker/dagster.yaml
# Each secret and the services that need it; no other service may receive it.
SECRET_USERS = {"POSTGRES_PASSWORD": {"postgres", *INSTANCE_SERVICES},
                "MINIO_ROOT_PASSWORD": {"minio", "minio-init", "code"},
                "UNICORN_LLM_API_KEY": {"code", "llm", "vllm"}}


@pytest.fixture(scope="module")
def stack() -> dict:
    """The whole stack, GPU override and profile included, resolved by the compose CLI, with a
    distinct value per secret so that each can be traced to where it lands."""
    env = {name: f"secret-{name.lower()}-value" for name in SECRETS}
    result = compose_config(*COMPOSE_FILES, env=env, profile="gpu")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    config["_secrets"] = env
    return config


def _ports(spec: dict) -> list[tuple[str, str, str]]:
    """(host address, published port, container port) of each binding, in compose v1's short
    syntax ("127.0.0.1:3000:3000/tcp") or v2's long one."""
    out = []
    for port in spec.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port.get("published", "")),
                        str(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            host = parts[0] if len(parts) == 3 else ""
            out.append((host, parts[-2] if len(parts) > 1 else "", parts[-1]))
    return out


def _mounts(spec: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each mount, short or long syntax."""
    out = []
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            out.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
        else:
            source, target, *mode = volume.split(":")
            out.append((source, target, mode == ["ro"]))
    return out


def _on_named_volume(spec: dict, path: str, declared: dict) -> bool:
    return any(source in declared and (path == target or path.startswith(target.rstrip("/") + "/"))
               for source, target, _ in _mounts(spec))


def _argv(spec: dict) -> str:
    """The service's command line as one string (entrypoint and command)."""
    parts = []
    for key in ("entrypoint", "command"):
        value = spec.get(key) or []
        parts += [value] if isinstance(value, str) else [str(v) for v in value]
    return " ".join(parts)


def _flag(argv: list[str] | str, name: str) -> str:
    words = argv.split() if isinstance(argv, str) else argv
    return words[words.index(name) + 1]


def dockerfile_stage(target: str) -> list[str]:
    """The instructions of one stage of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    stage, out = None, []
    for line in text.splitlines():
        if line.startswith("FROM "):
            stage = line.split(" AS ")[-1].strip() if " AS " in line else None
        elif stage == target and line.strip() and not line.startswith("#"):
            out.append(line.strip())
    return out


def test_compose_publishes_nothing_but_loopback_ports(stack):
    """Dagster OSS has no login and the other services trust their network: only the webserver
    and MinIO publish ports, and on 127.0.0.1 only (DAGSTER_WEBSERVER_BIND unset)."""
    published = {name for name, spec in stack["services"].items() if spec.get("ports")}
    assert published == {"webserver", "minio"}
    for name in published:
        for host, _, _ in _ports(stack["services"][name]):
            assert host == "127.0.0.1", (name, stack["services"][name]["ports"])
    webserver = stack["services"]["webserver"]
    assert [(h, p) for h, p, t in _ports(webserver)] == [("127.0.0.1", "3000")]
    assert _ports(webserver)[0][2] == _flag(webserver["command"], "--port")


def test_the_code_server_serves_where_the_workspace_and_healthcheck_look(stack):
    services = stack["services"]
    (entry,) = yaml.safe_load((DOCKER / "workspace.yaml").read_text())["load_from"]
    grpc = entry["grpc_server"]
    assert grpc["host"] in services
    code = services[grpc["host"]]
    # The code image's CMD serves it (compose overrides neither entrypoint nor command).
    assert "command" not in code and "entrypoint" not in code
    (cmd,) = [json.loads(line[4:]) for line in dockerfile_stage("code") if line.startswith("CMD ")]
    assert cmd[:3] == ["dagster", "api", "grpc"]
    assert int(_flag(cmd, "--port")) == grpc["port"]
    assert _flag(cmd, "--location-name") == grpc["location_name"]
    dagster_tool = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert _flag(cmd, "--module-name") == dagster_tool["dagster"]["module_name"]
    assert _flag(cmd, "--attribute") == "defs"
    assert f"EXPOSE {grpc['port']}" in dockerfile_stage("code")
    assert _flag(code["healthcheck"]["test"], "--port") == str(grpc["port"])
    # The webserver and the daemon read the workspace file where the dagster image puts it.
    (copy,) = [line for line in dockerfile_stage("dagster") if "docker/workspace.yaml" in line]
    workspace_in_image = copy.split()[-1]
    for name in ("webserver", "daemon"):
        assert _flag(_argv(services[name]), "--workspace") == workspace_in_image, name


def test_every_instance_process_gets_what_dagster_yaml_reads(stack):
    """Each process that opens the instance has every variable docker/dagster.yaml reads, and
    they name the compose PostgreSQL with its own user, database and password."""
    services = stack["services"]
    wanted = set(re.findall(r"\{env: (\w+)\}", (DOCKER / "dagster.yaml").read_text()))
    assert {"DAGSTER_POSTGRES_PASSWORD", "DAGSTER_COMPUTE_LOG_DIR"} <= wanted
    postgres = services["postgres"]["environment"]
    for name in INSTANCE_SERVICES:
        env = services[name]["environment"]
        assert wanted <= set(env), (name, sorted(wanted - set(env)))
        assert env["DAGSTER_POSTGRES_HOST"] in services and env["DAGSTER_POSTGRES_PORT"] == "5432"
        for key in ("USER", "DB", "PASSWORD"):
            assert env[f"DAGSTER_POSTGRES_{key}"] == postgres[f"POSTGRES_{key}"], (name, key)
        # The instance's dagster.yaml is in the image, under the DAGSTER_HOME it sets.
        stage = "code" if name == "code" else "dagster"
        lines = dockerfile_stage(stage) + (dockerfile_stage("code-base") if name == "code" else [])
        home = next(re.search(r"DAGSTER_HOME=(\S+)", line)[1] for line in lines
                    if "DAGSTER_HOME=" in line)
        assert any(line.startswith("COPY docker/dagster.yaml") and
                   line.split()[-1].replace("${DAGSTER_HOME}", home) == f"{home}/dagster.yaml"
                   for line in dockerfile_stage(stage)), name
    # Runs write their compute logs in `code`; the webserver shows them: one volume, one path.
    logs = services["code"]["environment"]["DAGSTER_COMPUTE_LOG_DIR"]
    sources = {name: {s for s, t, _ in _mounts(services[name]) if t == logs}
               for name in ("code", "webserver")}
    assert sources["code"] and sources["code"] == sources["webserver"]
    assert sources["code"] <= set(stack["volumes"])


def test_the_code_location_gets_every_setting_the_docker_profile_reads(stack):
    """Compose passes the code container only the variables it lists (docker/.env feeds only
    the ${...} in the compose file), so each variable the docker profile reads must be listed,
    or the .env value never reaches the profile."""
    services = stack["services"]
    code = services["code"]
    env = code["environment"]
    assert env["UNICORN_PROFILE"] == "docker"
    profile_text = (ROOT / "dagster_project" / "profiles" / "docker.yaml").read_text()
    wanted = set(re.findall(r"\{env: (\w+)", profile_text))
    assert wanted - set(env) == set()
    # Local state (LLM response cache, model weights, local data) lies on a named volume.
    for key in ("UNICORN_LLM_CACHE", "HF_HOME", "UNICORN_CLIP_CACHE", "UNICORN_DATA_DIR"):
        assert _on_named_volume(code, env[key], stack["volumes"]), (key, env[key])
    # Data and seeds are in the bucket that minio-init creates and fills, through MinIO's API.
    init = _argv(services["minio-init"])
    bucket = re.search(r"mc mb \S+ local/(\S+)", init)[1]
    assert env["UNICORN_DATA_URI"].startswith(f"s3://{bucket}/")
    target = re.search(r"mc mirror \S+ (\S+) local/(\S+)", init)
    assert env["UNICORN_SEEDS"] == f"s3://{target[2]}"
    ((seeds_source, _, read_only),) = [m for m in _mounts(services["minio-init"])
                                       if m[1] == target[1]]
    assert read_only and (DOCKER / seeds_source).resolve().is_dir()
    endpoint = env["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    assert endpoint[0] in services and endpoint[1] == "9000"  # MinIO's S3 API
    assert _flag(_argv(services["minio"]), "server") == "/data"
    assert _on_named_volume(services["minio"], "/data", stack["volumes"])
    assert _on_named_volume(services["postgres"], "/var/lib/postgresql/data", stack["volumes"])
    # The default LLM URL names the llm service and the port its server listens on.
    llm_host, llm_port = env["UNICORN_LLM_URL"].removeprefix("http://").split("/")[0].split(":")
    assert llm_host == "llm" and _flag(_argv(services["llm"]), "--port") == llm_port
    assert _flag(_argv(services["llm"]), "--model_alias") == env["UNICORN_LLM_MODEL"]


def test_each_secret_reaches_only_its_services_and_never_a_command_line(stack, monkeypatch):
    """A secret travels in the environment of the services that use it, never in a command line
    (`ps` and `docker inspect`'s Args show those to everyone on the host)."""
    for secret, value in stack["_secrets"].items():
        holders = {name for name, spec in stack["services"].items()
                   if value in json.dumps(spec.get("environment", {}))}
        assert holders == SECRET_USERS[secret], secret
        for name, spec in stack["services"].items():
            argv = _argv(spec)
            assert value not in argv and secret not in argv, (name, secret)
    # The LLM servers read their key from the environment, under the name each one reads:
    # llama.cpp's server settings read API_KEY (checked here on the installed server) and vLLM's
    # OpenAI server VLLM_API_KEY (vllm/envs.py; `--api-key` takes precedence when given).
    services = stack["services"]
    key = stack["_secrets"]["UNICORN_LLM_API_KEY"]
    assert services["llm"]["environment"]["API_KEY"] == key
    assert services["vllm"]["environment"]["VLLM_API_KEY"] == key
    import argparse

    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ServerSettings, Settings

    monkeypatch.setenv("API_KEY", key)
    parser = argparse.ArgumentParser()
    add_args_from_model(parser, Settings)
    args = parser.parse_args(["--model", "m.gguf"])
    assert parse_model_from_args(ServerSettings, args).api_key == key


def test_dependencies_wait_for_states_their_services_can_report(stack):
    services = stack["services"]
    for name, spec in services.items():
        depends = spec.get("depends_on") or {}
        for other, how in (depends.items() if isinstance(depends, dict) else []):
            condition = how["condition"]
            if condition == "service_healthy":
                assert services[other].get("healthcheck"), (name, other)
            elif condition == "service_completed_successfully":
                assert services[other].get("restart") == "no", (name, other)
    for name in INSTANCE_SERVICES:
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["code"]["condition"] == "service_healthy"
    # Every named volume a service mounts is declared; every bind mount exists in the repository.
    for name, spec in services.items():
        for source, _, _ in _mounts(spec):
            assert source in stack["volumes"] or Path(source).exists(), (name, source)


# --- Helm values ------------------------------------------------------------------------------------

def helm_values() -> dict:
    return yaml.safe_load((DOCKER / "helm" / "values.yaml").read_text())


def helm_schema() -> dict:
    schema = json.loads((DOCKER / "helm" / "values.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def test_helm_values_follow_the_chart_schema_and_name_this_code_location():
    values = helm_values()
    jsonschema.validate(values, helm_schema(), cls=jsonschema.Draft202012Validator)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    module = args[args.index("--module-name") + 1]
    attribute = args[args.index("--attribute") + 1]
    assert module == "dagster_project.definitions" and attribute == "defs"
    profile = next(e["value"] for e in deployment["env"] if e["name"] == "UNICORN_PROFILE")
    assert (ROOT / "dagster_project" / "profiles" / f"{profile}.yaml").is_file()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["concurrency"]["pools"]["granularity"] == "op"
    # The K8sRunLauncher checks run pods and resumes a lost one; then a failed run is retried.
    monitoring, retries = (values["dagsterDaemon"][k] for k in ("runMonitoring", "runRetries"))
    assert monitoring["enabled"] and monitoring["maxResumeRunAttempts"] >= 1
    assert retries["enabled"] and retries["maxRetries"] >= 1


@pytest.mark.parametrize("break_it", [
    lambda v: v["runLauncher"]["config"]["k8sRunLauncher"].update(runK8sConfg={}),  # typo
    lambda v: v["concurrency"]["pools"].update(granularity="step"),
    lambda v: v["dagster-user-deployments"]["deployments"][0].pop("port"),
    lambda v: v["runLauncher"]["config"].pop("k8sRunLauncher"),
])
def test_helm_schema_rejects_broken_values(break_it):
    values = helm_values()
    break_it(values)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, helm_schema(), cls=jsonschema.Draft202012Validator)


def test_the_cluster_profile_runs_steps_as_kubernetes_jobs(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "UNICORN_LLM_API_KEY"):
        monkeypatch.setenv(name, "x")
    from dagster_project.definitions import build_definitions

    defs = build_definitions("cluster")
    job = defs.resolve_job_def("unicorn_shard_job")
    assert job.executor_def.name == "k8s_job_executor"
    dg.validate_run_config(job)  # the profile's k8s_job_executor config fits its schema


# --- dagster.yaml on a real PostgreSQL (the session's server: tests/deployment/conftest.py) -------

def test_the_shipped_dagster_yaml_loads_on_postgres(postgres_db, tmp_path, monkeypatch):
    env = {**postgres_db, "DAGSTER_COMPUTE_LOG_DIR": str(tmp_path / "logs")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(DOCKER / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1 and pools.pool_granularity.value == "run"
        # Run monitoring on: no run stays STARTED for ever (DefaultRunLauncher resumes nothing)
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
        assert instance.run_monitoring_max_resume_run_attempts == 0
        assert 0 < instance.run_monitoring_start_timeout_seconds <= 600
        assert instance.run_monitoring_max_runtime_seconds > 0
        # The daemon evaluates the nightly automation condition sensor
        assert instance.auto_materialize_enabled and instance.auto_materialize_use_sensors
        instance.add_dynamic_partitions("seed_shards", ["shard-a"])
        assert instance.get_dynamic_partitions("seed_shards") == ["shard-a"]

        # What the compose daemon runs on start: the gpu pool's limit, kept in PostgreSQL.
        subprocess.run([str(BIN / "dagster"), "instance", "concurrency", "set", "gpu", "2"],
                       env={**os.environ, "DAGSTER_HOME": str(home)}, check=True,
                       capture_output=True, timeout=120)
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 2


def test_a_broken_dagster_yaml_is_refused(postgres, tmp_path, monkeypatch):
    for key, value in postgres.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "home"
    home.mkdir()
    text = (DOCKER / "dagster.yaml").read_text().replace("granularity: run", "granularity: step")
    (home / "dagster.yaml").write_text(text)
    with pytest.raises(Exception, match="granularity"):
        dg.DagsterInstance.from_config(str(home))


# --- the code location over gRPC --------------------------------------------------------------------

@pytest.mark.slow
def test_the_grpc_code_server_serves_the_sensors_and_jobs(instance, tmp_path):
    port = free_port()
    env = {**os.environ, "UNICORN_PROFILE": "local", "UNICORN_DATA_DIR": str(tmp_path / "data"),
           "DAGSTER_HOME": str(tmp_path)}
    server = subprocess.Popen(
        [str(BIN / "dagster"), "api", "grpc", "--module-name", "dagster_project.definitions",
         "--attribute", "defs", "--host", "127.0.0.1", "--port", str(port),
         "--location-name", "unicorn"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while subprocess.run([str(BIN / "dagster"), "api", "grpc-health-check", "--port",
                              str(port)], capture_output=True, env=env,
                             check=False).returncode != 0:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the code server did not become healthy"
            time.sleep(1)
        origin = GrpcServerCodeLocationOrigin(host="127.0.0.1", port=port,
                                              location_name="unicorn")
        with GrpcServerCodeLocation(origin=origin, instance=instance) as location:
            (repository,) = location.get_repositories().values()
            assert {s.name for s in repository.get_sensors()} == {"new_seed_shards",
                                                                  "nightly_regeneration"}
            assert not repository.get_schedules()  # nightly: automation conditions, no schedule
            assert repository.has_job("unicorn_shard_job")

            # One tick of the sensor, evaluated by the server as the daemon has it done.
            data = location.get_sensor_execution_data(
                instance, repository.handle, "new_seed_shards", None, None, None, None, None)
            bundled = {"coco-val2017-a", "coco-val2017-b", "fine-grained-birds"}
            assert {k for r in data.dynamic_partitions_requests for k in r.partition_keys} == bundled
            assert {r.partition_key for r in data.run_requests} == bundled
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine can outlast the graceful shutdown
            server.kill()
            server.wait()


# --- conventions over every asset ----------------------------------------------------------------

def test_model_calling_assets_carry_pool_retries_backfill_and_gpu_tags():
    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()
    checked = set()
    for key in graph.get_all_asset_keys():
        asset = graph.get(key).assets_def
        models = {k for k in asset.required_resource_keys
                  if hasattr(type(defs.resources.get(k)), "model_id")}
        if not models or asset.op.name in checked:
            continue
        checked.add(asset.op.name)
        assert asset.op.pool == "gpu", asset.op.name
        retry = asset.op.retry_policy
        assert retry and retry.max_retries >= 1 and retry.delay and retry.backoff, asset.op.name
        if asset.partitions_def is not None:
            assert asset.backfill_policy == SHARD_BACKFILL, asset.op.name
        if models & {"clip", "diffusion"}:  # a model held on the local GPU
            tag = asset.op.tags.get("dagster-k8s/config")
            assert tag and json.loads(tag) == GPU_OP_TAGS["dagster-k8s/config"], asset.op.name
    assert {"expand_captions"} <= checked
    assert defs.executor.name == "in_process"


def test_the_docker_profile_matches_the_compose_stack(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "UNICORN_LLM_API_KEY"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("UNICORN_CLIP_PRETRAINED", "")  # what compose passes for an unset entry
    from dagster_project.definitions import build_definitions

    defs = build_definitions("docker")
    io, seeds = defs.resources["io_manager"], defs.resources["seeds"]
    assert io.base_uri == "s3://unicorn/data" and seeds.location == "s3://unicorn/seeds"
    assert io.s3.endpoint_url == "http://minio:9000"
    assert isinstance(io.s3.secret_access_key, dg.EnvVar)
    assert defs.resources["llm"].base_urls == ["http://llm:8000/v1"]
    assert defs.resources["clip"].pretrained is None  # random weights, not a tag named ""
    assert defs.get_sensor_def("new_seed_shards").default_status == dg.DefaultSensorStatus.RUNNING
    nightly = next(s for s in defs.sensors if s.name == "nightly_regeneration")
    assert nightly.default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.executor.name == "in_process"
