"""The Llama-family fixtures of scripts/make_fixtures.py: small random LlamaForCausalLM,
Qwen2ForCausalLM and Qwen3ForCausalLM models of awkward sizes, built with transformers' own
classes (float32, eager attention), saved with save_pretrained, and the values the parity tests
compare against.

Checkpoints (each directory loads in transformers as it is):
    llama-tiny/   GQA 6/2, head_dim 10, untied lm_head, llama3 RoPE scaling, no tokenizer
    qwen2-tiny/   GQA 4/2, head_dim 12, q/k/v biases, tied embeddings, tokenizer.json (byte-level
                  BPE with <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2), a ChatML chat_template
                  in tokenizer_config.json, generation_config eos [2, 0], score.txt; trained
                  PRETRAIN_STEPS on the corpus before saving so greedy decoding is not degenerate
    qwen3-tiny/   GQA 4/2, head_dim 18 (hidden 52), q_norm / k_norm, untied lm_head
    llama-tiny-sharded/  llama-tiny's weights as model.safetensors.index.json + 3 shards
    qwen3-tiny-bf16/     qwen3-tiny's weights rounded to bf16 (dtype bfloat16)
  each with config.json in the installed transformers' layout (5.x: rope_parameters) and
  config.4x.json, the same in 4.x's layout (top-level rope_theta, rope_scaling, torch_dtype; see
  write_4x_config), for the same weights. To load one layout, copy it to config.json beside the
  weights. transformers 5 reads both to bit-identical logits (checked here); transformers 4.57
  reads config.4x.json to the same bits but ignores config.json's rope_parameters (it falls back
  to theta 10000, no scaling): no fixture uses theta 10000, so such a loader fails every one.

fixture.safetensors of llama-tiny, qwen2-tiny and qwen3-tiny (f32 unless said, ids int32):
    tokens, targets (B, T); logits (B, T, V); loss (1): mean cross-entropy of logits and targets
    grad.<name>   every parameter's gradient of that loss, named and shaped as in
                  model.safetensors (a tied model has no lm_head.weight: its gradient is in
                  grad.model.embed_tokens.weight, both uses summed)
    losses, grad_norms (STEPS): AdamW steps on the same batch, each loss that of the step's forward
                  before its update, each norm the total norm before clipping
    final.<name>  every parameter after the STEPS steps
    rope.inv_freq (head_dim / 2): transformers' inverse frequencies (float32, scaling applied)
    prompt_ids (P), greedy_ids (N), greedy_logits (N, V): see greedy_fixture
    score_ids, score_loss (1): see score_loss (qwen2-tiny: the tokens of score.txt)
    qwen2-tiny also: chat_prompt_ids, chat_greedy_ids, chat_greedy_logits and the same prefixed
                  chat_system_ (see chat_fixture)
  metadata (strings): lr, beta1, beta2, eps, weight_decay, grad_clip, B, T, steps, decay
    ("ndim>=2": see decay_rule), score_t, greedy_margin (smallest top-1 / top-2 gap of the greedy
    steps), torch_version, transformers_version; qwen2-tiny also prompt, chat_user, chat_system,
    chat_text, chat_system_text (the rendered templates) and their greedy margins.
fixture.safetensors of qwen3-tiny-bf16: prompt_ids, greedy_ids, greedy_logits of the bf16 weights
    widened to float32 and run in float32.
"""

import json
import math
import os
import shutil

import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

from fixtures_checkpoints import check_layouts, load, save_fixture, sharded_copy, write_4x_config
from make_fixtures import HYPER, ROOT, SCORE_T, STEPS, corpus

# Awkward on purpose: widths and MLP sizes not multiples of 64 (nor of 16 for most), head_dim 10,
# 12 and 18, groups of 3 and 2 query heads per key/value head, T and B differing per model.
# initializer_range 0.1 (not 0.02) so attention is far from uniform and RoPE and the groups matter.
LLAMA = dict(
    vocab_size=83,
    hidden_size=60,
    intermediate_size=76,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=0.1,
    bos_token_id=81,
    eos_token_id=82,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=20000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
)
QWEN2 = dict(
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    initializer_range=0.1,
    # Not Qwen2.5's 1e6: with head_dim 12 and T 19, its slowest pairs would barely turn, the
    # k-bias gradient there would be float32 noise and AdamW's update to it arbitrary. Nor the
    # default 10000, so that a loader ignoring rope_theta fails.
    rope_parameters=dict(rope_type="default", rope_theta=4000.0),
)
QWEN3 = dict(
    vocab_size=97,
    hidden_size=52,
    intermediate_size=68,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=18,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=96,
    rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
)
MODELS = [
    # name, config class, hyperparameters, seed, (B, T)
    ("llama-tiny", LlamaConfig, LLAMA, 11, (2, 41)),
    ("qwen2-tiny", Qwen2Config, QWEN2, 12, (3, 19)),
    ("qwen3-tiny", Qwen3Config, QWEN3, 13, (2, 35)),
]
PROMPT_LEN = 7  # random prompt ids for the models without a tokenizer
NEW_TOKENS = 20
SCORE_LEN = 101  # random score ids for the models without a tokenizer
MIN_MARGIN = 1e-3  # smallest allowed gap between the best and second logit of a greedy step
MIN_DISTINCT = 6  # a random prompt's greedy continuation must hold this many distinct ids
PRETRAIN_STEPS = 200  # qwen2-tiny learns the corpus a little, as gpt2-bpe does
MAX_F64_DISTANCE = 2.5e-5  # float32 PyTorch's largest allowed distance from float64 (see below)

