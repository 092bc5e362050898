"""deploy/: every YAML file parses, names only things that exist, and keeps secure defaults.

Nothing here needs Docker, Kubernetes or a cloud: the files are read as data. The checks walk
the parsed trees generically (every string, every `image`, every `runtime_env`), so a new
file under deploy/ is checked without changing this test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from probeserve.spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())

LOOPBACK = {"127.0.0.1", "localhost"}
SECRET_NAME = re.compile(r"SECRET|KEY|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
JOBS_REF = re.compile(r"(?:(/[\w.-]+(?:/[\w.-]+)*)/)?(?<![\w.-])(jobs/[\w./-]*?\.(?:py|ya?ml))(?![\w.-])")
SWEEP_SPEC_ARG = re.compile(r"jobs/sweep\.py\s+(\S+)")
ENV_FLAG = re.compile(r"(?:--env|-e)[ =]([A-Za-z_][A-Za-z0-9_]*)=")
DASHBOARD_FLAG = re.compile(r"--dashboard-host[= ](\S+)")
PROBESERVE_IMAGE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)*probeserve:(?P<tag>[\w.-]+)$")
RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray(?:-ml)?:(?P<tag>[\w.-]+)$")


def _project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    assert match, "pyproject.toml: no version in [project]"
    return match.group(1)


def _documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _walk(node: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) in a parsed tree; list items carry their list's key."""
    yield key, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _embedded(doc: Any) -> Iterator[Any]:
    """YAML inside strings: a RayJob's runtimeEnvYAML and ConfigMap entries named *.yaml."""
    for key, value in _walk(doc):
        if key == "runtimeEnvYAML" and isinstance(value, str):
            yield yaml.safe_load(value)
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        for name, text in (doc.get("data") or {}).items():
            if name.endswith((".yaml", ".yml")):
                yield yaml.safe_load(text)


def _all_trees() -> Iterator[tuple[Path, Any]]:
    for path in YAML_FILES:
        for doc in _documents(path):
            yield path, doc
            for inner in _embedded(doc):
                yield path, inner


def _strings(tree: Any) -> Iterator[str]:
    for _, value in _walk(tree):
        if isinstance(value, str):
            yield value


def _dockerfile_workdir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert workdirs, "deploy/Dockerfile has no WORKDIR"
    return workdirs[-1].rstrip("/")


def _dockerfile_ray_version() -> str:
    text = DOCKERFILE.read_text()
    match = re.search(r"^ARG\s+RAY_IMAGE=(\S+)", text, re.MULTILINE)
    assert match, "deploy/Dockerfile: name the base image with ARG RAY_IMAGE=rayproject/ray:..."
    image = RAY_IMAGE.match(match.group(1))
    assert image, f"deploy/Dockerfile: base image {match.group(1)} is not a rayproject/ray image"
    return image.group("tag").split("-")[0]


def _is_launcher_config(doc: Any) -> bool:
    return isinstance(doc, dict) and "cluster_name" in doc and "provider" in doc


def _ray_cluster_specs(doc: Any) -> Iterator[dict]:
    """The RayCluster specs in a KubeRay resource (RayCluster, RayJob, RayService)."""
    if not isinstance(doc, dict) or not str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        yield spec
    elif kind == "RayJob" and "rayClusterSpec" in spec:
        yield spec["rayClusterSpec"]
    elif kind == "RayService":
        yield spec["rayClusterConfig"]


def _group_containers(cluster: dict) -> Iterator[tuple[str, dict]]:
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield name, container


def _env_token_auth(env: list[dict]) -> bool:
    """RAY_AUTH_MODE=token, with the token from a Secret or a file, never a literal value."""
    by_name = {e["name"]: e for e in env or []}
    mode = by_name.get("RAY_AUTH_MODE", {}).get("value")
    token = by_name.get("RAY_AUTH_TOKEN", {})
    from_secret = "secretKeyRef" in token.get("valueFrom", {}) and "value" not in token
    return mode == "token" and (from_secret or "RAY_AUTH_TOKEN_PATH" in by_name)


def _token_auth(cluster: dict) -> bool:
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        return True
    containers = [c for _, c in _group_containers(cluster)]
    if cluster.get("enableInTreeAutoscaling"):
        containers.append(cluster.get("autoscalerOptions") or {})
    return all(_env_token_auth(c.get("env", [])) for c in containers)


