"""Ray job entrypoint: run one sweep on the cluster this job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/sweep.py jobs/examples/gaussian-mlp.yaml \\
        --set checkpoints.uri=$PWD/ckpts/gaussian-mlp --set output.uri=$PWD/probes/gaussian-mlp

The same as `python -m probeserve.job` (probeserve/job.py, which says what it does), as a file
to copy beside your own specs; it needs probeserve installed where the job runs.
"""

from __future__ import annotations

import sys

from probeserve.job import main

if __name__ == "__main__":
    sys.exit(main(usage="usage: python jobs/sweep.py SPEC [probeserve run options]"))
