"""What several test files share: a real S3 server process (moto) on loopback, tiny sweep
specs, checkpoints of the tiny model, and a user's folder with a model beside its spec.

conftest.py makes fixtures of the server; test files import the rest from here (pytest puts
this folder on the import path).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

PROBESERVE = os.path.join(os.path.dirname(sys.executable), "probeserve")  # the installed script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A moto S3 server subprocess; `stop()`/`start()` simulate an outage on the same port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def tiny_spec(root, **over):
    """A spec of the `tiny` model on the Gaussian problem: four layers, seconds to run."""
    from probeserve.spec import spec_from_dict

    spec = {
        "run": "t",
        "checkpoints": {"uri": str(root / "ckpts")},
        "model": {"factory": "tiny", "kwargs": {"input_dim": 6, "hidden": 12, "num_classes": 2}},
        "layers": {"include": ["input", "fc1", "act", "fc2"]},
        "data": {"kind": "gaussian", "dim": 6, "train_size": 600, "val_size": 200, "test_size": 200},
        "probe": {"max_epochs": 50, "l2": 1e-3},
        "resources": {"device": "cpu"},
        "output": {"uri": str(root / "out")},
    }
    for k, v in over.items():
        spec[k] = v
    return spec_from_dict(spec)


def s3_tiny_spec(tmp_path, bucket, **over):
    """`tiny_spec` with checkpoints and output in an S3 bucket, two layers."""
    fields = {
        "checkpoints": {"uri": f"s3://{bucket}/ckpts"},
        "output": {"uri": f"s3://{bucket}/probes"},
        "layers": {"include": ["input", "fc2"]},
    }
    return tiny_spec(tmp_path, **{**fields, **over})


def write_checkpoints(spec, steps=(0, 10)):
    """Checkpoints of the spec's model at `steps`, each a little further from the seed's weights."""
    import torch

    from probeserve.checkpoints import save_checkpoint
    from probeserve.models import build_model
    from probeserve.spec import ModelSpec

    torch.manual_seed(1)
    model = build_model(ModelSpec(**spec.model.model_dump()))
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * s)
        save_checkpoint(model, spec.checkpoints.uri, s)


def write_spec(tmp_path, spec) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec))
    return str(path)


ACME_ZOO = '''
"""A user's model, kept in the folder they run probeserve from."""
from torch import nn


class Zoo(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.input_shape = (6,)
        self.fc1 = nn.Linear(6, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def build(hidden=12):
    return Zoo(hidden)
'''


def acme_folder(root, steps=(0,)):
    """A folder as a user keeps it: `acme_nets/zoo.py`, a spec that names it with relative
    paths only, and checkpoints of that model (`tiny` has the same weights)."""
    (root / "acme_nets").mkdir(parents=True)
    (root / "acme_nets" / "__init__.py").write_text("")
    (root / "acme_nets" / "zoo.py").write_text(ACME_ZOO)
    spec = {
        "run": "acme",
        "checkpoints": {"uri": "ckpts"},
        "model": {"factory": "acme_nets.zoo:build", "kwargs": {"hidden": 12}},
        "layers": {"include": ["input", "fc2"]},
        "data": {"kind": "gaussian", "dim": 6, "train_size": 600, "val_size": 200, "test_size": 200},
        "probe": {"max_epochs": 50, "l2": 1e-3},
        "resources": {"device": "cpu", "torch_threads": 1},
        "output": {"uri": "out"},
    }
    (root / "spec.json").write_text(json.dumps(spec))
    write_checkpoints(tiny_spec(root), steps=steps)
    return root
