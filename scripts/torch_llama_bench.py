"""PyTorch + transformers on the CPU, timing what `shaderformer bench --model smollm2-135m` times:
a training step (forward, backward, AdamW) at B x T, prefill of a random prompt and greedy
decoding with the KV cache, on random weights of SmolLM2-135M's exact shape. The peer figures of
BENCHMARKS.md's SmolLM2 table; run it in the same sitting as the shaderformer bench.

Usage (a virtual environment with torch and transformers, outside the repository):
    python scripts/torch_llama_bench.py [--batch 4 --block 256] [--prompt-len 128 --new-tokens 128]
        [--dtypes f32,f16] [--runs 3 --warmup 1] [--what train,infer] [--json FILE]

Protocol, as shaderformer's: the median of --runs timed runs after --warmup untimed ones;
prefill is the time to the last position's logits; decode is the time per new token (greedy,
argmax of the logits on the CPU, one token per forward with the cache). Training uses the first
dtype only when it is f32 (a CPU trains in f32). torch uses every core it is given
(torch.get_num_threads(), printed).
"""
import argparse
import inspect
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M): what the shape is.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)

# transformers 5.x (from 5.2x) names the KV cache `cache`; earlier versions `past_key_values`.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_of(out):
    return getattr(out, CACHE_ARG)


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def model_of(dtype):
    torch.manual_seed(1)
    cfg = LlamaConfig(**SMOLLM2_135M)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(DTYPES[dtype]).eval()


def stats(samples):
    return dict(median=statistics.median(samples), min=min(samples), max=max(samples), runs=len(samples))


def bench_train(b, t, warmup, runs):
    model = model_of("f32").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(42)
    v = SMOLLM2_135M["vocab_size"]
    times = []
    for step in range(warmup + runs):
        data = torch.randint(0, v, (b, t + 1), generator=g)
        t0 = time.perf_counter()
        out = model(input_ids=data[:, :t], labels=data[:, 1:].contiguous(), use_cache=False)
        # transformers shifts labels itself; the loss here is over T-1 positions of T, which
        # changes nothing in the time of the step.
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        loss = out.loss.item()
        s = time.perf_counter() - t0
        print(f"# train step {step} {'warm-up' if step < warmup else 'timed'}: {s * 1e3:.0f} ms, loss {loss:.4f}",
              file=sys.stderr, flush=True)
        if step >= warmup:
            times.append(s)
    st = stats(times)
    return dict(batch_size=b, block_size=t, ms_per_step={k: (x * 1e3 if k != "runs" else x) for k, x in st.items()},
                tokens_per_s=b * t / st["median"])


@torch.inference_mode()
def bench_infer(dtype, prompt_len, new_tokens, warmup, runs):
    model = model_of(dtype)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, prompt_len), generator=g)
    prefill, decode = [], []
    for run in range(warmup + runs):
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        past = cache_of(out)
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{CACHE_ARG: past})
            past = cache_of(out)
            nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        print(f"# {dtype} run {run} {'warm-up' if run < warmup else 'timed'}: prefill {(t1 - t0) * 1e3:.0f} ms, "
              f"decode {(t2 - t1) / max(new_tokens, 1) * 1e3:.1f} ms/token", file=sys.stderr, flush=True)
        if run >= warmup:
            prefill.append(t1 - t0)
            decode.append((t2 - t1) / max(new_tokens, 1))
    p, d = stats(prefill), stats(decode)
    return dict(dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens,
                prefill_ms=p["median"] * 1e3, prefill_tokens_per_s=prompt_len / p["median"],
                decode_ms_per_token=d["median"] * 1e3, decode_tokens_per_s=1.0 / d["median"],
                decode_ms_min=d["min"] * 1e3, decode_ms_max=d["max"] * 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", default="train,infer")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="f32,f16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", help="write the results here as one JSON object")
    a = ap.parse_args()
    what = set(a.what.split(","))
    res = dict(engine="pytorch-cpu", torch=torch.__version__, transformers=transformers.__version__,
               threads=torch.get_num_threads(), model="smollm2-135m (random weights)")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    if "train" in what:
        tr = bench_train(a.batch, a.block, a.warmup, a.runs)
        res["train"] = tr
        print(f"train B {a.batch} T {a.block}: {tr['ms_per_step']['median']:.0f} ms/step "
              f"(min {tr['ms_per_step']['min']:.0f}, max {tr['ms_per_step']['max']:.0f}), "
              f"{tr['tokens_per_s']:.1f} tokens/s", flush=True)
    if "infer" in what:
        res["infer"] = []
        for dt in a.dtypes.split(","):
            r = bench_infer(dt, a.prompt_len, a.new_tokens, a.warmup, a.runs)
            res["infer"].append(r)
            print(f"{dt}: prefill {r['prefill_tokens_per_s']:.1f} tokens/s, decode {r['decode_tokens_per_s']:.2f} "
                  f"tokens/s ({r['decode_ms_per_token']:.1f} ms/token)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
