#!/usr/bin/env python3
"""Mean cross-entropy of a text under a base checkpoint with a peft adapter, and under a merged
checkpoint, windowed as `shaderformer score --block-size T` windows it (T+1 tokens from 0, T,
2T, ...; the last shorter), for comparison with `shaderformer score --lora`:

    python3 scripts/peft_score.py BASE ADAPTER MERGED TEXT T

Needs torch, transformers and peft (CPU wheels suffice), as scripts/fixtures_lora.py.
"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base, adapter, merged, data, T = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
tok = AutoTokenizer.from_pretrained(base)
ids = tok(open(data).read())["input_ids"]

def score(model):
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, T):
            w = torch.tensor(ids[s : s + T + 1])[None]
            if w.shape[1] < 2:
                break
            logits = model(w[:, :-1]).logits[0].double()
            total += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    return total / n, n

m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
print("peft", *score(PeftModel.from_pretrained(m, adapter).eval()))
print("merged", *score(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()))
