"""Ray job entrypoint: run one sweep on the cluster this job was submitted to.

    ray job submit --working-dir . -- python jobs/sweep.py jobs/examples/gaussian-mlp.yaml

Inside a Ray job, `address="auto"` joins the job's cluster. Extra arguments are passed on to
`probeserve run` (for example `--set probe.l2=0.001`). Exit status: 0 all done, 1 some items
failed (their rows say why), 2 bad input.
"""

from __future__ import annotations

import sys

from probeserve.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print("usage: python jobs/sweep.py SPEC [probeserve run options]", file=sys.stderr)
        sys.exit(2)
    if "--address" not in args and "--runner" not in args:
        args += ["--address", "auto"]
    sys.exit(main(["run", *args]))
