//! The page (web/, built by web/build.sh) in real headless Chromium on its WebGPU adapter,
//! against the native engine: the same training losses, the same greedy tokens, and a
//! checkpoint saved by the page that the native engine loads.
//!
//! A tiny HTTP server on 127.0.0.1 serves the page and the committed checkpoints and receives
//! the page's report (`POST /report`) and saved files (`POST /upload/NAME`). Without Chromium or
//! the built page the tests are skipped, loudly; with SHADERFORMER_REQUIRE_GPU=1 they fail.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// How long one page may take (SwiftShader compiles every pipeline on the CPU).
const PAGE_TIMEOUT: Duration = Duration::from_secs(600);

fn required() -> bool {
    std::env::var("SHADERFORMER_REQUIRE_GPU").as_deref() == Ok("1")
}

/// Fails under SHADERFORMER_REQUIRE_GPU=1, else says why the test is skipped. Returns false.
fn unavailable(why: &str) -> bool {
    if required() {
        panic!("SHADERFORMER_REQUIRE_GPU=1 but the browser test cannot run: {why}");
    }
    let _ = writeln!(std::io::stderr(), "skipped: browser test: {why}");
    false
}

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SHADERFORMER_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
}

fn ready() -> bool {
    if !Path::new(ROOT)
        .join("web/pkg/shaderformer_web_bg.wasm")
        .is_file()
    {
        return unavailable("web/pkg is not built (run web/build.sh)");
    }
    if chromium().is_none() {
        return unavailable("no chromium on PATH (apt-get install chromium)");
    }
    true
}

/// What the server received from the page.
enum Received {
    Report(Value),
    Upload(String, Vec<u8>),
}

struct Server {
    port: u16,
    rx: mpsc::Receiver<Received>,
}

fn content_type(path: &str) -> &'static str {
    if path == "/" {
        return "text/html; charset=utf-8";
    }
    match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript",
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// Serves `/` from web/ and `/assets/...` from assets/; nothing outside them.
fn serve_file(path: &str) -> Option<Vec<u8>> {
    if path.contains("..") {
        return None;
    }
    let file = match path {
        "/" => Path::new(ROOT).join("web/index.html"),
        p if p.starts_with("/assets/") => Path::new(ROOT).join(&p[1..]),
        p => Path::new(ROOT).join("web").join(&p[1..]),
    };
    std::fs::read(file).ok()
}

fn handle(mut stream: TcpStream, tx: &mpsc::Sender<Received>) -> std::io::Result<()> {
    // A connection the browser opens ahead of need may stay silent: drop it after a while.
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = target.split('?').next().unwrap_or("/");
    let (status, ctype, reply) = match (method, path) {
        ("POST", "/report") => {
            let v = serde_json::from_slice(&body).unwrap_or_else(
                |e| serde_json::json!({"error": format!("report is not JSON: {e}")}),
            );
            let _ = tx.send(Received::Report(v));
            ("200 OK", "text/plain", b"ok".to_vec())
        }
        ("POST", p) if p.starts_with("/upload/") => {
            let _ = tx.send(Received::Upload(p["/upload/".len()..].to_string(), body));
            ("200 OK", "text/plain", b"ok".to_vec())
        }
        ("GET", p) => match serve_file(p) {
            Some(bytes) => ("200 OK", content_type(p), bytes),
            None => ("404 Not Found", "text/plain", b"not found".to_vec()),
        },
        _ => ("405 Method Not Allowed", "text/plain", Vec::new()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        reply.len()
    )?;
    stream.write_all(&reply)
}

fn start_server() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || handle(stream, &tx));
        }
    });
    Server { port, rx }
}

/// Kills the browser when the test ends, however it ends.
struct Browser(Child, PathBuf);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