def test_deploy_holds_the_image_the_manifests_and_their_docs():
    for name in [
        "Dockerfile",
        "README.md",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "cluster-launcher/aws-gpu.yaml",
    ]:
        assert (DEPLOY / name).is_file(), f"deploy/{name} is missing"
    readme = (DEPLOY / "README.md").read_text()
    for path in YAML_FILES:
        rel = path.relative_to(DEPLOY).as_posix()
        assert rel in readme, f"deploy/README.md does not document {rel}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses_and_each_kubernetes_object_is_named(path):
    docs = _documents(path)
    assert docs, f"{path}: no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"
        if "apiVersion" in doc:
            assert doc.get("kind"), f"{path}: an object has no kind"
            assert (doc.get("metadata") or {}).get("name"), f"{path}: a {doc['kind']} has no metadata.name"
        else:
            assert _is_launcher_config(doc), (
                f"{path}: neither a Kubernetes object nor a cluster launcher config"
            )
    for _ in _embedded(docs):  # embedded YAML (ConfigMap specs, runtimeEnvYAML) parses too
        pass


def test_entrypoints_and_specs_named_anywhere_exist_in_the_repo():
    workdir = _dockerfile_workdir()
    seen = set()
    texts = [(p, s) for p, tree in _all_trees() for s in _strings(tree)]
    texts += [(DEPLOY / "README.md", (DEPLOY / "README.md").read_text())]
    for path, text in texts:
        for prefix, ref in JOBS_REF.findall(text):
            seen.add(ref)
            assert (ROOT / ref).is_file(), f"{path.name} names {ref}, which is not in the repository"
            if prefix:  # an absolute path inside the image
                assert prefix == workdir, (
                    f"{path.name} names {prefix}/{ref}, but deploy/Dockerfile puts the repo at {workdir}"
                )
    assert "jobs/sweep.py" in seen, "no manifest runs the job entrypoint jobs/sweep.py"


def test_every_sweep_spec_a_manifest_runs_is_a_valid_spec():
    configmaps = {
        doc["metadata"]["name"]: doc.get("data") or {}
        for path in YAML_FILES
        for doc in _documents(path)
        if doc.get("kind") == "ConfigMap"
    }
    checked = 0
    for path in YAML_FILES:
        for doc in _documents(path):
            mounts = {}  # mountPath -> ConfigMap name, within this object
            for _, pod in ((k, v) for k, v in _walk(doc) if isinstance(v, dict) and "containers" in v):
                volumes = {
                    v["name"]: v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v
                }
                for container in pod["containers"]:
                    for m in container.get("volumeMounts", []):
                        if m["name"] in volumes:
                            mounts[m["mountPath"].rstrip("/")] = volumes[m["name"]]
            for text in _strings(doc):
                for arg in SWEEP_SPEC_ARG.findall(text):
                    if "jobs/" in arg:
                        load_spec(ROOT / arg[arg.index("jobs/") :])
                    else:
                        folder, _, key = arg.rpartition("/")
                        assert folder in mounts, (
                            f"{path.name}: spec {arg} is neither in jobs/ nor in a mounted ConfigMap"
                        )
                        data = configmaps.get(mounts[folder])
                        assert data is not None, f"{path.name}: ConfigMap {mounts[folder]} is not in deploy/"
                        assert key in data, f"{path.name}: ConfigMap {mounts[folder]} has no key {key}"
                        spec_from_dict(
                            yaml.safe_load(data[key]), source=f"{path.name}:{mounts[folder]}/{key}"
                        )
                    checked += 1
    assert checked, "no manifest runs `jobs/sweep.py SPEC`"


def test_images_are_rayproject_or_this_version_of_probeserve():
    version = _project_version()
    images = [
        (path, value)
        for path, tree in _all_trees()
        for key, value in _walk(tree)
        if key in {"image", "head_image", "worker_image"} and isinstance(value, str)
    ]
    assert images, "no image is named under deploy/"
    for path, image in images:
        ours = PROBESERVE_IMAGE.match(image)
        if ours:
            assert ours.group("tag") == version, f"{path.name}: {image}, but pyproject.toml says {version}"
            assert DOCKERFILE.is_file(), f"{path.name} names {image}, but deploy/Dockerfile is missing"
        else:
            assert RAY_IMAGE.match(image), f"{path.name}: {image} is neither rayproject/ray nor probeserve"
    assert any(PROBESERVE_IMAGE.match(i) for _, i in images), "no manifest runs the probeserve image"


