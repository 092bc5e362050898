"""Start-up of the local Ray probeserve starts, and what making the working folder importable costs.

`probeserve run` (no --address) starts a local Ray whose workers must import a model package
kept in the working folder (`model.factory: acme_nets.zoo:build`). Each round starts a fresh
process in a folder holding such a module, starts Ray, and runs 4 tasks that import it, for
three ways of starting Ray:

- bare: `ray.init(address="local")`, nothing passed on (Ray puts the driver's working folder
  on its workers' path itself)
- probeserve: `runners.ray.connect(None)`, what `probeserve run` does
- runtime_env: `ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": folder}})`

It prints the median seconds to `ray.init` and from there to the 4 tasks' answers, and each
way's ratio to bare.

    python jobs/benchmarks/bench_ray_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, logging, os, sys, time
import ray
mode = sys.argv[1]
if mode == "probeserve":
    from probeserve.runners.ray import connect  # imports torch: not part of the start-up measured
t0 = time.perf_counter()
if mode == "probeserve":
    connect(None)
else:
    kwargs = {"address": "local", "include_dashboard": False, "logging_level": logging.WARNING}
    if mode == "runtime_env":
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.getcwd()}}
    ray.init(**kwargs)
t1 = time.perf_counter()

@ray.remote(num_cpus=0.5)
def use_it():
    try:
        import acme_bench_module
        return acme_bench_module.ANSWER
    except ImportError:
        return None

answers = ray.get([use_it.remote() for _ in range(4)])
t2 = time.perf_counter()
print(json.dumps({"init": t1 - t0, "tasks": t2 - t1, "imported": all(a == 42 for a in answers)}))
ray.shutdown()
"""

MODES = ("bare", "probeserve", "runtime_env")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    times: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-ray-start-") as folder:
        with open(os.path.join(folder, "acme_bench_module.py"), "w") as f:
            f.write("ANSWER = 42\n")
        for _ in range(args.rounds):
            for mode in MODES:  # interleaved, so that load on the machine hits every way alike
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, mode],
                    cwd=folder,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
                times[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = {k: statistics.median(t[k] for t in times["bare"]) for k in ("init", "tasks")}
    print(
        f"{'way':12s} {'ray.init s':>10s} {'4 tasks s':>10s} {'total/bare':>10s}  workers import the module"
    )
    for mode in MODES:
        med = {k: statistics.median(t[k] for t in times[mode]) for k in ("init", "tasks")}
        ratio = (med["init"] + med["tasks"]) / (base["init"] + base["tasks"])
        imported = sum(t["imported"] for t in times[mode])
        print(
            f"{mode:12s} {med['init']:10.2f} {med['tasks']:10.2f} {ratio:9.2f}x  "
            f"{imported}/{len(times[mode])} rounds"
        )


if __name__ == "__main__":
    main()
