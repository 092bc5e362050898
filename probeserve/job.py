"""The Ray job entrypoint: run one sweep on the cluster this job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m probeserve.job jobs/examples/gaussian-mlp.yaml \\
        --set checkpoints.uri=$PWD/ckpts/gaussian-mlp --set output.uri=$PWD/probes/gaussian-mlp

It ships inside the package, so that every installed probeserve has it (`probeserve watch
--address` submits its jobs with it); `jobs/sweep.py` is the same entrypoint as a file, for
users who copy it. Inside a Ray job, `address="auto"` joins the job's cluster. Extra
arguments are passed on to `probeserve run` (for example `--set probe.l2=0.001`). Exit
status: 0 all done, 1 some items failed (their rows say why), 2 bad input.

A job submitted with `--working-dir` runs in Ray's temporary copy of that folder (under Ray's
session folder), so a relative local path in the spec would resolve there: results written
there vanish with the copy, and checkpoints or data read from there are a snapshot at best.
Such a path is refused, with one line that says what to use instead; the job cannot know
which folder the path was relative to when it was submitted.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

USAGE = "usage: python -m probeserve.job SPEC [probeserve run options]"


def in_ray_working_dir_copy() -> bool:
    """Whether this is the driver of a Ray job that runs in Ray's copy of its working folder.

    Ray's job supervisor hands the job's runtime_env to its driver in this variable."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return bool(runtime_env.get("working_dir"))


def relative_path_error(argv: Sequence[str]) -> str | None:
    """One line naming the first relative local path of the spec, or None."""
    from probeserve.cli import build_parser
    from probeserve.errors import ProbeserveError
    from probeserve.spec import load_spec
    from probeserve.watch import is_relative_local, local_path_fields

    args = build_parser().parse_args(["run", *argv])
    try:
        spec = load_spec(args.spec, overrides=args.set or [])
    except ProbeserveError:
        return None  # `probeserve run` reports it, in its own words
    for field_path, section, name in local_path_fields(spec.model_dump(mode="json")):
        value = section[name]
        if is_relative_local(value):
            return (
                f"error: {field_path}: {value!r} is a relative path, and this Ray job runs in Ray's temporary "
                f"copy of the working folder ({os.getcwd()}), where it would vanish; give an absolute path "
                f"(--set {field_path}=$PWD/{value} on the ray job submit line) or s3://bucket/prefix"
            )
    return None


def main(argv: Sequence[str] | None = None, *, usage: str = USAGE) -> int:
    """`probeserve run SPEC ... --address auto` (unless an address or runner is given), after
    refusing the relative paths a Ray job cannot use."""
    from probeserve.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    if in_ray_working_dir_copy():
        error = relative_path_error(args)
        if error:
            print(error, file=sys.stderr)
            return 2
    if "--address" not in args and "--runner" not in args:
        args += ["--address", "auto"]
    return cli_main(["run", *args])


if __name__ == "__main__":
    sys.exit(main())
