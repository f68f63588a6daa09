#!/usr/bin/env bash
# Measures a machine with a GPU in one go: the test suite with SHADERFORMER_REQUIRE_GPU=1 (a test
# that finds no adapter fails) and `shaderformer bench --suite full`, each written to $OUT.
#
#   scripts/device-check.sh pack   # with cargo: release binaries of the CLI and every test, in .bundle/
#   scripts/device-check.sh run    # without cargo (the GPU machine): runs the bundle, writes $OUT
#   scripts/device-check.sh        # both, on a machine that has cargo and the GPU
#
# `run` needs only the repository (assets/, shaders/) and .bundle/bundle.tar.xz. Where the machine
# has no Vulkan loader, set VULKAN_DEBS to a folder of Debian packages (libvulkan1 and its
# neighbours) and they are unpacked first. Time limits: TEST_SECONDS for the tests (300), BENCH_SECONDS
# for the suite (240): together within 8 minutes, whatever hangs.
#
# $OUT (default ./device-check-out) receives: device.txt (the adapters), tests.log, tests.txt (one
# line per test binary: passed/failed and seconds), suite.json and suite.txt (the benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
BUNDLE="$ROOT/.bundle"
OUT="${OUT:-$ROOT/device-check-out}"

pack() {
    set -e
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin/tests"
    cargo build --release
    # Every integration and unit test binary, built as the release profile: their paths come from
    # cargo's JSON messages.
    cargo test --release --no-run --message-format=json 2>/dev/null \
        | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["target"]["name"] + "\t" + m["executable"])
' > "$BUNDLE/tests.tsv"
    while IFS=$'\t' read -r name exe; do
        cp "$exe" "$BUNDLE/bin/tests/$name"
    done < "$BUNDLE/tests.tsv"
    cp target/release/shaderformer "$BUNDLE/bin/shaderformer"
    strip "$BUNDLE"/bin/shaderformer "$BUNDLE"/bin/tests/* 2>/dev/null || true
    # The tests find assets and the CLI through the paths they were built at.
    echo "$ROOT" > "$BUNDLE/bin/built-at"
    tar -C "$BUNDLE" -cJf "$BUNDLE/bundle.tar.xz" bin
    rm -rf "$BUNDLE/bin"
    echo "bundle: $(du -h "$BUNDLE/bundle.tar.xz" | cut -f1) in $BUNDLE/bundle.tar.xz ($(wc -l < "$BUNDLE/tests.tsv") test binaries)"
}

vulkan_loader() {
    if ldconfig -p 2>/dev/null | grep -q libvulkan.so.1; then return; fi
    if [ -n "${VULKAN_DEBS:-}" ]; then
        for f in "$VULKAN_DEBS"/*.deb; do dpkg -x "$f" /; done
        ldconfig
    else
        echo "no Vulkan loader (libvulkan.so.1) and no VULKAN_DEBS to unpack one from" >&2
    fi
}

run() {
    mkdir -p "$OUT"
    [ -f "$BUNDLE/bundle.tar.xz" ] || { echo "no $BUNDLE/bundle.tar.xz: run '$0 pack' first" >&2; exit 2; }
    vulkan_loader
    local work; work="$(mktemp -d)"
    tar -C "$work" -xJf "$BUNDLE/bundle.tar.xz"
    local built_at; built_at="$(cat "$work/bin/built-at")"
    # Put the repository where the binaries were built, and the CLI where the tests look for it.
    if [ "$built_at" != "$ROOT" ] && [ ! -e "$built_at" ]; then
        mkdir -p "$(dirname "$built_at")" && ln -s "$ROOT" "$built_at"
    fi
    mkdir -p "$built_at/target/release"
    cp "$work/bin/shaderformer" "$built_at/target/release/shaderformer"
    export SHADERFORMER_REQUIRE_GPU=1 XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
    SHADERFORMER_CACHE_DIR="$(mktemp -d)"; export SHADERFORMER_CACHE_DIR
    "$work/bin/shaderformer" devices > "$OUT/device.txt" 2>&1
    cat "$OUT/device.txt"

    local deadline=$(( $(date +%s) + ${TEST_SECONDS:-300} ))
    : > "$OUT/tests.txt"
    for t in "$work"/bin/tests/*; do
        local left=$(( deadline - $(date +%s) ))
        if [ "$left" -le 0 ]; then echo "$(basename "$t") not run: out of time" >> "$OUT/tests.txt"; continue; fi
        local t0; t0=$(date +%s)
        echo "== $(basename "$t")" >> "$OUT/tests.log"
        if (cd "$built_at" && timeout "$left" "$t" >> "$OUT/tests.log" 2>&1); then r=passed; else r="failed ($?)"; fi
        echo "$(basename "$t") $r $(( $(date +%s) - t0 )) s" | tee -a "$OUT/tests.txt"
    done

    timeout "${BENCH_SECONDS:-240}" "$work/bin/shaderformer" bench --suite full --json "$OUT/suite.json" \
        > "$OUT/suite.txt" 2>&1
    echo "bench --suite full: exit $?"
    tail -40 "$OUT/suite.txt"
    echo "tests:"; cat "$OUT/tests.txt"
}

case "${1:-all}" in
    pack) pack ;;
    run) run ;;
    all) pack && run ;;
    *) echo "usage: $0 [pack|run]" >&2; exit 2 ;;
esac
