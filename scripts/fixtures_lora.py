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
    assets/<base>-lora/continue.bin, continue.safetensors
        the adapter above continued (loaded with PeftModel.from_pretrained) for STEPS AdamW steps
        on batches read from continue.bin (random u16 token ids, headerless) as `shaderformer
        train --loader sequential` reads them from its training split: losses (STEPS) and
        final.<key>, for `train --init <base> --lora <base>-lora`.
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
from peft import LoraConfig, PeftModel, get_peft_model
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


def adamw(params):
    """PyTorch's AdamW with the fixtures' hyperparameters (decay on every adapter tensor)."""
    return torch.optim.AdamW(
        params,
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
        foreach=False,
    )


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
    opt = adamw(params)
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


# The continued run: tokens in continue.bin, micro-batches of B x T.
CONTINUE_TOKENS, CONTINUE_B, CONTINUE_T = 1000, 2, 16


def sequential_batch(train, i, b, t):
    """Batch i as shaderformer's sequential loader draws it from the training split."""
    span = b * t
    start = (i * span) % (len(train) - span - 1)
    buf = train[start : start + span + 1]
    return buf[:-1].view(b, t), buf[1:].view(b, t)


def make_continue(base_name, seed):
    base_dir = os.path.join(ROOT, base_name)
    out = os.path.join(ROOT, base_name + "-lora")
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (CONTINUE_TOKENS,), generator=g)
    ids.to(torch.int16).numpy().astype("<u2").tofile(os.path.join(out, "continue.bin"))
    # shaderformer's split: the last tenth is validation.
    train = ids[: CONTINUE_TOKENS - CONTINUE_TOKENS // 10]
    model = PeftModel.from_pretrained(model, out, is_trainable=True)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    opt = adamw(params)
    losses = []
    for i in range(STEPS):
        tokens, targets = sequential_batch(train, i, CONTINUE_B, CONTINUE_T)
        opt.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, HYPER["grad_clip"])
        opt.step()
        losses.append(loss.item())
    tensors = {"losses": torch.tensor(losses, dtype=torch.float32)}
    for n, p in trainable:
        tensors["final." + n.replace(".default", "")] = p.detach().clone().contiguous()
    meta = {k: json.dumps(v) for k, v in HYPER.items()}
    meta.update(steps=str(STEPS), batch_size=str(CONTINUE_B), block_size=str(CONTINUE_T))
    save_file(tensors, os.path.join(out, "continue.safetensors"), metadata=meta)
    print(f"{base_name}-lora continued: {STEPS} losses {losses}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    make("gpt2-tiny", 11)
    make("llama-tiny", 12)
    make_continue("gpt2-tiny", 21)
    make_continue("llama-tiny", 22)
