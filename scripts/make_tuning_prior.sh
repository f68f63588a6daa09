#!/usr/bin/env bash
# Measures, on this machine's adapter, every kernel problem of the runs a first-time user makes
# (the README's `train` on the embedded default, the README's tiny shakespeare model, the 4-layer
# model of `bench --suite quick`, GPT-2 124M's prefill and decoding, SmolLM2-135M's training step,
# prefill and decoding), and writes each problem's
# winner as the prior shipped for adapters whose name starts as this one's does.
#
#   scripts/make_tuning_prior.sh llvmpipe assets/tuning/llvmpipe.json
#   scripts/make_tuning_prior.sh llvmpipe assets/tuning/llvmpipe.json default
#
# Every problem is measured (`--tune measure`: the shipped prior is not trusted), into a cache of
# this script's own; nothing is read from or written to the user's cache. Given section names
# (default, shakespeare, quick, gpt2, smollm2), only those runs are measured and their problems'
# entries replace those in the existing table, the others kept.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:?usage: $0 ADAPTER_PREFIX OUT.json}"
out="${2:?usage: $0 ADAPTER_PREFIX OUT.json}"
cargo build --release
bin=target/release/shaderformer
cache="$(mktemp -d)"
scratch="$(mktemp -d)"
export SHADERFORMER_CACHE_DIR="$cache" SHADERFORMER_TUNE=measure XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

sections="${3:-default shakespeare quick gpt2 smollm2}"
for section in $sections; do
    case "$section" in
    # The embedded default, as the README runs it (its evaluation and its answers included; its
    # kernels are the same over a few steps as over the whole run).
    default) $bin train --out "$scratch/default" --max-iters 20 --eval-interval 10 ;;
    # The README's tiny shakespeare configuration and the suite's 4-layer model: their training
    # steps.
    shakespeare) $bin tune --n-layer 4 --n-head 4 --n-embd 128 --vocab-size 65 --context 64 \
        --batch-size 12 --block-size 64 ;;
    quick) $bin tune --n-layer 4 --n-head 4 --n-embd 128 --vocab-size 65 --context 64 \
        --batch-size 8 --block-size 64 ;;
    # GPT-2 124M's prefill and decoding (bench --suite, sample).
    gpt2) $bin tune --model gpt2 --batch-size 1 --block-size 128 --infer ;;
    # SmolLM2-135M's shape: the training step BENCHMARKS.md times (B 4, T 256), and prefill of
    # 128 tokens and decoding (bench --model smollm2-135m, sample on a SmolLM2 checkpoint).
    smollm2)
        $bin tune --model smollm2-135m --batch-size 4 --block-size 256
        $bin tune --model smollm2-135m --batch-size 1 --block-size 128 --infer
        ;;
    *) echo "$0: unknown section $section" >&2; exit 2 ;;
    esac
done

python3 - "$cache" "$prefix" "$out" "${3:-}" <<'EOF'
import glob, json, os, sys
cache, prefix, out, partial = sys.argv[1:]
files = glob.glob(f"{cache}/*.json")
assert len(files) == 1, f"one adapter's cache expected, found {files}"
c = json.load(open(files[0]))
ident = c["identity"]
measured = {(x["family"], x["problem"]): x["winner"] for x in c["choices"]}
kept = {}
if partial and os.path.exists(out):
    kept = {(x["family"], x["problem"]): x["winner"] for x in json.load(open(out))["choices"]}
kept.update(measured)
choices = [{"family": f, "problem": p, "winner": w} for (f, p), w in sorted(kept.items())]
doc = {
    "adapter_prefix": prefix,
    "measured_on": f'{ident["adapter"]}, {ident["driver"]} {ident["driver_info"]}, shaderformer {ident["crate_version"]}',
    "choices": choices,
}
with open(out, "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
print(f"{out}: {len(choices)} problems, {len(measured)} measured now on {ident['adapter']}")
EOF
rm -rf "$cache" "$scratch"
