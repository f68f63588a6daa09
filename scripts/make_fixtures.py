#!/usr/bin/env python3
"""Generates the PyTorch / transformers fixtures under assets/ that the parity tests compare
shaderformer against (the method of llm.c's test_gpt2).

Needs torch, transformers and tokenizers (CPU wheels suffice), in a virtual environment outside
the repository:

    python3 -m venv ~/fixenv && ~/fixenv/bin/pip install torch transformers tokenizers safetensors
    ~/fixenv/bin/python scripts/make_fixtures.py

Outputs (small, committed):
    assets/gpt2-tiny/            a random GPT2LMHeadModel of awkward size, saved with save_pretrained
    assets/gpt2-tiny/fixture.safetensors
        tokens, targets (B, T) int32; logits (B, T, V); loss (1); grad.<name> for every parameter
        (Hugging Face layout); losses (STEPS) and grad_norms (STEPS) of AdamW steps with clipping
        and weight decay on the same batch. Hyperparameters are in the file's metadata.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets")

# Awkward on purpose: n_embd not a multiple of 64, 3 heads, vocabulary between 65 and 100,
# T between 30 and 60.
TINY = dict(vocab_size=77, n_positions=64, n_embd=48, n_layer=2, n_head=3)
B, T = 2, 37
STEPS = 10
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)


def tiny_gpt2():
    out = os.path.join(ROOT, "gpt2-tiny")
    torch.manual_seed(42)
    config = GPT2Config(
        **TINY,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
    )
    model = GPT2LMHeadModel(config)
    # Random biases and LayerNorm affine parameters too, so every gradient is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    targets = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)

    model.train()
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    loss.backward()
    tensors = {
        "tokens": tokens.to(torch.int32),
        "targets": targets.to(torch.int32),
        "logits": logits.detach().contiguous(),
        "loss": loss.detach().reshape(1),
    }
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.detach().clone().contiguous()

    # nanoGPT's optimizer: 2-D tensors decay, the rest does not.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": HYPER["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        foreach=False,
    )
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1)
        )
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["grad_clip"])
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    meta = {k: json.dumps(v) for k, v in HYPER.items()}
    meta.update(B=str(B), T=str(T), steps=str(STEPS))
    save_file(tensors, os.path.join(out, "fixture.safetensors"), metadata=meta)
    print(f"gpt2-tiny: loss {tensors['loss'].item():.6f}, {STEPS} losses {losses}")
    print(f"           grad norms {norms}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tiny_gpt2()
    sys.exit(0)