def test_ray_version_is_the_same_in_the_image_and_the_manifests():
    ray_version = _dockerfile_ray_version()
    for path in YAML_FILES:
        for doc in _documents(path):
            for cluster in _ray_cluster_specs(doc):
                assert str(cluster.get("rayVersion")) == ray_version, (
                    f"{path.name}: rayVersion {cluster.get('rayVersion')}, but the image is built on Ray {ray_version}"
                )


def test_dockerfile_installs_the_package_and_does_not_run_as_root():
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert re.search(r"^FROM\s+\$\{?RAY_IMAGE\}?", text, re.MULTILINE), "FROM should use ARG RAY_IMAGE"
    _dockerfile_ray_version()
    assert re.search(r"pip install\b[^\n]*\s\.(\s|$)", text), "the Dockerfile does not `pip install .`"
    for needed in ("pyproject.toml", "probeserve", "jobs"):
        assert any(line.startswith("COPY") and needed in line for line in lines), f"nothing COPYs {needed}"
    users = [line.split()[1] for line in lines if line.startswith("USER")]
    assert users, "no USER line: the image would run as whatever its base says"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"the image runs as {users[-1]}"
    label = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text)
    assert label and label.group(1) == _project_version(), (
        "the image version label differs from pyproject.toml"
    )
    assert re.search(r'^CMD\s+\["probeserve",\s*"--help"\]', text, re.MULTILINE), (
        "CMD should print probeserve --help"
    )
    assert _dockerfile_workdir().startswith("/"), "WORKDIR should be absolute"


def test_no_secret_in_runtime_env_or_literal_environment():
    for path, tree in _all_trees():
        for key, value in _walk(tree):
            runtime_env = (
                yaml.safe_load(value) if key == "runtimeEnvYAML" and isinstance(value, str) else None
            )
            if key in {"runtime_env", "runtimeEnv"} and isinstance(value, dict):
                runtime_env = value
            if isinstance(runtime_env, dict):
                for name in runtime_env.get("env_vars") or {}:
                    assert not SECRET_NAME.search(name), f"{path.name}: runtime_env env_vars has {name}"
            if key == "env" and isinstance(value, list):  # Kubernetes env: secrets only by reference
                for e in value:
                    if isinstance(e, dict) and SECRET_NAME.search(str(e.get("name", ""))):
                        assert "value" not in e, f"{path.name}: {e['name']} has a literal value; use a Secret"
            if isinstance(value, str):
                for name in ENV_FLAG.findall(value):
                    assert not SECRET_NAME.search(name), (
                        f"{path.name}: `{value}` passes {name} on a command line"
                    )
        if isinstance(tree, dict) and tree.get("kind") == "Secret":  # tokens and keys are made, not committed
            assert not tree.get("data") and not tree.get("stringData"), f"{path.name}: a Secret with data"


