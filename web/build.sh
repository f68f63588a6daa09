#!/usr/bin/env bash
# Builds the page: the wasm module (web crate, wasm32 with wgpu's WebGPU backend) and its
# JavaScript bindings into web/pkg/. Installs the wasm target and wasm-bindgen-cli (at exactly
# the version of the wasm-bindgen crate in Cargo.lock) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
if [ "$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2)" != "$version" ]; then
    # Its own lock file first; a registry that lacks a version locked there (webpki-roots
    # 1.0.11 was missing from one) gets the newest compatible versions instead.
    # --force: cargo's record of installed binaries can outlive the binary itself.
    cargo install --locked --force wasm-bindgen-cli --version "$version" \
        || cargo install --force wasm-bindgen-cli --version "$version"
fi
# The web profile: the dev profile's optimized dependencies without debug info (the fastest
# build to a module of reasonable size).
cargo build -p shaderformer-web --target wasm32-unknown-unknown --profile web
target="${CARGO_TARGET_DIR:-target}"
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
    "$target/wasm32-unknown-unknown/web/shaderformer_web.wasm"
echo "built web/pkg ($(du -sh web/pkg | cut -f1)); serve it with web/serve.sh"
