"""The key layout of an output is defined in one place: what probeserve writes is what
probeserve/layout.py says, and its parsers read back what its builders make."""

from __future__ import annotations

from helpers import tiny_spec, write_checkpoints

from probeserve import layout
from probeserve.runners.local import run_local
from probeserve.storage import LocalStorage

KEY = "run-3/step_000000400.safetensors"


def test_builders_and_parsers_agree():
    ckpt = layout.checkpoint_dir(KEY, 400)
    assert ckpt.startswith("step-000000000400-") and "=" not in ckpt
    assert layout.from_v1_dir(layout.v1_checkpoint_dir(KEY, 400)) == ckpt
    assert layout.from_v1_dir(ckpt) is None
    layer = "blocks.0/attn:in"  # a slash and a colon: made path-safe, and back
    key = layout.result_key("r", KEY, 400, layer)
    assert key.count("/") == 3 and layout.parse_result_key(key) == ("r", ckpt, layer)
    assert key.startswith(layout.results_prefix("r", KEY, 400)) and key.startswith(layout.results_prefix("r"))
    prefix = layout.layer_prefix("r", KEY, 400, layer)
    assert layout.manifest_key("r", KEY, 400, layer) == prefix + "/manifest.json"
    assert layout.layer_prefix_of(prefix + "/train/part-00000.parquet") == prefix
    assert layout.is_shard_part("train/part-00000.parquet") and not layout.is_shard_part("train/notes.txt")
    claim = layout.claim_key("r", ckpt, 3)
    assert layout.parse_ledger_key(claim) == ("r", ckpt, "claim", 3)
    assert layout.parse_ledger_key(layout.state_key("r", ckpt, 12)) == ("r", ckpt, "state", 12)
    assert layout.parse_ledger_key(layout.ledger_key("r", ckpt, "notes.json")) is None
    running = layout.running_key("r", KEY, 400, layer)
    assert running.startswith(layout.running_prefix("r")) and layout.checkpoint_dir_of(running) == ckpt
    old = layout.v1_checkpoint_dir(KEY, 400)
    moved = layout.with_checkpoint_dir(layout.result_key("r", KEY, 400, layer).replace(ckpt, old), ckpt)
    assert moved == key
    assert layout.recorded_run(layout.run_key("r", "spec.json")) == "r"
    assert layout.recorded_run(layout.run_key("r", "spec.yaml")) is None
    assert layout.output_root("s3://b/probes/results/") == "s3://b/probes"


def test_every_key_a_run_writes_is_one_the_layout_defines(tmp_path):
    spec = tiny_spec(
        tmp_path, layers={"include": ["input", "fc2"]}, resources={"device": "cpu", "probes_per_call": 2}
    )
    write_checkpoints(spec, steps=(0, 10))
    assert run_local(spec).ok == 4
    out = LocalStorage(spec.output.uri)
    keys = sorted(o.key for o in out.list(""))
    assert keys, "the run wrote nothing"
    ckpts = [("step=000000000/model.safetensors", 0), ("step=000000010/model.safetensors", 10)]
    made = {layout.LAYOUT_KEY}
    made |= {layout.run_key("t", n) for n in ("spec.json", "spec.yaml", "layers.json")}
    for c, s in ckpts:
        for layer in ("input", "fc2"):
            made.add(layout.result_key("t", c, s, layer))
            made.add(layout.manifest_key("t", c, s, layer))
    unknown = [
        k
        for k in keys
        if k not in made
        and not (
            (prefix := layout.layer_prefix_of(k)) is not None
            and layout.is_shard_part(k[len(prefix) + 1 :])
            and prefix + "/manifest.json" in keys
        )
    ]
    assert unknown == [], "keys no function of probeserve/layout.py makes"
    assert made <= set(keys)
    assert list(out.list(layout.running_prefix("t"))) == []  # the running markers went
