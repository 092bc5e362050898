"""deploy/: every YAML file parses, names only things that exist, and keeps secure defaults.

Nothing here needs Docker, Kubernetes or a cloud: the files are read as data. The checks walk
the parsed trees generically (every string, every `image`, every `runtime_env`), so a new
file under deploy/ is checked without changing this test.
"""

from __future__ import annotations

import fnmatch
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


# ----------------------------------------------------------------------------------------------
# The image's environment: deploy/constraints.txt against pyproject.toml and the base image

CONSTRAINTS = DEPLOY / "constraints.txt"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """{canonical name: version} of deploy/constraints.txt; every line is a comment or `name==version`."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, (
            f"constraints.txt:{number}: {line!r} is not `name==version` (no ranges, URLs or options)"
        )
        name = _canonical(match.group("name"))
        assert name not in pins, f"constraints.txt:{number}: {name} is pinned twice"
        pins[name] = match.group("version")
    return pins


def _base_image_tags() -> tuple[str, str]:
    """(python "3.11", CUDA "13.0") of the Dockerfile's base image, from its -py3XX-cuXYZ tag."""
    image = re.search(r"^ARG\s+RAY_IMAGE=(\S+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    tags = re.search(r"-py3(\d+)-cu(\d+)(\d)$", image)
    assert tags, (
        f"deploy/Dockerfile: base image {image} does not name its Python and CUDA (-py3XX-cuXYZ); "
        "Ray's `-gpu` is an alias whose CUDA version changes under the tag"
    )
    return f"3.{tags.group(1)}", f"{int(tags.group(2))}.{tags.group(3)}"


def _image_marker_environment(python: str, extra: str = "") -> dict[str, str]:
    """PEP 508 marker values of the image: CPython `python` on Linux x86_64."""
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": f"{python}.0",
        "python_version": python,
        "sys_platform": "linux",
        "extra": extra,
    }