# A tiny ChatML template, as Qwen2.5-Instruct and SmolLM2-Instruct use.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_USER = "What is a deque?"
CHAT_SYSTEM = "You are terse."
QWEN2_PROMPT = "The json module can serialize Python objects"
QWEN2_VOCAB = 271


def decay_rule(name, p):
    """nanoGPT's rule, as the GPT-2 fixture: tensors of 2 or more dimensions (embeddings, lm_head,
    projections) decay; 1-D ones (RMSNorm weights, q/k norms, biases) do not."""
    return p.dim() >= 2


def chatml_tokenizer(out):
    """A byte-level BPE trained on the corpus with ChatML's special tokens, saved to `out` with a
    chat_template inside tokenizer_config.json."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        [corpus()], vocab_size=QWEN2_VOCAB, min_frequency=2, special_tokens=specials
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # Keep the template in tokenizer_config.json (as most published checkpoints have it), not in a
    # separate chat_template.jinja.
    jinja = os.path.join(out, "chat_template.jinja")
    path = os.path.join(out, "tokenizer_config.json")
    cfg = json.load(open(path))
    if os.path.exists(jinja):
        os.remove(jinja)
    cfg["chat_template"] = CHAT_TEMPLATE
    # transformers 5 writes TokenizersBackend, a class 4.x does not know; both load this one.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return fast


def build(name, config_cls, hyper, seed, vocab_size=None, eos=None, pretrain=None):
    """A random model (trained a little by `pretrain` if given) saved with save_pretrained to
    assets/<name>; returns it reloaded from disk."""
    out = os.path.join(ROOT, name)
    os.makedirs(out, exist_ok=True)
    kw = dict(hyper)
    if vocab_size is not None:
        kw["vocab_size"] = vocab_size
    if eos is not None:
        kw["bos_token_id"], kw["eos_token_id"] = None, eos
    torch.manual_seed(seed)
    config = config_cls(**kw)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    # RMSNorm weights start at 1 and biases at 0: perturb every 1-D parameter, so a missing
    # multiply or add and every gradient show.
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    if pretrain is not None:
        pretrain(model)
    model.eval()
    model.save_pretrained(out)
    write_4x_config(out)
    return load(out), out


def corpus_pretrain(tok, seed):
    """PRETRAIN_STEPS of plain AdamW on windows of the corpus, so greedy decoding follows clear
    preferences rather than a random model's repetition."""

    def run(model):
        data = torch.tensor(tok(corpus())["input_ids"])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(PRETRAIN_STEPS):
            ix = torch.randint(0, len(data) - 49, (8,), generator=g)
            x = torch.stack([data[i : i + 48] for i in ix])
            y = torch.stack([data[i + 1 : i + 49] for i in ix])
            _, loss = cross_entropy(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"  corpus loss after {PRETRAIN_STEPS} steps {loss.item():.3f}")

    return run


def adamw(model):
    params = list(model.named_parameters())  # tied weights appear once
    decay = [p for n, p in params if decay_rule(n, p)]
    no_decay = [p for n, p in params if not decay_rule(n, p)]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": HYPER["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        foreach=False,
    )


def cross_entropy(model, tokens, targets):
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    return logits, loss


