"""The docs as a user meets them: every example runs as printed, and every command has help.

The fenced `sh` and `python` examples of README.md and docs/results.md are run, in order, in a
folder that stands in for a fresh clone (the repo's `jobs/` and its virtual env as `.venv`),
after the quick demo, in a shell where `source .venv/bin/activate` ran, as the README says.
A doc example that breaks fails here. The lines that are not run, and why, are in `NOT_RUN`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

from probeserve import __version__
from probeserve.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/results.md")
FENCE = re.compile(r"^```([A-Za-z]*)\n(.*?)^```", re.M | re.S)
# Lines of `sh` examples that are not run here, with the reason.
NOT_RUN = {
    "make demo": "the fixture runs what it runs (`probeserve demo --out demo-output`), quick",
    "make test": "this suite is what it runs",
}


def examples(doc: str) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced `sh` or `python` block of a doc."""
    text = open(os.path.join(REPO, doc), encoding="utf-8").read()
    found = []
    for m in FENCE.finditer(text):
        if m.group(1) in ("sh", "python"):
            found.append((m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1))
    return found


def shell_lines(code: str) -> list[str]:
    """The commands of an `sh` block, without the ones in NOT_RUN."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():  # a trailing backslash continues the line
        words = shlex.split(line, comments=True)
        if words and " ".join(words[:2]) not in NOT_RUN:
            out.append(line)
    return out


def test_the_docs_have_examples_and_every_probeserve_line_parses():
    """Fast: every `probeserve ...` line of an sh example is a valid command line."""
    parser = build_parser()
    commands = 0
    for doc in DOCS:
        found = examples(doc)
        assert {lang for lang, _, _ in found} == {"sh", "python"}, doc
        for lang, code, line in found:
            if lang != "sh":
                compile(code, f"{doc}:{line}", "exec")
                continue
            for cmd in shell_lines(code):
                words = shlex.split(cmd, comments=True)
                if words[0] != "probeserve":
                    continue
                commands += 1
                try:
                    parser.parse_args(words[1:])
                except SystemExit:
                    pytest.fail(f"{doc}:{line}: {cmd!r} does not parse")
    assert commands >= 20
    assert shell_lines("make demo  # x\nsource .venv/bin/activate\nmake test\n") == [
        "source .venv/bin/activate"
    ]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_has_a_whole_description_and_shows_its_defaults():
    parser = build_parser()
    subs = _subcommands(parser)
    assert set(subs) >= {
        "validate",
        "layers",
        "plan",
        "run",
        "status",
        "query",
        "plot",
        "report",
        "watch",
        "demo",
    }
    listing = parser.format_help()
    for name, sub in subs.items():
        assert sub.description and sub.description.endswith("."), f"{name}: no whole description"
        assert len(sub.description) > 60, name
        assert re.search(rf"^\s+{name}\s+\S", listing, re.M), (
            f"{name} has no help line in `probeserve --help`"
        )
        for action in sub._actions:
            default = action.default
            if not action.option_strings or default in (None, False, argparse.SUPPRESS):
                continue
            flag = f"{name} {action.option_strings[0]}"
            assert action.help and "%(default)" in action.help, f"{flag}: its default is not in its help"
            shown = "".join(sub.format_help().split())  # argparse wraps lines, also at hyphens
            value = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"(default:{value})" in shown, flag


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"probeserve {__version__}"


def test_train_mlp_has_help_and_prints_its_loss(tmp_path):
    script = os.path.join(REPO, "jobs", "train_mlp.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    for flag in ("--out", "--steps", "--every", "--dim", "--depth", "--width"):
        line = next(ln for ln in shown.stdout.splitlines() if ln.strip().startswith(flag))
        assert len(line.split()) > 2 or flag == "--out", f"{flag} has no help"
    assert (
        "(default: 200)" in shown.stdout and "probeserve run jobs/examples/gaussian-mlp.yaml" in shown.stdout
    )
    ran = subprocess.run(
        [sys.executable, script, "--out", str(tmp_path / "ck"), "--steps", "6", "--every", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("step 0: initial weights; wrote ")
    loss = re.match(r"step 3: train loss (\d+\.\d+) \(mean of the last 3 steps\); wrote ", lines[1])
    assert loss and 0 < float(loss.group(1)) < 5
    assert sorted(os.listdir(tmp_path / "ck")) == ["step=000000000", "step=000000003", "step=000000006"]


# ---- running the examples ----


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder like a fresh clone after `make demo`: jobs/, .venv and the quick demo's output."""
    if not os.path.exists(os.path.join(sys.prefix, "bin", "activate")):
        pytest.skip(f"not run from a virtual env ({sys.prefix} has no bin/activate)")
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(os.path.join(REPO, "jobs"), root / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink(sys.prefix, root / ".venv")
    # A Ray temp folder of its own, so that `probeserve run` starts a fresh local Ray and can
    # never find (and join) another Ray on this machine; short, for Ray's socket paths.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(RAY_TMPDIR=ray_tmp, MPLBACKEND="Agg")
    demo = _shell(root, env, "probeserve demo --quick --out demo-output --runner local")
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "What the table shows:" in demo.stdout
    yield root, env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _shell(root, env, script: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `script` in bash in `root`, after `source .venv/bin/activate`, as the README says."""
    return subprocess.run(
        ["bash", "-c", "set -eo pipefail\nsource .venv/bin/activate\n" + script],
        cwd=root,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=900,
    )


# The README's Ray job block is not run here: its `ray start --head` takes the machine's
# default ports (and joined another user's head on them) and its `ray stop` stops every Ray
# on the machine, other users' too. tests/test_ray.py::test_the_readme_ray_job_lines_work_as_written
# runs its lines against a head of its own.
RAY_JOB_BLOCK = "ray job submit"


def _run_examples(clone, doc: str) -> None:
    root, env = clone
    for lang, code, line in examples(doc):
        if lang == "sh" and RAY_JOB_BLOCK in code:
            continue
        if lang == "sh":
            lines = shell_lines(code)
            if not lines:
                continue
            done = _shell(root, env, "\n".join(lines))
        else:
            done = _shell(root, env, "python -", stdin=code)
        assert done.returncode == 0, (
            f"{doc}:{line}: the {lang} example fails (exit {done.returncode}):\n{code}\n"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )


@pytest.mark.integration
def test_readme_examples_run_as_printed(clone):
    _run_examples(clone, "README.md")
    root, _ = clone
    assert os.path.getsize(root / "heatmap.png") > 10_000 and os.path.getsize(root / "report.html") > 10_000
    assert os.path.exists(root / "ckpts" / "my-run" / "step=000001000" / "COMPLETE")


@pytest.mark.integration
def test_results_doc_examples_run_as_printed(clone):
    _run_examples(clone, "docs/results.md")
    root, _ = clone
    for name in ("layers.png", "heatmap.png", "steps.png", "ripple.gif", "report.html", "demo.html"):
        assert os.path.getsize(root / name) > 5_000, name