def _project_dependencies() -> list[str]:
    """[project] dependencies of pyproject.toml (read by pattern: tomllib is Python >= 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    assert block, "pyproject.toml: no [project] dependencies"
    return re.findall(r'^\s*"([^"]+)"', block.group(1), re.MULTILINE)


def test_image_constraints_pin_every_dependency_inside_pyprojects_ranges():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _pins()
    python, _ = _base_image_tags()
    header = CONSTRAINTS.read_text().split("\n\n")[0]
    assert f"Python {python}," in header, f"constraints.txt was not made for the base image's Python {python}"
    dependencies = _project_dependencies()
    assert any(d.startswith("torch") for d in dependencies), f"pyproject.toml dependencies: {dependencies}"
    for text in dependencies:
        req = Requirement(text)
        name = _canonical(req.name)
        assert name in pins, f"constraints.txt does not pin {name} (pyproject.toml: {text})"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {text}"
        )
    assert pins["ray"] == _dockerfile_ray_version(), (
        f"constraints.txt pins ray=={pins['ray']}, but the base image has Ray {_dockerfile_ray_version()}"
    )


def _recorded_requirements() -> dict[str, list[str]]:
    """{pinned name: the requirements its `# requires:` line records} of deploy/constraints.txt."""
    recorded: dict[str, list[str]] = {}
    name = None
    for line in CONSTRAINTS.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            name = _canonical(match.group("name"))
            recorded[name] = []
        elif line.strip().startswith("# requires:"):
            assert name, "constraints.txt: a `# requires:` line before any pin"
            recorded[name] = line.split(":", 1)[1].strip().split(", ")
    return recorded


def test_image_constraints_pin_what_each_pinned_package_requires():
    """Closure: what each pinned version requires in the image (recorded under its pin by
    make_constraints.py from the index's metadata) is pinned, inside its range."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _pins()
    recorded = _recorded_requirements()
    assert set(recorded) == set(pins)
    for name, requirements in recorded.items():
        for text in requirements:
            req = Requirement(text)
            needed = _canonical(req.name)
            assert needed in pins, f"{name}=={pins[name]} requires {text}, which constraints.txt does not pin"
            assert req.specifier.contains(Version(pins[needed]), prereleases=True), (
                f"{name}=={pins[name]} requires {text}, but constraints.txt pins {needed}=={pins[needed]}"
            )
    assert recorded["torch"] and recorded["ray"], "constraints.txt records nothing torch and ray require"
    # A version changed by hand keeps the requirements of the old one: only where the metadata
    # of this very version is at hand (installed here) can that be caught, so check it there.
    from importlib import metadata

    for name, version in pins.items():
        try:
            here = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(here.version) == Version(version):
            assert {_canonical(Requirement(r).name) for r in recorded[name]} <= {
                _canonical(Requirement(r).name) for r in here.requires or []
            }, f"constraints.txt: what {name}=={version} requires is not what its metadata says; regenerate"


def test_image_torch_is_the_cuda_build_of_the_base_images_cuda():
    pins = _pins()
    _, cuda = _base_image_tags()
    major = cuda.split(".")[0]
    torch_local = pins["torch"].partition("+")[2]
    # PyPI's Linux torch carries no local tag and names its CUDA in its dependencies; a wheel
    # from download.pytorch.org says it in the tag (+cu130). Either way it must not be +cpu.
    assert torch_local in {"", f"cu{cuda.replace('.', '')}"}, (
        f"constraints.txt pins torch=={pins['torch']}, not a CUDA {cuda} build"
    )
    runtime = (
        pins.get("cuda-toolkit")
        or pins.get("nvidia-cuda-runtime")
        or pins.get(f"nvidia-cuda-runtime-cu{major}")
    )
    assert runtime, "constraints.txt pins no CUDA runtime, so torch would be a CPU build or unpinned"
    assert runtime.split(".")[:2] == cuda.split("."), (
        f"the pinned CUDA runtime is {runtime}, but the base image is CUDA {cuda}"
    )
    for name in pins:
        suffix = re.fullmatch(r"nvidia-.+-cu(\d+)", name)
        assert not suffix or suffix.group(1) == major, f"constraints.txt pins {name} next to CUDA {cuda}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), [*text.split(None, 1), ""][1]) for text in logical]


def test_dockerfile_makes_its_workdir_as_its_user_and_installs_with_the_constraints():
    instructions = _dockerfile_instructions()
    user = None
    made: set[str] = set()  # directories a RUN made as the current user
    workdirs = 0
    for instruction, args in instructions:
        if instruction == "USER":
            user, made = args.split(":")[0], set()
        elif instruction == "RUN":
            for dirs in re.findall(r"\bmkdir\s+-p\s+((?:[^\s&;|]+\s*)+)", args):
                made |= {d.rstrip("/") for d in dirs.split() if d.startswith("/")}
        elif instruction == "WORKDIR":
            workdirs += 1
            directory = args.strip().rstrip("/")
            # Without BuildKit, WORKDIR makes a missing directory owned by root whatever USER says.
            assert user not in {None, "root", "0"} and directory in made, (
                f"WORKDIR {directory} is not made by `RUN mkdir -p {directory}` after `USER` (as {user}); "
                "only BuildKit would give it to the image's user"
            )
        elif instruction == "COPY":
            assert re.search(rf"--chown={re.escape(str(user))}\b", args), (
                f"COPY {args} does not --chown={user}"
            )
    assert workdirs, "deploy/Dockerfile has no WORKDIR"

    runs = [args for instruction, args in instructions if instruction == "RUN" and "pip install" in args]
    assert runs, "deploy/Dockerfile runs no pip install"
    for args in runs:
        assert re.search(r"(?:-c|--constraint)[ =](?:\./)?deploy/constraints\.txt\b", args), (
            f"`{args}` does not install with --constraint deploy/constraints.txt"
        )
    copied = [args for instruction, args in instructions if instruction == "COPY"]
    copy_at = next(i for i, (ins, a) in enumerate(instructions) if ins == "COPY" and "constraints.txt" in a)
    run_at = next(i for i, (ins, a) in enumerate(instructions) if ins == "RUN" and "pip install" in a)
    assert any("deploy/constraints.txt" in c for c in copied) and copy_at < run_at, (
        "deploy/constraints.txt is not copied into the image before pip install"
    )


# ----------------------------------------------------------------------------------------------
# The cluster launcher on AWS: a pinned AMI, and instance profiles made from deploy/iam/

IAM = DEPLOY / "iam"
AMI_ID = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
# AWS lets these actions name no resource narrower than "*".
UNSCOPED_ACTIONS = {"ec2:describeinstances", "ecr:getauthorizationtoken"}
# What Ray 2.60's AWS node provider (ray/autoscaler/_private/aws/node_provider.py) calls from
# the head: create_instances (RunInstances, with TagSpecifications), create_tags on running
# workers, terminate_instances / Instance.terminate, instances.filter (DescribeInstances).
# With cache_stopped_nodes it also stops and starts them.
HEAD_EC2_ACTIONS = {"ec2:runinstances", "ec2:createtags", "ec2:terminateinstances", "ec2:describeinstances"}
CACHED_NODE_ACTIONS = {"ec2:stopinstances", "ec2:startinstances"}
# Which documents each role has, as deploy/README.md's commands attach them.
ROLE_POLICIES = {
    "head": ["head-launch-workers.json", "ecr-pull.json", "s3-data.json"],
    "worker": ["ecr-pull.json", "s3-data.json"],
}


def _launcher() -> dict:
    configs = [d for p in YAML_FILES for d in _documents(p) if _is_launcher_config(d)]
    assert len(configs) == 1, "expected one Ray cluster launcher config under deploy/"
    return configs[0]


def _policy(name: str) -> dict:
    return json.loads((IAM / name).read_text())


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _statements(names: list[str]) -> list[dict]:
    return [s for name in names for s in _policy(name)["Statement"]]


def _string_matches(operator: str, value: str, wanted: str) -> bool:
    return fnmatch.fnmatchcase(value, wanted) if operator == "StringLike" else value == wanted


def _conditions_hold(condition: dict, context: dict[str, str]) -> bool:
    """StringEquals / StringLike against `context`; any other operator counts as not holding."""
    for operator, keys in condition.items():
        if operator not in {"StringEquals", "StringLike"}:
            return False
        for key, wanted in keys.items():
            value = context.get(key)
            if value is None or not any(_string_matches(operator, value, w) for w in _as_list(wanted)):
                return False
    return True


def _allows(names: list[str], action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """Whether the documents `names` allow `action` on `resource` (IAM wildcards) in `context`."""
    for s in _statements(names):
        if s.get("Effect") != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _as_list(s["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in _as_list(s["Resource"])):
            continue
        if _conditions_hold(s.get("Condition", {}), context or {}):
            return True
    return False


def _aws_names() -> dict[str, str]:
    """Account, region, cluster, AMI, worker type and profile names, as the launcher config says."""
    config = _launcher()
    for name, node_type in config["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], (
            f"node type {name} has no IamInstanceProfile: Ray would give the head ray-autoscaler-v1 "
            "(no ECR pull, no iam:PassRole) and the workers the head's role"
        )
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    workers = [t for k, t in config["available_node_types"].items() if k != config["head_node_type"]]
    assert len(workers) == 1, "the IAM documents are written for one worker node type"
    worker = workers[0]["node_config"]
    profile = re.fullmatch(
        r"arn:aws:iam::(\d{12}):instance-profile/([\w+=,.@-]+)", head["IamInstanceProfile"]["Arn"]
    )
    worker_profile = re.fullmatch(
        r"arn:aws:iam::(\d{12}):instance-profile/([\w+=,.@-]+)", worker["IamInstanceProfile"]["Arn"]
    )
    assert profile and worker_profile, "instance profiles are named by ARN"
    return {
        "account": profile.group(1),
        "region": config["provider"]["region"],
        "cluster": config["cluster_name"],
        "ami": worker["ImageId"],
        "worker_type": worker["InstanceType"],
        "head_profile": profile.group(2),
        "worker_profile": worker_profile.group(2),
        "worker_account": worker_profile.group(1),
    }


def test_iam_documents_parse_and_grant_nothing_by_wildcard():
    names = sorted(p.name for p in IAM.glob("*.json"))
    assert set(names) >= {"ec2-trust.json", *ROLE_POLICIES["head"]}, f"deploy/iam/ holds {names}"
    for name in names:
        doc = _policy(name)
        assert doc.get("Version") == "2012-10-17", f"iam/{name}: Version must be 2012-10-17"
        for s in doc["Statement"]:
            assert s.get("Effect") == "Allow", f"iam/{name}: {s.get('Sid')}: only Allow statements"
            assert not {"NotAction", "NotResource", "NotPrincipal"} & set(s), (
                f"iam/{name}: {s.get('Sid')}: Not*"
            )
            for action in _as_list(s["Action"]):
                assert "*" not in action and "?" not in action, f"iam/{name}: wildcard action {action}"
            if name == "ec2-trust.json":
                assert s["Principal"] == {"Service": "ec2.amazonaws.com"} and s["Action"] == "sts:AssumeRole"
                continue
            if "*" in _as_list(s["Resource"]):
                wide = {a.lower() for a in _as_list(s["Action"])} - UNSCOPED_ACTIONS
                assert not wide, f"iam/{name}: {sorted(wide)} on every resource; AWS can scope them"


def test_every_launcher_node_has_an_instance_profile_and_the_readme_makes_them():
    names = _aws_names()
    assert names["head_profile"] != names["worker_profile"], "the head and the workers need different roles"
    assert names["account"] == names["worker_account"]
    readme = (DEPLOY / "README.md").read_text()
    for command in (
        "create-role",
        "create-instance-profile",
        "add-role-to-instance-profile",
        "put-role-policy",
    ):
        assert f"aws iam {command}" in readme, f"deploy/README.md does not say `aws iam {command}`"
    for name in {"ec2-trust.json", *ROLE_POLICIES["head"]}:
        assert f"file://deploy/iam/{name}" in readme, f"deploy/README.md does not apply deploy/iam/{name}"
    for profile in (names["head_profile"], names["worker_profile"]):
        assert profile in readme, f"deploy/README.md does not make the instance profile {profile}"


def test_head_role_grants_exactly_the_ec2_calls_of_rays_aws_node_provider_on_this_cluster_only():
    n = _aws_names()
    config = _launcher()
    granted = {a.lower() for s in _statements(ROLE_POLICIES["head"]) for a in _as_list(s["Action"])}
    needed = HEAD_EC2_ACTIONS | (
        CACHED_NODE_ACTIONS if config["provider"].get("cache_stopped_nodes", True) else set()
    )
    assert {a for a in granted if a.startswith("ec2:")} == needed, (
        f"the head's EC2 actions are {sorted(a for a in granted if a.startswith('ec2:'))}, Ray's provider "
        f"calls {sorted(needed)}"
    )
    head = ROLE_POLICIES["head"]
    arn = f"arn:aws:ec2:{n['region']}:{n['account']}"
    instance = f"{arn}:instance/i-0123456789abcdef0"
    launch = {
        "aws:RequestTag/ray-cluster-name": n["cluster"],
        "aws:RequestTag/ray-node-type": "worker",
        "ec2:InstanceType": n["worker_type"],
    }
    assert _allows(head, "ec2:RunInstances", instance, launch), "the head cannot launch its workers"
    for key, other in [
        ("aws:RequestTag/ray-cluster-name", "someone-elses-cluster"),
        ("aws:RequestTag/ray-node-type", "head"),
        ("ec2:InstanceType", "p5.48xlarge"),
    ]:
        assert not _allows(head, "ec2:RunInstances", instance, launch | {key: other}), (
            f"the head may launch instances with {key}={other}"
        )
    for resource in [
        "subnet/subnet-0abc",
        "security-group/sg-0abc",
        "network-interface/eni-0abc",
        "volume/vol-0abc",
    ]:
        assert _allows(head, "ec2:RunInstances", f"{arn}:{resource}"), f"RunInstances is denied {resource}"
    assert _allows(head, "ec2:RunInstances", f"{arn}:key-pair/ray-autoscaler_{n['region']}")
    image = f"arn:aws:ec2:{n['region']}::image/"
    assert _allows(head, "ec2:RunInstances", image + n["ami"]), (
        f"the head may not launch the config's AMI {n['ami']}"
    )
    assert not _allows(head, "ec2:RunInstances", image + "ami-0123456789abcdef0"), (
        "the head may launch any AMI"
    )
    assert _allows(head, "ec2:CreateTags", instance, {"ec2:CreateAction": "RunInstances"})
    ours = {"ec2:ResourceTag/ray-cluster-name": n["cluster"], "ec2:ResourceTag/ray-node-type": "worker"}
    for action in ("ec2:CreateTags", "ec2:TerminateInstances"):
        assert _allows(head, action, instance, ours), f"the head cannot {action} its workers"
        assert not _allows(head, action, instance, ours | {"ec2:ResourceTag/ray-cluster-name": "other"}), (
            f"the head may {action} another cluster's instances"
        )
        assert not _allows(head, action, instance), f"the head may {action} untagged instances"
    assert not _allows(
        head, "ec2:TerminateInstances", instance, ours | {"ec2:ResourceTag/ray-node-type": "head"}
    )
    assert _allows(head, "ec2:DescribeInstances", "*")

    role = f"arn:aws:iam::{n['account']}:role/"
    to_ec2 = {"iam:PassedToService": "ec2.amazonaws.com"}
    assert _allows(head, "iam:PassRole", role + n["worker_profile"], to_ec2), (
        "the head may not pass the worker role, so it cannot launch workers with their profile"
    )
    for other in (n["head_profile"], "admin", "ray-autoscaler-v1"):
        assert not _allows(head, "iam:PassRole", role + other, to_ec2), f"the head may pass the role {other}"
    assert not _allows(
        head, "iam:PassRole", role + n["worker_profile"], {"iam:PassedToService": "lambda.amazonaws.com"}
    )
    worker_actions = {a.lower() for s in _statements(ROLE_POLICIES["worker"]) for a in _as_list(s["Action"])}
    assert not {a for a in worker_actions if a.startswith(("ec2:", "iam:"))}, (
        "the workers have EC2 or IAM rights"
    )


def test_every_node_may_pull_the_image_the_config_names_and_no_other():
    config = _launcher()
    image = config["docker"]["image"]
    match = re.fullmatch(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/([\w./-]+):[\w.-]+", image)
    assert match, f"docker.image {image} is not an ECR image"
    account, region, repository = match.groups()
    registry = image.split("/")[0]
    login = " ".join(config.get("initialization_commands", []))
    assert "ecr get-login-password" in login and registry in login, (
        "the nodes do not log in to the image's registry"
    )
    repo = f"arn:aws:ecr:{region}:{account}:repository/"
    for role, names in ROLE_POLICIES.items():
        assert _allows(names, "ecr:GetAuthorizationToken", "*"), f"the {role} cannot log in to ECR"
        for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"):
            assert _allows(names, action, repo + repository), f"the {role} cannot {action} {repository}"
            assert not _allows(names, action, repo + "something-else"), f"the {role} may pull any image"


def _deploy_spec_locations() -> list[tuple[str, str, str]]:
    """(source, "read" or "write", s3 URI) of every spec under deploy/ and README's --set lines."""
    found = []
    for path, tree in _all_trees():
        if isinstance(tree, dict) and {"checkpoints", "output"} <= set(tree):
            found.append((path.name, "read", tree["checkpoints"]["uri"]))
            data = tree.get("data") or {}
            found += [(path.name, "read", data[k]) for k in ("path", "uri") if k in data]
            found.append((path.name, "write", tree["output"]["uri"]))
    readme = (DEPLOY / "README.md").read_text()
    for field, uri in re.findall(r"--set (checkpoints\.uri|data\.path|data\.uri|output\.uri)=(\S+)", readme):
        found.append(("README.md", "write" if field == "output.uri" else "read", uri))
    return [(source, mode, uri) for source, mode, uri in found if str(uri).startswith("s3://")]


def test_s3_access_covers_every_location_the_deploy_specs_use_and_writes_only_outputs():
    locations = _deploy_spec_locations()
    assert {mode for _, mode, _ in locations} == {"read", "write"}, "no S3 spec under deploy/"
    names = ["s3-data.json"]  # both instance roles, and the IRSA roles on EKS
    for source, mode, uri in locations:
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        key = f"arn:aws:s3:::{bucket}/{prefix.rstrip('/')}/step=000000001000/model.safetensors"
        assert _allows(names, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), f"{source}: cannot list {bucket}"
        assert _allows(names, "s3:GetObject", key), f"{source}: {uri} is not readable"
        writes = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")
        if mode == "write":
            for action in writes:
                assert _allows(names, action, key), f"{source}: {uri} is an output, but {action} is denied"
        else:
            for action in writes:
                assert not _allows(names, action, key), (
                    f"{source}: {uri} is an input, but {action} is allowed"
                )
    assert not _allows(names, "s3:GetObject", "arn:aws:s3:::another-bucket/x"), (
        "s3-data.json reads any bucket"
    )


def test_launcher_ami_is_pinned_to_a_current_driver_and_the_same_on_every_node():
    config = _launcher()
    region = config["provider"]["region"]
    images = {name: t["node_config"].get("ImageId") for name, t in config["available_node_types"].items()}
    for name, image in images.items():
        assert image and AMI_ID.match(image), (
            f"node type {name}: ImageId {image!r} is not a pinned AMI id (`latest_dlami` is Ubuntu 18.04 in Ray 2.60)"
        )
    assert len(set(images.values())) == 1, f"the node types boot different AMIs: {images}"
    ami = next(iter(images.values()))
    path = next(p for p in YAML_FILES if any(_is_launcher_config(d) for d in _documents(p)))
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == f"ImageId: {ami}")
    comment = " ".join(
        line.strip().lstrip("#") for line in lines[max(0, at - 8) : at] if line.strip().startswith("#")
    )
    named = re.search(r"Deep Learning Base OSS Nvidia Driver GPU AMI \(Ubuntu (\d+)\.04\) (\d{8})", comment)
    assert named and int(named.group(1)) >= 22, (
        f"{path.name}: the comment above ImageId {ami} does not name the AMI (a Deep Learning Base OSS Nvidia "
        "Driver GPU AMI, Ubuntu 22.04 or later, and its date)"
    )
    assert region in comment, (
        f"{path.name}: the comment above ImageId does not say the AMI's region ({region})"
    )
    readme = (DEPLOY / "README.md").read_text()
    assert ami in readme and "base-oss-nvidia-driver-gpu-ubuntu" in readme, (
        "deploy/README.md does not say which AMI is pinned and how to look up the current one"
    )


# ----------------------------------------------------------------------------------------------
# Kubernetes identities


def _pod_specs() -> Iterator[tuple[Path, dict, dict]]:
    """(file, resource, pod spec) of every pod template under deploy/."""
    for path in YAML_FILES:
        for doc in _documents(path):
            for pod in _pod_templates(doc):
                yield path, doc, pod["spec"]


def test_the_watch_daemon_has_its_own_service_account_with_no_kubernetes_rights():
    accounts = {
        doc["metadata"]["name"]: doc
        for p in YAML_FILES
        for doc in _documents(p)
        if doc.get("kind") == "ServiceAccount"
    }
    bound = {
        subject.get("name")
        for p in YAML_FILES
        for doc in _documents(p)
        if doc.get("kind") in {"RoleBinding", "ClusterRoleBinding"}
        for subject in doc.get("subjects") or []
        if subject.get("kind") == "ServiceAccount"
    }
    ray_accounts = {
        group["template"]["spec"].get("serviceAccountName", "default")
        for p in YAML_FILES
        for doc in _documents(p)
        for cluster in _ray_cluster_specs(doc)
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    }
    daemons = 0
    for path, doc, spec in _pod_specs():
        commands = [[str(c) for c in c_.get("command", []) + c_.get("args", [])] for c_ in spec["containers"]]
        if not any(cmd[:2] == ["probeserve", "watch"] for cmd in commands):
            continue
        daemons += 1
        where = f"{path.name}: {doc['kind']} {doc['metadata']['name']}"
        account = spec.get("serviceAccountName", "default")
        assert account in accounts, f"{where}: its ServiceAccount {account} is not defined under deploy/"
        assert account not in ray_accounts, (
            f"{where}: shares the ServiceAccount {account} of the Ray pods, which KubeRay binds to the autoscaler's Role"
        )
        assert account not in bound, f"{where}: a RoleBinding under deploy/ gives {account} Kubernetes rights"
        mounted = spec.get(
            "automountServiceAccountToken", accounts[account].get("automountServiceAccountToken", True)
        )
        assert mounted is False, f"{where}: mounts a Kubernetes API token it never uses"
        assert accounts[account].get("automountServiceAccountToken") is False, (
            f"ServiceAccount {account}: automountServiceAccountToken should be false for every pod that uses it"
        )
    assert daemons >= 2, "expected the watch Deployment and CronJob under deploy/"


@pytest.mark.integration
def test_s3_policy_lets_probeserves_own_s3_calls_through_and_nothing_else(monkeypatch):
    """s3-data.json as the only policy of an IAM user on a real S3 server process (moto, with
    its IAM enforcement on): probeserve's storage reads inputs and reads, writes, creates and
    deletes outputs through it, and is refused writes to inputs and reads of other buckets."""
    import boto3
    from conftest import S3Server

    from probeserve.errors import StorageError
    from probeserve.storage import open_storage

    policy = _policy("s3-data.json")
    bucket = _as_list(policy["Statement"][0]["Resource"])[0].split(":::")[1]
    for key, value in {
        "AWS_ACCESS_KEY_ID": "setup",
        "AWS_SECRET_ACCESS_KEY": "setup",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    setup_requests = 6  # moto answers this many requests unchecked, then enforces IAM
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", str(setup_requests))
    server = S3Server()
    server.start()
    try:
        s3 = server.client()
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="run-1/checkpoints/step=000000000100/COMPLETE", Body=b"done")
        s3.create_bucket(Bucket="another-bucket")
        iam.create_user(UserName="probeserve-node")
        iam.put_user_policy(
            UserName="probeserve-node", PolicyName="s3-data", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="probeserve-node")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])

        inputs = open_storage(f"s3://{bucket}/run-1/checkpoints", s3_endpoint=server.endpoint)
        assert [o.key for o in inputs.list()] == ["step=000000000100/COMPLETE"]
        assert inputs.read_bytes("step=000000000100/COMPLETE") == b"done"
        assert inputs.stat("step=000000000100/COMPLETE") is not None
        with pytest.raises(StorageError, match="access denied"):
            inputs.publish_bytes("step=000000000200/COMPLETE", b"forged")

        outputs = open_storage(f"s3://{bucket}/probes/run-1", s3_endpoint=server.endpoint)
        outputs.publish_bytes("results/run-1/layer.parquet", b"row")
        assert outputs.create_only("ledger/run-1/claim-0000.json", b"{}")
        assert not outputs.create_only("ledger/run-1/claim-0000.json", b"{}")
        assert {o.key for o in outputs.list()} == {
            "results/run-1/layer.parquet",
            "ledger/run-1/claim-0000.json",
        }
        assert outputs.read_bytes("results/run-1/layer.parquet") == b"row"
        outputs.delete("results/run-1/layer.parquet")
        assert outputs.stat("results/run-1/layer.parquet") is None

        elsewhere = open_storage("s3://another-bucket/x", s3_endpoint=server.endpoint)
        with pytest.raises(StorageError, match="access denied"):
            list(elsewhere.list())
    finally:
        server.stop()
