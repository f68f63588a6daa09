#!/usr/bin/env python3
"""Screenshot of the page after training (assets/web/page.png), by headless Chromium.

Serves web/ on 127.0.0.1 and opens /?demo=train&steps=N: the page trains the addition model with
its default settings and N steps, and an image it requests is answered only once training is done,
which holds the page's load event; `chromium --screenshot` waits for that event.

    web/build.sh && scripts/web_screenshot.py [--steps 300] [--form n_layer=1&n_embd=32] [--out PATH]
"""
import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 1x1 transparent GIF.
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--form", default="", help="more of the form's fields, as in a query: n_layer=1&n_embd=32")
    ap.add_argument("--out", default=os.path.join(ROOT, "assets/web/page.png"))
    ap.add_argument("--size", default="900,1000", help="window width,height")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds")
    args = ap.parse_args()

    done = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/demo/hold":
                done.wait(args.timeout)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(PIXEL)))
                self.end_headers()
                self.wfile.write(PIXEL)
            else:
                super().do_GET()

        def do_POST(self):
            if self.path == "/demo/done":
                done.set()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    handler = functools.partial(Handler, directory=os.path.join(ROOT, "web"))
    Handler.extensions_map = {**Handler.extensions_map, ".wasm": "application/wasm", ".js": "text/javascript"}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/?demo=train&steps={args.steps}"
    if args.form:
        url += "&" + args.form

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            args.chromium, "--headless=new", "--no-sandbox", "--enable-unsafe-webgpu",
            "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={args.size}", f"--screenshot={os.path.abspath(args.out)}", url,
        ]
        r = subprocess.run(cmd, timeout=args.timeout + 60, capture_output=True, text=True)
    server.shutdown()
    if r.returncode != 0 or not done.is_set():
        sys.exit(f"chromium failed (exit {r.returncode}, training done: {done.is_set()}):\n{r.stderr[-2000:]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
