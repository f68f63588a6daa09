#!/usr/bin/env bash
# Serves the built page (web/build.sh) on http://127.0.0.1:${1:-8000}/ (a browser allows WebGPU
# on localhost without HTTPS).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f pkg/shaderformer_web_bg.wasm ]; then
    echo "web/pkg is missing: run web/build.sh first" >&2
    exit 1
fi
port="${1:-8000}"
echo "serving http://127.0.0.1:$port/"
exec python3 -m http.server --bind 127.0.0.1 "$port"
