"""Checkpoint variants for the Llama-family fixtures (scripts/fixtures_llama.py): transformers
4.x's config layout, a sharded copy, a bf16 copy, and fixture files with a stable byte layout."""

import json
import os
import shutil
import struct
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def load(path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    return model.eval()


def save_fixture(tensors, path, metadata):
    """save_file, then the metadata keys sorted: safetensors writes them in a hash map's order,
    which changes from run to run, and the file should not."""
    save_file(tensors, path, metadata=metadata)
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def write_4x_config(out):
    """config.4x.json: config.json in transformers 4.x's layout. rope_parameters becomes a
    top-level rope_theta and a rope_scaling (null for the default RoPE, else the other keys of
    rope_parameters with rope_type), dtype becomes torch_dtype; everything else is unchanged."""
    cfg = json.load(open(os.path.join(out, "config.json")))
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    with open(os.path.join(out, "config.4x.json"), "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check_layouts(out, want_logits, tokens):
    """Both config layouts load in transformers to the same RoPE frequencies and bit-identical
    logits as the fixture's."""
    for cfg_name in ("config.json", "config.4x.json"):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(os.path.join(out, cfg_name), os.path.join(tmp, "config.json"))
            weights = "model.safetensors"
            os.symlink(os.path.join(out, weights), os.path.join(tmp, weights))
            model = load(tmp)
            with torch.no_grad():
                logits = model(tokens).logits
        assert torch.equal(logits, want_logits), f"{out}/{cfg_name}: logits differ"
        print(f"  {cfg_name}: rope {model.config.rope_parameters}, same logits")


def sharded_copy(src, out, shard_size="100KB"):
    """src's weights as a sharded checkpoint in out (model.safetensors.index.json and shards)."""
    shutil.rmtree(out, ignore_errors=True)
    model = load(src)
    model.save_pretrained(out, max_shard_size=shard_size)
    write_4x_config(out)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2, shards
    merged = {}
    for s in shards:
        merged.update(load_file(os.path.join(out, s)))
    want = load_file(os.path.join(src, "model.safetensors"))
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    check_same_logits(out, src)
    name, src_name = os.path.basename(out), os.path.basename(src)
    print(f"{name}: {len(shards)} shards, the same tensors and logits as {src_name}")


def check_same_logits(a, b):
    ids = torch.arange(0, 40).reshape(2, 20) % 50
    with torch.no_grad():
        assert torch.equal(load(a)(ids).logits, load(b)(ids).logits), (a, b)