impl Browser {
    /// The page's last console messages (Chromium logs them to its stderr), for failures.
    fn console(&self) -> String {
        let log = std::fs::read_to_string(self.1.join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

fn launch(url: &str, tag: &str) -> Browser {
    let profile = std::env::temp_dir().join(format!(
        "shaderformer-chromium-{}-{tag}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).unwrap();
    let log = std::fs::File::create(profile.join("chromium.log")).unwrap();
    let child = Command::new(chromium().expect("checked by ready()"))
        .args([
            "--headless=new",
            "--no-sandbox",
            "--enable-unsafe-webgpu",
            "--use-webgpu-adapter=swiftshader",
            "--enable-features=Vulkan",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=800,900",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start chromium: {e}"));
    Browser(child, profile)
}

/// Opens the page with `query` and returns its report and the files it uploaded.
fn run_page(query: &str, tag: &str) -> (Value, HashMap<String, Vec<u8>>) {
    let server = start_server();
    let url = format!("http://127.0.0.1:{}/?{query}", server.port);
    let mut browser = launch(&url, tag);
    let mut files = HashMap::new();
    let deadline = std::time::Instant::now() + PAGE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match server.rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(Received::Report(v)) => {
                if let Some(e) = v.get("error") {
                    panic!("the page reported an error: {e}");
                }
                return (v, files);
            }
            Ok(Received::Upload(name, bytes)) => {
                files.insert(name, bytes);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = browser.0.try_wait() {
                    panic!(
                        "chromium exited ({status}) before the page reported; console:\n{}",
                        browser.console()
                    );
                }
                if left.is_zero() {
                    panic!(
                        "the page did not report within {PAGE_TIMEOUT:?}: {url}; console:\n{}",
                        browser.console()
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the test server stopped"),
        }
    }
}

mod common;

use shaderformer::gpu::tuning_cache::ENV_CACHE_DIR;

/// `shaderformer` with `args` and the environment variables `env`, which must succeed.
fn native_with(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let o = common::bin()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run shaderformer");
    assert!(
        o.status.success(),
        "shaderformer {args:?} failed:\n{}",
        common::text(&o)
    );
    o
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("browser", name)
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The native `sample --greedy --json` of `dir` on `prompt`: the generated ids, with the fixed
/// rules' kernels, or with those of the tuning cache `kernels` (see `page_kernels_cache`).
fn native_greedy(dir: &Path, prompt: &str, n: usize, kernels: Option<&Path>) -> Vec<u64> {
    ids(&native_sample(dir, prompt, n, kernels, &[])["ids"])
}

/// `sample --greedy --json` of `prompt` on the checkpoint `dir`, with `extra` flags.
fn native_sample(
    dir: &Path,
    prompt: &str,
    n: usize,
    kernels: Option<&Path>,
    extra: &[&str],
) -> Value {
    let env: Vec<(&str, &std::ffi::OsStr)> = kernels
        .map(|k| (ENV_CACHE_DIR, k.as_os_str()))
        .into_iter()
        .collect();
    let n = n.to_string();
    let mut args = vec![
        "--tune",
        if kernels.is_some() { "cached" } else { "off" },
        "sample",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        &n,
        "--greedy",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = native_with(&args, &env);
    serde_json::from_slice(&o.stdout).expect("sample --json prints JSON")
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id"))
        .collect()
}

/// Losses from SwiftShader (the page) and from the native adapter (lavapipe here) must agree to
/// the issue's bound over 20 steps of the same run. Both run the same WGSL in IEEE f32 and the
/// kernels reduce in a fixed order, so only the drivers' exp/tanh and fused multiply-adds can
/// differ: on this machine the worst difference measured was 2.4e-7. The page tunes its kernels,
/// and variants sum in different orders, so the native run computes every problem with the
/// page's variant (`page_kernels_cache`): the bound stays the same-kernels bound.
const LOSS_TOLERANCE: f32 = 1e-4;

/// The (step, loss) pairs the page reported, checked to be steps 1..=steps.
fn page_losses(report: &Value, steps: u64) -> Vec<(u64, f32)> {
    let page: Vec<(u64, f32)> = report["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(
        page.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>(),
        "the page reported steps {page:?}"
    );
    page
}

/// (step, loss) pairs.
type Losses = Vec<(u64, f32)>;

/// A tuning cache in `dir` for the native adapter holding the variant the page used for each
/// problem (`kernels`: the page's report, "family: problem" to variant), so that a native run
/// with `--tune cached` and SHADERFORMER_CACHE_DIR=`dir` computes with the page's kernels.
fn page_kernels_cache(kernels: &Value, dir: &Path) {
    use shaderformer::gpu::tuning_cache::{Choice, Tuner};
    use shaderformer::gpu::{Gpu, GpuOptions, TuneMode};
    let gpu = Gpu::new(&GpuOptions {
        tune: TuneMode::Off,
        ..GpuOptions::from_env()
    })
    .expect("the native adapter");
    let tuner = Tuner::new(TuneMode::Cached, gpu.tuner.identity().clone(), Some(dir));
    let kernels = kernels.as_object().expect("the page's kernels");
    assert!(!kernels.is_empty(), "the page reported no kernels");
    for (key, variant) in kernels {
        let (family, problem) = key.split_once(": ").expect("family: problem");
        let variant = variant.as_str().expect("a variant").to_string();
        tuner.record(Choice {
            family: family.into(),
            problem: problem.into(),
            shape: problem.into(),
            winner: variant.clone(),
            rule: variant.clone(),
            times: vec![(variant, 0.0)],
            rejected: vec![],
            flops: 0,
            bytes: 0,
        });
    }
}

/// Runs `shaderformer train` with `flags` (and per-step metrics), computing each problem with
/// the page's kernel variant (`kernels`, see `page_kernels_cache`), and returns its losses and
/// its validation losses.
fn native_losses(flags: &[&str], kernels: &Value, dir: &Path) -> (Losses, Losses) {
    let cache = dir.join("kernels");
    page_kernels_cache(kernels, &cache);
    let lines = native_metrics(
        &["--tune", "cached"],
        flags,
        &dir.join("out"),
        &[(ENV_CACHE_DIR, cache.as_os_str())],
    );
    let pick = |key: &str| -> Losses {
        lines
            .iter()
            .filter(|v| v.get(key).is_some())
            .map(|v| (v["step"].as_u64().unwrap(), v[key].as_f64().unwrap() as f32))
            .collect()
    };
    (pick("loss"), pick("val_loss"))
}

/// `shaderformer <global> train <flags>` into `out` with the environment `env`, logging every
/// step without samples: the lines of its metrics file.
fn native_metrics(
    global: &[&str],
    flags: &[&str],
    out: &Path,
    env: &[(&str, &std::ffi::OsStr)],
) -> Vec<Value> {
    let metrics = out.join("metrics.jsonl");
    let mut args = global.to_vec();
    args.push("train");
    args.extend_from_slice(flags);
    args.extend_from_slice(&[
        "--log-interval",
        "1",
        "--sample-tokens",
        "0",
        "--metrics",
        metrics.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    native_with(&args, env);
    std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

/// The page's evaluations: (step, validation loss) pairs.
fn page_vals(report: &Value) -> Vec<(u64, f32)> {
    report["val"]
        .as_array()
        .expect("val")
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
        .collect()
}

/// Trains natively with `flags` (the page's kernels, in `dir`) and asserts the page's losses
/// (`page`) and its evaluations are native's, step by step.
fn assert_page_trains_as_native(report: &Value, page: &[(u64, f32)], flags: &[&str], dir: &Path) {
    let (native, native_vals) = native_losses(flags, &report["kernels"], dir);
    let adapter = &report["adapter"]["name"];
    assert_same_losses(page, &native, adapter);
    assert_same_losses(&page_vals(report), &native_vals, adapter);
}

/// Asserts the page's losses are the native ones within LOSS_TOLERANCE, step by step.
fn assert_same_losses(page: &[(u64, f32)], native: &[(u64, f32)], adapter: &Value) {
    assert!(!page.is_empty());
    assert_eq!(
        native.iter().map(|n| n.0).collect::<Vec<_>>(),
        page.iter().map(|p| p.0).collect::<Vec<_>>(),
        "steps: page {page:?}, native {native:?}"
    );
    let worst = page
        .iter()
        .zip(native)
        .map(|(p, n)| (p.1 - n.1).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "adapter {adapter}: worst loss difference over {} values {worst:e}; page {page:?}; native {native:?}",
        page.len()
    );
    for (p, n) in page.iter().zip(native) {
        assert!(
            (p.1 - n.1).abs() <= LOSS_TOLERANCE,
            "step {}: page loss {} vs native {} (bound {LOSS_TOLERANCE})",
            p.0,
            p.1,
            n.1
        );
    }
}

#[test]
fn page_trains_like_the_native_engine_and_saves_a_checkpoint_it_loads() {
    if !ready() {
        return;
    }
    let steps = 20;
    let settings = serde_json::json!({
        "seed": 7, "steps": steps, "lr": 0.003, "n_layer": 1, "n_head": 2, "n_embd": 32,
        "batch_size": 8, "eval_iters": 1,
    });
    let (report, files) = run_page(
        &format!(
            "test=train&eval_every=10&settings={}",
            query_escape(&settings.to_string())
        ),
        "train",
    );
    let page = page_losses(&report, steps);
    // The page measured its kernels before training, and said so.
    let tuned = report["tuned"]
        .as_u64()
        .expect("the page reports how many kernels it tuned");
    assert!(tuned > 0, "the page tuned no kernels: {report}");
    eprintln!("the page tuned {tuned} problems: {}", report["kernels"]);
    let shown = report["tuned_shown"].as_str().unwrap_or_default();
    assert!(shown.ends_with(" tuned"), "the page shows {shown:?}");
    let dir = scratch("native-train");
    assert_page_trains_as_native(
        &report,
        &page,
        &[
            "--eval-interval",
            "10",
            "--seed",
            "7",
            "--max-iters",
            &steps.to_string(),
            "--lr",
            "0.003",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--batch-size",
            "8",
            "--eval-iters",
            "1",
        ],
        &dir,
    );
    let samples = report["samples"].as_str().unwrap();
    assert!(
        samples.starts_with("step 20: 74+58="),
        "the page shows {samples:?}"
    );

    // The page's checkpoint loads natively and gives the page's own greedy completion.
    let saved = scratch("page-checkpoint");
    for name in ["config.json", "model.safetensors", "vocab.json"] {
        let bytes = files
            .get(name)
            .unwrap_or_else(|| panic!("the page saved no {name}: {:?}", files.keys()));
        std::fs::write(saved.join(name), bytes).unwrap();
    }
    let sample = &report["sample"];
    let prompt = sample["prompt"].as_str().unwrap();
    let want = ids(&sample["ids"]);
    assert_eq!(
        native_greedy(&saved, prompt, want.len(), Some(&dir.join("kernels"))),
        want
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&saved);
}

/// A text to train on: enough characters for a few batches of 32 and a validation split.
fn some_text() -> String {
    let lines = [
        "The river rose in the night and the mill wheel turned faster than it ever had.",
        "By morning the miller's daughter had counted nine sacks of flour, and a tenth half full.",
        "Nobody in the village could say where so much water had come from; the sky was clear.",
        "An old shepherd said the snow on the far hills had melted all at once, as it did once before.",
    ];
    let mut text = String::new();
    for i in 0..6 {
        for l in &lines {
            text.push_str(l);
            text.push_str(if i % 2 == 0 { "\n" } else { " " });
        }
    }
    text
}

/// 5 steps in the page on `text` (seed 3; 1 layer, 2 heads, C 32, B 4, T 32; an evaluation at
/// the end) with the settings `extra` added, the greedy completion of `prompt` sampled after,
/// asserted to give the losses of `shaderformer train --data` on the same text with the flags
/// `flags` added: the page's report, its saved files and the native run's directory.
fn train_on_text(
    text: &str,
    prompt: &str,
    extra: Value,
    flags: &[&str],
    tag: &str,
) -> (Value, HashMap<String, Vec<u8>>, PathBuf) {
    let steps = 5;
    let mut settings = serde_json::json!({
        "seed": 3, "steps": steps, "n_layer": 1, "n_head": 2, "n_embd": 32, "batch_size": 4,
        "block_size": 32, "eval_iters": 1,
    });
    for (k, v) in extra.as_object().expect("settings") {
        settings[k] = v.clone();
    }
    let (report, files) = run_page(
        &format!(
            "test=train&eval_every=5&settings={}&text={}&prompt={}",
            query_escape(&settings.to_string()),
            query_escape(text),
            query_escape(prompt)
        ),
        tag,
    );
    let page = page_losses(&report, steps);
    let dir = scratch(&format!("native-{tag}"));
    let data = dir.join("text.txt");
    std::fs::write(&data, text).unwrap();
    let mut args = flags.to_vec();
    let steps_flag = steps.to_string();
    args.extend_from_slice(&[
        "--eval-interval",
        "5",
        "--data",
        data.to_str().unwrap(),
        "--seed",
        "3",
        "--max-iters",
        &steps_flag,
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--batch-size",
        "4",
        "--block-size",
        "32",
        "--eval-iters",
        "1",
    ]);
    assert_page_trains_as_native(&report, &page, &args, &dir);
    (report, files, dir)
}

/// The page trains on a text (character vocabulary) as `shaderformer train --data` does on the
/// same text in a file: same vocabulary, batches and losses.
#[test]
fn page_trains_on_a_text_like_train_with_data() {
    if !ready() {
        return;
    }
    let text = some_text();
    let (report, files, dir) = train_on_text(&text, "T", serde_json::json!({}), &[], "text");
    // A sample of the text's characters, after the page's evaluation.
    let samples = report["samples"].as_str().unwrap();
    assert!(
        samples.starts_with("step 5:\nT"),
        "the page shows {samples:?}"
    );
    // Up to 200 characters, so here until the context is full: the prompt's character and one
    // predicted at each of the 32 positions, every one the text's.
    let sample = &samples["step 5:\n".len()..];
    assert_eq!(sample.chars().count(), 1 + 32, "the page shows {samples:?}");
    assert!(sample.chars().all(|c| text.contains(c)), "{samples:?}");
    // The vocabulary the page saved is the one the native run built from the file.
    let saved = files.get("vocab.json").expect("the page saved vocab.json");
    let native_vocab = std::fs::read(dir.join("out/vocab.json")).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(saved).unwrap(),
        serde_json::from_slice::<Value>(&native_vocab).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The page trains a Llama model from scratch (grouped-query attention: 2 heads sharing one
/// key/value head), its blocks recomputed and its saved activations in bf16, on a text as
/// `shaderformer train --arch llama --data --recompute block --activation-dtype bf16` does: same
/// losses and evaluations; the checkpoint it saves is a Llama one that the native engine loads
/// and completes a prompt with as the page did.
#[test]
fn page_trains_a_llama_on_a_text_like_train_arch_llama() {
    if !ready() {
        return;
    }
    let extra = serde_json::json!({
        "arch": "llama", "n_kv_head": 1, "recompute": "block", "activation_dtype": "bf16",
    });
    let flags = [
        "--arch",
        "llama",
        "--n-kv-head",
        "1",
        "--recompute",
        "block",
        "--activation-dtype",
        "bf16",
    ];
    let text = some_text();
    let (report, files, dir) = train_on_text(&text, "The", extra, &flags, "llama");
    let saved = scratch("page-llama");
    for (name, bytes) in &files {
        std::fs::write(saved.join(name), bytes).unwrap();
    }
    let config: Value = serde_json::from_slice(&files["config.json"]).unwrap();
    assert_eq!(config["model_type"], "llama", "{config}");
    assert_eq!(config["num_key_value_heads"], 1, "{config}");
    let sample = &report["sample"];
    let want = ids(&sample["ids"]);
    assert_eq!(want.len(), 4, "{sample}");
    assert_eq!(
        native_greedy(&saved, "The", want.len(), Some(&dir.join("kernels"))),
        want
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&saved);
}

/// The page fine-tunes a Llama-family checkpoint (qwen2-tiny, opened from its files) with LoRA
/// on a text as `shaderformer train --init qwen2-tiny --lora-r` does: same losses step by step,
/// same evaluations; the adapter it saves is peft's layout, and the checkpoint opened with that
/// adapter completes a prompt as `sample --lora` does.
#[test]
fn page_fine_tunes_a_checkpoint_with_lora_like_train() {
    if !ready() {
        return;
    }
    let steps = 4;
    let text = some_text();
    let files =
        "config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json";
    let settings = serde_json::json!({
        "seed": 5, "steps": steps, "lr": 0.01, "batch_size": 2, "block_size": 16,
        "warmup_iters": 0, "eval_iters": 1, "lora_r": 4, "lora_alpha": 64,
        "lora_targets": "q_proj,v_proj,down_proj",
    });
    let (report, saved) = run_page(
        &format!(
            "test=lora&eval_every=4&checkpoint=/assets/qwen2-tiny&files={files}&settings={}&text={}&prompt={}",
            query_escape(&settings.to_string()),
            query_escape(&text),
            query_escape("The river")
        ),
        "lora",
    );
    assert_eq!(report["describe"]["lora"]["layers"], 6, "{report}");
    let page = page_losses(&report, steps);
    let dir = scratch("native-lora");
    let data = dir.join("text.txt");
    std::fs::write(&data, &text).unwrap();
    let base = Path::new(ROOT).join("assets/qwen2-tiny");
    assert_page_trains_as_native(
        &report,
        &page,
        &[
            "--init",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--seed",
            "5",
            "--max-iters",
            &steps.to_string(),
            "--eval-interval",
            "4",
            "--lr",
            "0.01",
            "--warmup-iters",
            "0",
            "--batch-size",
            "2",
            "--block-size",
            "16",
            "--eval-iters",
            "1",
            "--lora-r",
            "4",
            "--lora-alpha",
            "64",
            "--lora-targets",
            "q_proj,v_proj,down_proj",
        ],
        &dir,
    );
    // The page's adapter: peft's two files, which sample --lora takes.
    let adapter = dir.join("page-adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let bytes = saved
            .get(name)
            .unwrap_or_else(|| panic!("the page saved no {name}"));
        std::fs::write(adapter.join(name), bytes).unwrap();
    }
    let cache = dir.join("kernels");
    let want = native_sample(
        &base,
        "The river",
        8,
        Some(&cache),
        &["--lora", adapter.to_str().unwrap()],
    );
    let page = &report["generation"];
    assert!(!ids(&page["ids"]).is_empty(), "{report}");
    assert_eq!(
        ids(&page["ids"]),
        ids(&want["ids"]),
        "page vs native greedy ids"
    );
    let plain = native_sample(&base, "The river", 8, Some(&cache), &[]);
    assert_ne!(
        ids(&plain["ids"]),
        ids(&want["ids"]),
        "the adapter changes nothing"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn page_samples_greedily_like_the_native_engine() {
    if !ready() {
        return;
    }
    let (prompt, n) = ("The quick brown fox", 12);
    let options = serde_json::json!({"greedy": true, "max_new_tokens": n});
    let (report, _) = run_page(
        &format!(
            "test=sample&checkpoint=/assets/gpt2-bpe&files=config.json,model.safetensors,tokenizer.json&prompt={}&options={}",
            query_escape(prompt),
            query_escape(&options.to_string())
        ),
        "sample",
    );
    let page = ids(&report["generation"]["ids"]);
    assert_eq!(page.len(), n);
    let want = native_greedy(&Path::new(ROOT).join("assets/gpt2-bpe"), prompt, n, None);
    assert_eq!(page, want, "page vs native greedy ids");
}

/// A Llama-family checkpoint (qwen2-tiny: grouped-query attention, q/k/v biases, a chat
/// template, two eos ids) opened from its files: the page's greedy ids equal the native
/// engine's, for a plain prompt and for a chat with a system message (the same rendered prompt).
#[test]
fn page_runs_a_qwen2_checkpoint_like_the_native_engine() {
    if !ready() {
        return;
    }
    let dir = Path::new(ROOT).join("assets/qwen2-tiny");
    let files =
        "config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json";
    let (prompt, system, n) = ("Hello there, how are you?", "Answer briefly.", 16);
    for chat in [false, true] {
        let mut options = serde_json::json!({"greedy": true, "max_new_tokens": n});
        let mut extra = Vec::new();
        if chat {
            options["chat"] = true.into();
            options["system"] = system.into();
            extra = vec!["--chat", "--system", system];
        }
        let (report, _) = run_page(
            &format!(
                "test=sample&checkpoint=/assets/qwen2-tiny&files={files}&prompt={}&options={}",
                query_escape(prompt),
                query_escape(&options.to_string())
            ),
            "sample-qwen2",
        );
        assert!(report.get("error").is_none(), "{report}");
        let page = &report["generation"];
        let want = native_sample(&dir, prompt, n, None, &extra);
        assert_eq!(
            ids(&page["prompt_ids"]),
            ids(&want["prompt_ids"]),
            "chat {chat}: page vs native prompt ids"
        );
        assert!(!ids(&page["ids"]).is_empty(), "{report}");
        assert_eq!(
            ids(&page["ids"]),
            ids(&want["ids"]),
            "chat {chat}: page vs native greedy ids"
        );
    }
}

#[test]
fn page_says_in_words_that_the_device_was_lost() {
    if !ready() {
        return;
    }
    let settings = serde_json::json!({"steps": 10, "n_layer": 1, "n_embd": 32, "n_head": 2});
    let (report, _) = run_page(
        &format!("test=lose&settings={}", query_escape(&settings.to_string())),
        "lose",
    );
    let lost = report["lost"].as_str().unwrap_or_else(|| {
        panic!("the steps after the device was destroyed did not fail: {report}")
    });
    eprintln!("the page says: {lost}");
    assert!(
        lost.starts_with("The GPU device was lost (")
            && lost.ends_with("Reload the page to start again."),
        "{lost}"
    );
}

/// The mean of a page's step times (`step_ms`) after the first `skip` (warm-up).
fn mean_after(step_ms: &Value, skip: usize) -> f64 {
    let ms: Vec<f64> = step_ms
        .as_array()
        .expect("step_ms")
        .iter()
        .skip(skip)
        .map(|x| x.as_f64().unwrap())
        .collect();
    ms.iter().sum::<f64>() / ms.len() as f64
}

/// `train` natively with `flags` (kernel tuning off) into `dir`: its mean wall time per step
/// after the first `skip` steps (warm-up).
fn native_ms_per_step(flags: &[&str], dir: &Path, skip: usize) -> f64 {
    let ms: Vec<f64> = native_metrics(&["--tune", "off"], flags, dir, &[])
        .iter()
        .filter_map(|v| v.get("ms").and_then(Value::as_f64))
        .skip(skip)
        .collect();
    ms.iter().sum::<f64>() / ms.len() as f64
}

/// BENCHMARKS.md's browser rows: training steps/s of the addition model (the page's defaults)
/// and greedy decoding tokens/s of assets/gpt2-bpe, in the page and natively on this machine.
/// Run by hand: `cargo test --test browser -- --ignored --nocapture speed`.
#[test]
#[ignore]
fn speed_in_the_page_and_natively() {
    if !ready() {
        return;
    }
    let steps = 60;
    let settings = serde_json::json!({"seed": 1337, "steps": steps});
    let (report, _) = run_page(
        &format!(
            "test=train&eval_every={steps}&settings={}",
            query_escape(&settings.to_string())
        ),
        "speed-train",
    );
    let dir = scratch("speed");
    let native_ms = native_ms_per_step(
        &["--seed", "1337", "--max-iters", &steps.to_string()],
        &dir.join("train"),
        10,
    );
    let page_ms = mean_after(&report["step_ms"], 10);
    println!(
        "train (addition defaults, {} tokens/step): page {:.1} ms/step ({:.2} steps/s) on {}; native {:.1} ms/step ({:.2} steps/s)",
        report["tokens_per_step"],
        page_ms,
        1e3 / page_ms,
        report["adapter"]["name"],
        native_ms,
        1e3 / native_ms
    );

    // LoRA fine-tuning of gpt2-bpe (r 8 on every linear layer) on a text, page and native.
    let steps = 30;
    let text = some_text();
    let settings = serde_json::json!({
        "seed": 5, "steps": steps, "batch_size": 4, "block_size": 32, "eval_iters": 1,
        "lora_r": 8, "lora_alpha": 16, "lora_targets": "c_attn,c_proj,c_fc",
    });
    let (report, _) = run_page(
        &format!(
            "test=lora&eval_every={steps}&checkpoint=/assets/gpt2-bpe&files=config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json&settings={}&text={}&prompt={}",
            query_escape(&settings.to_string()),
            query_escape(&text),
            query_escape("The river")
        ),
        "speed-lora",
    );
    let data = dir.join("text.txt");
    std::fs::write(&data, &text).unwrap();
    let base = Path::new(ROOT).join("assets/gpt2-bpe");
    let native_ms = native_ms_per_step(
        &[
            "--init",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--seed",
            "5",
            "--max-iters",
            &steps.to_string(),
            "--batch-size",
            "4",
            "--block-size",
            "32",
            "--eval-iters",
            "1",
            "--lora-r",
            "8",
            "--lora-alpha",
            "16",
            "--lora-targets",
            "c_attn,c_proj,c_fc",
        ],
        &dir.join("lora"),
        10,
    );
    let page_ms = mean_after(&report["step_ms"], 10);
    println!(
        "LoRA fine-tuning (gpt2-bpe, r 8 on every linear layer, 4 x 32 tokens/step): page {page_ms:.1} ms/step on {}; native {native_ms:.1} ms/step",
        report["adapter"]["name"],
    );

    let n = 48;
    let options = serde_json::json!({"greedy": true, "max_new_tokens": n});
    let prompt = "The quick brown fox";
    let (report, _) = run_page(
        &format!(
            "test=sample&checkpoint=/assets/gpt2-bpe&files=config.json,model.safetensors,tokenizer.json&prompt={}&options={}",
            query_escape(prompt),
            query_escape(&options.to_string())
        ),
        "speed-sample",
    );
    let page_ms = report["ms"].as_f64().unwrap();
    // Natively the same: the second of two generations, timed.
    let gpu = shaderformer::gpu::Gpu::new(&shaderformer::gpu::GpuOptions {
        tune: shaderformer::gpu::TuneMode::Off,
        ..shaderformer::gpu::GpuOptions::from_env()
    })
    .unwrap();
    let ck =
        shaderformer::train::checkpoint::load(&Path::new(ROOT).join("assets/gpt2-bpe")).unwrap();
    let ids = ck.vocab.as_ref().unwrap().encode(prompt, "prompt").unwrap();
    let mut engine = shaderformer::infer::Engine::new(
        &gpu,
        &ck.cfg,
        &ck.params,
        shaderformer::gpu::DType::F32,
        1,
    )
    .unwrap();
    let opts = shaderformer::infer::SampleOptions {
        greedy: true,
        ..Default::default()
    };
    let mut native_ms = 0.0;
    for _ in 0..2 {
        let mut rng = shaderformer::rng::Rng::new(1337);
        let t0 = std::time::Instant::now();
        shaderformer::infer::generate(&mut engine, &ids, n, &opts, &mut rng, |_, _| Ok(()))
            .unwrap();
        native_ms = t0.elapsed().as_secs_f64() * 1e3;
    }
    println!(
        "decode (gpt2-bpe, {} prompt tokens + {n} greedy tokens, second generation): page {:.0} ms ({:.1} tokens/s); native {:.0} ms ({:.1} tokens/s) on {}",
        ids.len(),
        page_ms,
        n as f64 * 1e3 / page_ms,
        native_ms,
        n as f64 * 1e3 / native_ms,
        gpu.adapter_name()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
