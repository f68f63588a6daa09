#!/bin/sh
# Regenerates assets/metrics/*.jsonl: the metrics of two short runs of a tiny model on the
# embedded addition dataset, at two learning rates, for the tests of `shaderformer plot`.
# Usage: scripts/make_metrics.sh [path/to/shaderformer]
set -e
bin=${1:-target/debug/shaderformer}
dir=$(dirname "$0")/../assets/metrics
tmp=$(mktemp -d)
mkdir -p "$dir"
for lr in 1e-3 3e-3; do
    rm -f "$dir/addition-lr$lr.jsonl"
    "$bin" train --n-layer 1 --n-embd 32 --n-head 2 --batch-size 8 --max-iters 60 \
        --eval-interval 10 --eval-iters 2 --log-interval 2 --warmup-iters 5 --lr "$lr" \
        --sample-tokens 0 --out "$tmp/lr$lr" --metrics "$dir/addition-lr$lr.jsonl" > /dev/null
done
rm -rf "$tmp"
