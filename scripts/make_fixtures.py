#!/usr/bin/env python3
"""Generates the PyTorch / transformers fixtures under assets/ that the parity tests compare
shaderformer against (the method of llm.c's test_gpt2).

Needs torch, transformers and tokenizers (CPU wheels suffice), in a virtual environment outside
the repository:

    python3 -m venv ~/fixenv && ~/fixenv/bin/pip install torch transformers tokenizers safetensors
    ~/fixenv/bin/python scripts/make_fixtures.py          # everything
    ~/fixenv/bin/python scripts/make_fixtures.py llama    # one family: gpt2 or llama

Other versions of torch and transformers give other rounding (and another version string in the
config files); the versions that made each Llama-family fixture are in its metadata.

Outputs (small, committed):
    assets/gpt2-bpe/             a random GPT2LMHeadModel with a byte-level BPE tokenizer.json
                                 (trained here with the tokenizers package on Python's own
                                 docstrings), saved with save_pretrained
    assets/gpt2-bpe/fixture.safetensors
        prompt_ids; logits (T, V) of the prompt; greedy_ids: 30 tokens of generate(do_sample=False);
        score_ids and score_loss: the mean loss over windows of SCORE_T + 1 tokens starting at
        0, SCORE_T, 2·SCORE_T, ... (the last shorter), each predicting its tokens after the first
    assets/gpt2-bpe/score.txt    the text behind score_ids
    assets/gpt2-tiny/            a random GPT2LMHeadModel of awkward size, saved with save_pretrained
    assets/gpt2-tiny/fixture.safetensors
        tokens, targets (B, T) int32; logits (B, T, V); loss (1); grad.<name> for every parameter
        (Hugging Face layout); losses (STEPS) and grad_norms (STEPS) of AdamW steps with clipping
        and weight decay on the same batch. Hyperparameters are in the file's metadata.
    assets/llama-tiny/, qwen2-tiny/, qwen3-tiny/, llama-tiny-sharded/, qwen3-tiny-bf16/
                                 the Llama family: see scripts/fixtures_llama.py
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


def corpus():
    """A few KB of English with code words: docstrings of Python's standard library."""
    import collections, json as js, textwrap, string, functools, itertools, re
    parts = [m.__doc__ or "" for m in (collections, js, textwrap, string, functools, itertools, re)]
    return "\n".join(p.strip() for p in parts)


BPE = dict(n_positions=64, n_embd=40, n_layer=2, n_head=4)
PROMPT = "The json module can serialize Python objects"
SCORE_T = 24


def bpe_gpt2():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    out = os.path.join(ROOT, "gpt2-bpe")
    os.makedirs(out, exist_ok=True)
    text = corpus()
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([text], vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    vocab_size = tok.get_vocab_size()
    eot = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(3)
    config = GPT2Config(
        vocab_size=vocab_size,
        **BPE,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = GPT2LMHeadModel(config)
    # A little training on the corpus, so greedy decoding follows clear preferences (not a
    # random model's near-ties) and the test covers realistic logits.
    data = torch.tensor(tok.encode(text).ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    model.train()
    for _ in range(300):
        ix = torch.randint(0, len(data) - 65, (8,), generator=g)
        x = torch.stack([data[i : i + 64] for i in ix])
        y = torch.stack([data[i + 1 : i + 65] for i in ix])
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"gpt2-bpe: training loss after 300 steps {loss.item():.3f}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(out)

    prompt_ids = fast(PROMPT)["input_ids"]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits[0]
        gen = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=30,
            min_new_tokens=30,
            pad_token_id=eot,
            attention_mask=torch.ones_like(ids),
        )[0, len(prompt_ids):]

    score_text = text[:700]
    with open(os.path.join(out, "score.txt"), "w") as f:
        f.write(score_text)
    score_ids = fast(score_text)["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(score_ids) - 1, SCORE_T):
            window = torch.tensor([score_ids[start : start + SCORE_T + 1]])
            lg = model(window[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                lg.reshape(-1, lg.size(-1)), window[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += window.size(1) - 1
    tensors = {
        "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int32),
        "logits": logits.contiguous(),
        "greedy_ids": gen.to(torch.int32).contiguous(),
        "score_ids": torch.tensor(score_ids, dtype=torch.int32),
        "score_loss": torch.tensor([nll / count], dtype=torch.float32),
    }
    meta = {"prompt": PROMPT, "score_t": str(SCORE_T), "vocab_size": str(vocab_size)}
    save_file(tensors, os.path.join(out, "fixture.safetensors"), metadata=meta)
    print(f"gpt2-bpe: vocab {vocab_size}, prompt {len(prompt_ids)} tokens, greedy {gen.tolist()}")
    print(f"          score over {len(score_ids)} tokens: {nll / count:.6f}")


def tiny_gpt2():
    out = os.path.join(ROOT, "gpt2-tiny")
    torch.manual_seed(42)
    config = GPT2Config(
        **TINY,
        bos_token_id=TINY["vocab_size"] - 1,
        eos_token_id=TINY["vocab_size"] - 1,
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
    families = sys.argv[1:] or ["gpt2", "llama"]
    unknown = set(families) - {"gpt2", "llama"}
    if unknown:
        sys.exit(f"unknown fixture family {sorted(unknown)}: choose gpt2 and/or llama")
    if "gpt2" in families:
        tiny_gpt2()
        bpe_gpt2()
    if "llama" in families:
        import fixtures_llama

        fixtures_llama.main()
    sys.exit(0)