def train_fixture(model, b, t, seed):
    """tokens, targets (B, T) int32; logits (B, T, V); loss (1); grad.<name> of every parameter;
    losses and grad_norms (STEPS) of AdamW steps on the same batch; final.<name>: every parameter
    after them."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    targets = torch.randint(0, vocab, (b, t), generator=g)
    model.train()
    logits, loss = cross_entropy(model, tokens, targets)
    loss.backward()
    tensors = {
        "tokens": tokens.to(torch.int32),
        "targets": targets.to(torch.int32),
        "logits": logits.detach().contiguous(),
        "loss": loss.detach().reshape(1),
    }
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.detach().clone().contiguous()
    opt = adamw(model)
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _, loss = cross_entropy(model, tokens, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["grad_clip"])
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    for name, p in model.named_parameters():
        tensors["final." + name] = p.detach().clone().contiguous()
    print(f"  loss {tensors['loss'].item():.6f}, {STEPS} losses {[round(x, 5) for x in losses]}")
    return tensors


def float64_distance(out, tensors):
    """The same STEPS from the saved model in float64: how far float32 PyTorch is from exact, so
    that the tests' 1e-4 on weights has room. A parameter whose gradient stays at float32's noise
    level makes AdamW's update (about lr times its sign) arbitrary; this refuses such a fixture."""
    model = load(out).double().train()
    tokens, targets = tensors["tokens"].long(), tensors["targets"].long()
    opt = adamw(model)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _, loss = cross_entropy(model, tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["grad_clip"])
        opt.step()
        losses.append(loss.item())
    final = {n: tensors["final." + n].double() for n, _ in model.named_parameters()}
    weights = max((p - final[n]).abs().max().item() for n, p in model.named_parameters())
    loss = (torch.tensor(losses) - tensors["losses"].double()).abs().max().item()
    print(f"  float64 against float32 after {STEPS} steps: weights {weights:.2e}, loss {loss:.2e}")
    assert weights < MAX_F64_DISTANCE and loss < MAX_F64_DISTANCE, (weights, loss)
    return {"f64_weights_distance": f"{weights:.3g}", "f64_losses_distance": f"{loss:.3g}"}


def greedy(model, prompt_ids, n, eos):
    """n argmax tokens after prompt_ids, recomputing the whole sequence each step, checked against
    generate(do_sample=False) with its KV cache; also the smallest top-1 / top-2 logit gap."""
    ids = list(prompt_ids)
    margin = math.inf
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(last, 2).values
            margin = min(margin, (top[0] - top[1]).item())
            ids.append(int(last.argmax()))
        prompt = torch.tensor([prompt_ids])
        gen = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=eos[0] if isinstance(eos, list) else eos,
        )[0, len(prompt_ids):]
    new = ids[len(prompt_ids):]
    assert gen.tolist() == new, f"generate {gen.tolist()} != argmax {new} (an eos was the argmax?)"
    assert margin > MIN_MARGIN, f"greedy margin {margin} too small"
    return new, margin


def clear_prompt(model, g, eos, tries=20):
    """The first of random prompts whose greedy continuation has no near-tie, no eos and at least
    MIN_DISTINCT distinct ids."""
    for _ in range(tries):
        prompt = torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()
        try:
            new, _ = greedy(model, prompt, NEW_TOKENS, eos)
            assert len(set(new)) >= MIN_DISTINCT, f"only {len(set(new))} distinct ids"
            return prompt
        except AssertionError as e:
            print(f"  prompt {prompt} refused: {e}")
    raise AssertionError("no clear prompt")


def greedy_fixture(model, prompt_ids, eos, prefix=""):
    """<prefix>prompt_ids (P); <prefix>greedy_ids (N); <prefix>greedy_logits (N, V): row i the
    logits whose argmax is greedy_ids[i] (row 0 at the prompt's last position), from one forward
    of the prompt and the greedy ids but the last."""
    new, margin = greedy(model, prompt_ids, NEW_TOKENS, eos)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + new[:-1]])).logits[0, len(prompt_ids) - 1 :]
    assert logits.argmax(-1).tolist() == new
    print(f"  {prefix}greedy {new} (margin {margin:.4f})")
    tensors = {
        prefix + "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int32),
        prefix + "greedy_logits": logits.contiguous(),
        prefix + "greedy_ids": torch.tensor(new, dtype=torch.int32),
    }
    return tensors, {prefix + "greedy_margin": f"{margin:.6g}"}


