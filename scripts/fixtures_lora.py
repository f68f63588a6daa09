#!/usr/bin/env python3
"""LoRA fixtures made by PyTorch and peft, for the LoRA parity tests.

Needs torch, transformers and peft (CPU wheels suffice) in a virtual environment outside the
repository:

    python3 -m venv ~/fixenv && ~/fixenv/bin/pip install torch transformers peft safetensors
    ~/fixenv/bin/python scripts/fixtures_lora.py

For each base checkpoint (assets/gpt2-tiny, assets/llama-tiny), it writes a directory beside it:

    assets/<base>-lora/adapter_config.json, adapter_model.safetensors
        a peft adapter saved with save_pretrained: A as peft initializes it, B random and non-zero
        (so that every gradient is exercised), scale lora_alpha / r = 2, no dropout
    assets/<base>-lora/fixture.safetensors
        loss (1): the mean cross-entropy of the base fixture's tokens and targets with the adapter;
        grad.<key>: the gradient of every adapter tensor (peft's key, adapter name dropped);
        losses, grad_norms (STEPS): AdamW steps of the adapter alone on the same batch, with
        clipping over the adapter's gradients and weight decay on every adapter tensor (they are
        all matrices), hyperparameters as in make_fixtures.py (in the file's metadata);
        final.<key>: every adapter tensor after the STEPS steps.
"""

import json
import os

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from make_fixtures import HYPER, ROOT, STEPS

R, ALPHA = 4, 8

BASES = {
    "gpt2-tiny": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "llama-tiny": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        fan_in_fan_out=False,
    ),
}


def make(base_name, seed):
    base_dir = os.path.join(ROOT, base_name)
    out = os.path.join(ROOT, base_name + "-lora")
    base_fx = load_file(os.path.join(base_dir, "fixture.safetensors"))
    tokens = base_fx["tokens"].long()
    targets = base_fx["targets"].long()

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **BASES[base_name],
    )
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    os.remove(os.path.join(out, "README.md"))  # peft's model card template
    # The base directory's own path, relative to the adapter: ours, not the hub id peft writes.
    cfg_path = os.path.join(out, "adapter_config.json")
    with open(cfg_path) as f:
        adapter_cfg = json.load(f)
    adapter_cfg["base_model_name_or_path"] = os.path.join("..", base_name)
    with open(cfg_path, "w") as f:
        json.dump(adapter_cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    key_of = {}
    state = get_peft_model_state_dict(model)
    for n, p in trainable:
        key = n.replace(".default", "")
        assert key in state, f"{key} not in the adapter's state dict"
        key_of[n] = key

    def loss_of():
        logits = model(tokens).logits
        return torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1)
        )

    model.train()
    loss = loss_of()
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1)}
    for n, p in trainable:
        tensors["grad." + key_of[n]] = p.grad.detach().clone().contiguous()

    params = [p for _, p in trainable]
    opt = torch.optim.AdamW(
        params,
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
        foreach=False,
    )
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, HYPER["grad_clip"])
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    for n, p in trainable:
        tensors["final." + key_of[n]] = p.detach().clone().contiguous()
    meta = {k: json.dumps(v) for k, v in HYPER.items()}
    import peft
    import transformers

    meta.update(
        steps=str(STEPS),
        r=str(R),
        lora_alpha=str(ALPHA),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
    )
    save_file(tensors, os.path.join(out, "fixture.safetensors"), metadata=meta)
    print(f"{base_name}-lora: loss {tensors['loss'].item():.6f}, {STEPS} losses {losses}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    make("gpt2-tiny", 11)
    make("llama-tiny", 12)
