"""Write deploy/constraints.txt: every package the image's `pip install .` adds, pinned.

    python deploy/make_constraints.py [--dev-python .venv/bin/python] [--pip PIP]

pyproject.toml asks for ranges (`torch>=2.10,<3`), so an image built from it alone gets
whatever matches on the day of the build. This script asks pip's own resolver for the
environment the image would get, for the base image's Python on Linux x86_64, holding every
package the development virtual env has at the version it has there (`pip freeze`, with the
CPU wheel's local tag dropped: `torch==2.13.0+cpu` becomes `torch==2.13.0`, PyPI's Linux wheel,
which is a CUDA build). What the development env does not have (the CUDA libraries that
PyPI's torch depends on, triton) is taken at the version pip resolves. The result is a full
pin of the image's added packages; tests/test_deploy.py checks it against pyproject.toml and
the base image.

The resolver runs as `pip install --dry-run --report`, which reads wheel metadata from the index
and downloads no wheels with a pip that uses PEP 658 metadata (pip >= 23.3); `--pip` names such
a pip if the development env's is older, for example one in a throwaway virtual env:

    python -m venv /tmp/lockpip && /tmp/lockpip/bin/pip install -U pip
    python deploy/make_constraints.py --pip /tmp/lockpip/bin/pip
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
OUT = ROOT / "deploy" / "constraints.txt"
# The base image is Ubuntu (glibc 2.35); manylinux_2_X wheels for any X up to that install.
GLIBC_MINOR = 35


def base_image() -> tuple[str, str, str]:
    """(image, python version "3.11", CUDA tag "cu130") of deploy/Dockerfile's ARG RAY_IMAGE."""
    match = re.search(r"^ARG\s+RAY_IMAGE=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    if not match:
        sys.exit("deploy/Dockerfile has no ARG RAY_IMAGE=...")
    image = match.group(1)
    tags = re.search(r"-py3(\d+)-(cu\d+)$", image)
    if not tags:
        sys.exit(f"deploy/Dockerfile: base image {image} does not end in -py3XX-cuXYZ")
    return image, f"3.{tags.group(1)}", tags.group(2)


def project_dependencies() -> list[str]:
    """[project] dependencies of pyproject.toml (read by pattern: tomllib is Python >= 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    if not block:
        sys.exit("pyproject.toml: no [project] dependencies")
    return re.findall(r'^\s*"([^"]+)"', block.group(1), re.MULTILINE)


def dev_pins(dev_python: str) -> list[str]:
    """The development env's packages as `name==version`, without editables and local tags."""
    frozen = subprocess.run(
        [dev_python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    pins = []
    for line in frozen.splitlines():
        name, sep, version = line.partition("==")
        if sep and not name.startswith("probeserve"):
            pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_in_image(
    installed: list[dict], requirements: list[str], python: str
) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [requirements that apply in the image])} of pip's report: markers
    evaluated for CPython `python` on Linux x86_64, with the extras that something asks for."""
    from packaging.requirements import Requirement

    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux"}
    environment |= {"platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
    environment |= {"implementation_name": "cpython", "platform_python_implementation": "CPython"}
    metadata = {canonical(i["metadata"]["name"]): i["metadata"] for i in installed}
    extras: dict[str, set[str]] = {name: {""} for name in metadata}
    for text in requirements:
        req = Requirement(text)
        extras[canonical(req.name)] |= req.extras
    needs: dict[str, tuple[str, list[str]]] = {}
    changed = True
    while changed:  # extras asked for by one package's requirements switch on more requirements
        changed = False
        for name, meta in metadata.items():
            applying = []
            for text in meta.get("requires_dist") or []:
                req = Requirement(text)
                if req.marker is None or any(
                    req.marker.evaluate(environment | {"extra": extra}) for extra in extras[name]
                ):
                    applying.append(text.split(";")[0].strip())
                    wanted = extras.setdefault(canonical(req.name), {""})
                    if not req.extras <= wanted:
                        wanted |= req.extras
                        changed = True
            needs[name] = (meta["version"], sorted(set(applying)))
    return needs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--pip", default=None, help="pip to resolve with (default: the dev env's)")
    parser.add_argument("--index-url", default="https://pypi.org/simple")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    image, python, cuda = base_image()
    requirements = project_dependencies()
    pip = [args.pip] if args.pip else [args.dev_python, "-m", "pip"]
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    with tempfile.TemporaryDirectory() as tmp:
        held = Path(tmp) / "dev.txt"
        held.write_text("\n".join(dev_pins(args.dev_python)) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--isolated", "--index-url", args.index_url, "--dry-run"]
        cmd += ["--ignore-installed", "--quiet", "--report", str(report), "--target", str(Path(tmp) / "t")]
        cmd += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
        cmd += ["--abi", f"cp{python.replace('.', '')}"]
        for platform in platforms:
            cmd += ["--platform", platform]
        subprocess.run([*cmd, "--constraint", str(held), *requirements], check=True)
        installed = json.loads(report.read_text())["install"]

    needs = requirements_in_image(installed, requirements, python)
    header = [
        "# The image's Python packages, pinned: deploy/Dockerfile installs probeserve with",
        "# `pip install --constraint deploy/constraints.txt .`. Made by deploy/make_constraints.py",
        f"# (pip's resolver for {image}: Python {python}, Linux x86_64, {cuda}) from the",
        "# development env's versions; regenerate rather than edit. Under each pin, what that",
        "# version requires in the image (from its metadata on the index); tests/test_deploy.py",
        "# checks that every one of those is pinned, inside its range.",
    ]
    lines = []
    for name in sorted(needs):
        version, required = needs[name]
        lines.append(f"{name}=={version}")
        if required:
            lines.append(f"    # requires: {', '.join(required)}")
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"{args.out}: {len(needs)} packages pinned for {image}")


if __name__ == "__main__":
    main()