def score_loss(model, ids, t):
    """gpt2-bpe's score: the mean loss over windows of t + 1 tokens starting at 0, t, 2t, ...
    (the last shorter), each predicting its tokens after the first."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, t):
            window = torch.tensor([ids[start : start + t + 1]])
            lg = model(window[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                lg.reshape(-1, lg.size(-1)), window[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += window.size(1) - 1
    return nll / count


def score_fixture(model, ids):
    loss = score_loss(model, ids, SCORE_T)
    print(f"  score over {len(ids)} tokens: {loss:.6f}")
    tensors = {
        "score_ids": torch.tensor(ids, dtype=torch.int32),
        "score_loss": torch.tensor([loss], dtype=torch.float32),
    }
    return tensors, {"score_t": str(SCORE_T)}


def chat_fixture(model, tok, eos):
    """greedy_fixture's tensors, prefixed chat_ (no system message: the template's default one)
    and chat_system_ (CHAT_SYSTEM), of the template rendered for CHAT_USER with the generation
    prompt; the rendered texts in the metadata."""
    tensors, meta = {}, {"chat_user": CHAT_USER, "chat_system": CHAT_SYSTEM}
    user = [{"role": "user", "content": CHAT_USER}]
    cases = [("chat_", user), ("chat_system_", [{"role": "system", "content": CHAT_SYSTEM}] + user)]
    for prefix, messages in cases:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text)["input_ids"]
        t, m = greedy_fixture(model, ids, eos, prefix)
        tensors.update(t)
        meta.update(m)
        meta[prefix + "text"] = text
    return tensors, meta


def rope_inv_freq(model):
    """The inverse frequencies transformers uses (float32, head_dim / 2 of them)."""
    return model.model.rotary_emb.inv_freq.detach().clone().contiguous()


def check_llama3_bands(inv_freq, rope):
    """The llama-tiny RoPE must exercise all three llama3 branches: kept, smoothed, divided."""
    theta, dim = rope["rope_theta"], 2 * len(inv_freq)
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / base
    old = rope["original_max_position_embeddings"]
    high, low = old / rope["high_freq_factor"], old / rope["low_freq_factor"]
    kept = (wavelen < high).sum().item()
    divided = (wavelen > low).sum().item()
    assert kept and divided and kept + divided < len(base), (kept, divided, len(base))


def common_meta(b, t):
    meta = {k: json.dumps(v) for k, v in HYPER.items()}
    meta.update(
        B=str(b),
        T=str(t),
        steps=str(STEPS),
        decay="ndim>=2",
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
    )
    return meta


def model_fixture(name, config_cls, hyper, seed, bt):
    print(f"{name}:")
    tok, vocab, eos = None, None, None
    if name == "qwen2-tiny":
        os.makedirs(os.path.join(ROOT, name), exist_ok=True)
        tok = chatml_tokenizer(os.path.join(ROOT, name))
        vocab = len(tok)
        eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    pretrain = None if tok is None else corpus_pretrain(tok, seed + 300)
    model, out = build(name, config_cls, hyper, seed, vocab, eos, pretrain)
    eos = model.generation_config.eos_token_id
    b, t = bt
    tensors, meta = {"rope.inv_freq": rope_inv_freq(model)}, common_meta(b, t)
    if name == "llama-tiny":
        check_llama3_bands(tensors["rope.inv_freq"], hyper["rope_parameters"])
    g = torch.Generator().manual_seed(seed + 100)
    vocab = model.config.vocab_size
    if tok is None:
        score_ids = torch.randint(0, vocab, (SCORE_LEN,), generator=g).tolist()
        prompt = clear_prompt(model, g, eos)
    else:
        prompt = tok(QWEN2_PROMPT)["input_ids"]
        score_text = corpus()[:700]
        with open(os.path.join(out, "score.txt"), "w") as f:
            f.write(score_text)
        score_ids = tok(score_text)["input_ids"]
        meta["prompt"] = QWEN2_PROMPT
    for part in (greedy_fixture(model, prompt, eos), score_fixture(model, score_ids)):
        tensors.update(part[0])
        meta.update(part[1])
    if tok is not None:
        part = chat_fixture(model, tok, eos)
        tensors.update(part[0])
        meta.update(part[1])
    tensors.update(train_fixture(model, b, t, seed + 200))
    meta.update(float64_distance(out, tensors))
    check_layouts(out, tensors["logits"], tensors["tokens"].long())
    save_fixture(tensors, os.path.join(out, "fixture.safetensors"), meta)
    return out


def bf16_copy(src, name):
    """src's weights rounded to bf16 and saved as bf16, with a fixture of its own: prompt_ids,
    greedy_ids and greedy_logits of the bf16 weights widened to float32 (exact) and run in
    float32."""
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    load(src).to(torch.bfloat16).save_pretrained(out)
    write_4x_config(out)
    model = load(out, torch.float32)
    fx = load_file(os.path.join(src, "fixture.safetensors"))
    prompt = fx["prompt_ids"].tolist()
    tensors, meta = greedy_fixture(model, prompt, model.generation_config.eos_token_id)
    meta.update(torch_version=torch.__version__, transformers_version=transformers.__version__)
    save_fixture(tensors, os.path.join(out, "fixture.safetensors"), meta)
    dtypes = {v.dtype for v in load_file(os.path.join(out, "model.safetensors")).values()}
    assert dtypes == {torch.bfloat16}, dtypes
    print(f"{name}: bf16 weights of {os.path.basename(src)}")


def main():
    outs = {name: model_fixture(name, *rest) for name, *rest in MODELS}
    sharded_copy(outs["llama-tiny"], os.path.join(ROOT, "llama-tiny-sharded"))
    bf16_copy(outs["qwen3-tiny"], "qwen3-tiny-bf16")