def test_dashboard_is_on_loopback_or_behind_token_auth_and_never_public():
    flags = [(p, v) for p, tree in _all_trees() for s in _strings(tree) for v in DASHBOARD_FLAG.findall(s)]
    for path, value in flags:
        assert value.strip("'\"") in LOOPBACK, f"{path.name}: --dashboard-host={value}"
    heads = 0
    for path in YAML_FILES:
        for doc in _documents(path):
            assert doc.get("kind") != "Ingress", f"{path.name}: an Ingress exposes the cluster"
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: a public Service"
            for cluster in _ray_cluster_specs(doc):
                heads += 1
                head = cluster["headGroupSpec"]
                assert head.get("serviceType", "ClusterIP") == "ClusterIP", (
                    f"{path.name}: the head Service is public"
                )
                # Token auth on every KubeRay cluster, loopback dashboard or not: a RayJob's
                # dashboard must listen on the pod address for the operator and its submitter.
                host = (head.get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0")
                assert _token_auth(cluster), (
                    f"{path.name}: {doc['kind']} {doc['metadata']['name']} (dashboard on {host}) has no token auth"
                )
    assert heads, "no KubeRay cluster under deploy/"


def test_cluster_launcher_config_matches_rays_schema_and_uses_token_auth():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    configs = [(p, d) for p in YAML_FILES for d in _documents(p) if _is_launcher_config(d)]
    assert configs, "no Ray cluster launcher config under deploy/"
    for path, config in configs:
        jsonschema.validate(config, schema)
        head_cmds = " ".join(config.get("head_start_ray_commands", []))
        assert "--dashboard-host" in head_cmds, (
            f"{path.name}: say --dashboard-host=127.0.0.1 (Ray's default is 0.0.0.0)"
        )
        run_options = " ".join((config.get("docker") or {}).get("run_options", []))
        starts = config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", [])
        assert "RAY_AUTH_MODE=token" in run_options or all(
            "RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c
        ), f"{path.name}: Ray starts without RAY_AUTH_MODE=token"
        assert any(str(k).endswith(".ray/auth_token") for k in config.get("file_mounts", {})), (
            f"{path.name}: no token file in file_mounts"
        )
        gpu_types = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU")]
        assert gpu_types, f"{path.name}: no node type with GPUs"


def _pod_templates(doc: Any) -> Iterator[dict]:
    """Pod templates anywhere in a resource (Deployment, CronJob, Job, ...)."""
    for _, value in _walk(doc):
        if isinstance(value, dict) and isinstance(value.get("spec"), dict) and "containers" in value["spec"]:
            yield value


def _selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels") or {}
    return not selector.get("matchExpressions") and all(labels.get(k) == v for k, v in match.items())


def _watch_addresses() -> list[tuple[Path, str, dict]]:
    """(file, --address, pod labels) of every watch daemon under deploy/."""
    found = []
    for path in YAML_FILES:
        for doc in _documents(path):
            for pod in _pod_templates(doc):
                for container in pod["spec"]["containers"]:
                    cmd = [str(c) for c in container.get("command", []) + container.get("args", [])]
                    if "watch" in cmd and "--address" in cmd:
                        labels = (pod.get("metadata") or {}).get("labels") or {}
                        found.append((path, cmd[cmd.index("--address") + 1], labels))
    return found


def test_the_watch_daemon_can_reach_the_job_api_it_submits_to_and_nothing_else_can():
    clusters = {
        doc["metadata"]["name"]: (path, doc["spec"])
        for path in YAML_FILES
        for doc in _documents(path)
        if doc.get("kind") == "RayCluster"
    }
    policies = [
        (path, doc) for path in YAML_FILES for doc in _documents(path) if doc.get("kind") == "NetworkPolicy"
    ]
    daemons = _watch_addresses()
    assert daemons, "no watch daemon with --address under deploy/"
    for path, address, labels in daemons:
        match = re.fullmatch(r"https?://([a-z0-9-]+)-head-svc:(\d+)", address)
        assert match, f"{path.name}: --address {address} is not a KubeRay head Service"
        name, port = match.group(1), int(match.group(2))
        assert name in clusters, f"{path.name}: --address {address}: no RayCluster {name} under deploy/"
        cpath, cluster = clusters[name]
        params = cluster["headGroupSpec"].get("rayStartParams") or {}
        assert str(params.get("dashboard-host", "0.0.0.0")) not in LOOPBACK, (
            f"{cpath.name}: the dashboard listens on loopback, so {path.name}'s daemon cannot reach {address}"
        )
        assert int(params.get("dashboard-port", 8265)) == port, (
            f"{path.name}: {address} is not the dashboard port"
        )
        head_labels = {"ray.io/cluster": name, "ray.io/node-type": "head"}
        head_labels |= cluster["headGroupSpec"]["template"].get("metadata", {}).get("labels", {})
        fences = [(p, d) for p, d in policies if _selects(d["spec"].get("podSelector", {}), head_labels)]
        assert fences, f"{cpath.name}: no NetworkPolicy fences the head of RayCluster {name}"
        for ppath, policy in fences:
            assert "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
            for rule in policy["spec"].get("ingress", []):
                sources = rule.get("from") or []
                assert sources, f"{ppath.name}: an ingress rule with no `from` admits every pod"
                for source in sources:
                    assert "ipBlock" not in source and "namespaceSelector" not in source, (
                        f"{ppath.name}: the head admits pods outside its namespace"
                    )
        admitted = any(
            any(_selects(src.get("podSelector", {}), labels) for src in rule.get("from") or [])
            and (not rule.get("ports") or any(int(x.get("port", 0)) == port for x in rule["ports"]))
            for _, policy in fences
            for rule in policy["spec"].get("ingress", [])
        )
        assert admitted, (
            f"{path.name}: no NetworkPolicy admits the daemon ({labels}) to port {port} of {name}"
        )
