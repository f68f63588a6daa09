//! Mutation fuzzing of every file loader over corrupted copies of the committed fixtures: bit
//! flips, truncations, inserted and overwritten bytes, header length fields set to huge values,
//! JSON values swapped for values of the wrong type. Seeded, so a failure names a case that
//! reproduces. Each case asserts that the loader returns (Ok or an error) without panicking, and
//! that it never holds much more memory than the files it reads: a size declared in a header
//! must be checked against the file before anything that large is allocated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use shaderformer::io::{hf, tokens, vocab::Vocab};
use shaderformer::rng::Rng;
use shaderformer::train::TrainConfig;
use shaderformer::train::checkpoint;
use shaderformer::train::data::{self, Loader, LoaderKind};

// ---------------------------------------------------------------------------------------------
// A global allocator that measures, per thread, the peak of live bytes while a loader runs.

struct Counting;

thread_local! {
    /// (tracking, live bytes, peak live bytes, largest single request), for this thread.
    static TRACK: Cell<(bool, isize, isize, usize)> = const { Cell::new((false, 0, 0, 0)) };
}

/// A single request this large, or this many bytes held at once, while tracking is a loader
/// believing a corrupted size field. Either could take the machine's memory before the loader
/// returns (an allocator cannot unwind), so the binary stops here with a clear message.
const ABSURD: usize = 1 << 34;
const ABSURD_LIVE: isize = 1 << 31;

fn note(delta: isize, request: usize) {
    let _ = TRACK.try_with(|t| {
        let (on, live, peak, largest) = t.get();
        if on {
            let live = live + delta;
            if request >= ABSURD || live >= ABSURD_LIVE {
                let msg = b"fuzz: a loader allocated >= 16 GiB at once or held >= 2 GiB; \
                            stopped (rerun one test with --nocapture to see the case)\n";
                unsafe {
                    libc_write(msg);
                }
                std::process::abort();
            }
            t.set((on, live, peak.max(live), largest.max(request)));
        }
    });
}

unsafe fn libc_write(msg: &[u8]) {
    unsafe extern "C" {
        fn write(fd: i32, buf: *const u8, n: usize) -> isize;
    }
    unsafe {
        write(2, msg.as_ptr(), msg.len());
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize, l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize, l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(-(l.size() as isize), 0);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new as isize - l.size() as isize, new);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

thread_local! {
    static FUZZING: Cell<bool> = const { Cell::new(false) };
}

/// Installs, once, a panic hook that stays silent on threads inside `measured` (the panic is
/// caught and reported with its case) and prints as usual everywhere else.
fn quiet_panics_while_fuzzing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !FUZZING.with(Cell::get) {
                default(info);
            }
        }));
    });
}

/// Runs `f` with panics caught, returning whether it panicked and the peak of the bytes it held.
fn measured<T>(f: impl FnOnce() -> T) -> (std::thread::Result<T>, usize) {
    FUZZING.with(|f| f.set(true));
    TRACK.with(|t| t.set((true, 0, 0, 0)));
    let r = catch_unwind(AssertUnwindSafe(f));
    FUZZING.with(|f| f.set(false));
    let (_, _, peak, _) = TRACK.with(|t| t.replace((false, 0, 0, 0)));
    (r, peak.max(0) as usize)
}

// ---------------------------------------------------------------------------------------------
// Mutations.

fn below(rng: &mut Rng, n: usize) -> usize {
    rng.below(n.max(1) as u64) as usize
}

/// Numbers a corrupted size field likes to hold.
fn huge(rng: &mut Rng) -> u64 {
    const H: [u64; 9] = [
        u64::MAX,
        u64::MAX - 7,
        i64::MAX as u64,
        1 << 32,
        (1 << 32) - 1,
        1 << 40,
        1 << 62,
        u32::MAX as u64 + 8,
        1 << 31,
    ];
    H[below(rng, H.len())]
}

/// One random byte-level corruption of `b`.
fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>) {
    let n = b.len();
    match below(rng, 6) {
        0 => {
            for _ in 0..1 + below(rng, 8) {
                let i = below(rng, n);
                if i < b.len() {
                    b[i] ^= 1 << below(rng, 8);
                }
            }
        }
        1 => b.truncate(below(rng, n)),
        2 => {
            let at = below(rng, n + 1);
            let k = 1 + below(rng, 16);
            let junk: Vec<u8> = (0..k).map(|_| rng.next_u64() as u8).collect();
            b.splice(at..at, junk);
        }
        3 => {
            let at = below(rng, n);
            let end = (at + 1 + below(rng, 64)).min(n);
            for x in &mut b[at..end] {
                *x = rng.next_u64() as u8;
            }
        }
        4 => {
            // A run of ASCII digits (a size, offset or shape in a header) made huge.
            let digits: Vec<usize> = (0..n.min(1 << 16))
                .filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()))
                .collect();
            if !digits.is_empty() {
                let s = digits[below(rng, digits.len())];
                let e = (s..n).find(|&i| !b[i].is_ascii_digit()).unwrap_or(n);
                let v = huge(rng).to_string();
                b.splice(s..e, v.into_bytes());
            }
        }
        _ => {
            let at = below(rng, n);
            b.splice(at..(at + 1).min(n), []);
        }
    }
}

/// A value of some JSON type, often the wrong one for where it lands.
fn wrong_value(rng: &mut Rng) -> Value {
    match below(rng, 11) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!("a string"),
        3 => json!(-1),
        4 => json!(0),
        5 => json!(1e300),
        6 => json!(huge(rng)),
        7 => json!([1, 2, 3]),
        8 => json!({"k": 1}),
        9 => json!(-0.5),
        _ => json!(f64::MIN_POSITIVE),
    }
}

/// Every path (keys and indices) to a value inside `v`.
fn paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(prefix.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                prefix.push(json!(k));
                paths(x, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            // The first few elements stand for the rest (tokenizer.json has thousands).
            for (i, x) in a.iter().enumerate().take(4) {
                prefix.push(json!(i));
                paths(x, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// The value at `path`, if an earlier mutation of this document left it there.
fn at_path<'a>(v: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| match k {
        Value::String(s) => v.get_mut(s.as_str()),
        k => v.get_mut(k.as_u64().unwrap() as usize),
    })
}

/// One random structural corruption of a JSON document: a value swapped for one of another type,
/// or a key removed.
fn mutate_json(rng: &mut Rng, doc: &Value) -> Vec<u8> {
    let mut v = doc.clone();
    let mut all = Vec::new();
    paths(&v, &mut Vec::new(), &mut all);
    for _ in 0..1 + below(rng, 2) {
        let p = all[below(rng, all.len())].clone();
        if p.is_empty() {
            continue;
        }
        if below(rng, 4) == 0
            && let (Some(Value::String(key)), parent) = (p.last(), &p[..p.len() - 1])
            && let Some(Value::Object(m)) = at_path(&mut v, parent)
        {
            m.remove(key);
            continue;
        }
        if let Some(x) = at_path(&mut v, &p) {
            *x = wrong_value(rng);
        }
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

/// A corrupted copy of `original`: byte mutations, or (for JSON) structural ones.
fn corrupt(rng: &mut Rng, original: &[u8], json: Option<&Value>) -> Vec<u8> {
    if let Some(doc) = json
        && below(rng, 2) == 0
    {
        return mutate_json(rng, doc);
    }
    let mut b = original.to_vec();
    for _ in 0..1 + below(rng, 3) {
        mutate_bytes(rng, &mut b);
    }
    b
}

/// A corrupted safetensors file: mostly its 8-byte header length or its JSON header.
fn corrupt_safetensors(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let mut b = original.to_vec();
    match below(rng, 4) {
        0 => {
            let v = match below(rng, 3) {
                0 => huge(rng),
                1 => b.len() as u64 - 8 + below(rng, 3) as u64,
                _ => rng.next_u64() % (b.len() as u64 * 2),
            };
            b[..8].copy_from_slice(&v.to_le_bytes());
        }
        1 => {
            let header: Value = serde_json::from_slice(&original[8..8 + header_len]).unwrap();
            let mut h = mutate_json(rng, &header);
            if below(rng, 2) == 0 {
                // Keep the length field consistent so the parser reaches the values.
                h.resize(h.len().max(header_len), b' ');
            }
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            out.extend_from_slice(&original[8 + header_len..]);
            b = out;
        }
        2 => {
            // Byte mutations inside the header only.
            let mut h = original[8..8 + header_len].to_vec();
            mutate_bytes(rng, &mut h);
            let keep_len = below(rng, 2) == 0;
            let len = if keep_len { header_len } else { h.len() } as u64;
            h.resize(h.len().max(header_len), b' ');
            let mut out = len.to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            out.extend_from_slice(&original[8 + header_len..]);
            b = out;
        }
        _ => mutate_bytes(rng, &mut b),
    }
    b
}

// ---------------------------------------------------------------------------------------------
// The harness.

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shaderformer-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Bytes a loader may hold beyond a fixed allowance, per byte of input: the f32 values of an f16
/// file, a transposed copy, maps over the names.
const PER_INPUT_BYTE: usize = 16;
/// Allowance independent of the input (parsers' tables, a tokenizer's regexes).
const FIXED: usize = 48 << 20;

/// Runs `cases` corrupted inputs through `load`: `make(rng, case)` writes the case's files and
/// returns their total size. Fails on the first panic or over-allocation, naming the case.
fn fuzz<T>(
    what: &str,
    seed: u64,
    cases: usize,
    mut make: impl FnMut(&mut Rng) -> usize,
    mut load: impl FnMut() -> T,
) -> (usize, usize) {
    let mut rng = Rng::new(seed);
    let (mut ok, mut peak_max) = (0, 0);
    quiet_panics_while_fuzzing();
    let mut failure = None;
    for case in 0..cases {
        let input = make(&mut rng);
        if std::env::var_os("FUZZ_VERBOSE").is_some() {
            eprintln!("{what}: case {case}");
        }
        let (r, peak) = measured(&mut load);
        peak_max = peak_max.max(peak);
        let limit = FIXED + PER_INPUT_BYTE * input;
        match r {
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failure = Some(format!("{what}: case {case} (seed {seed}) panicked: {msg}"));
                break;
            }
            Ok(_) if peak > limit => {
                failure = Some(format!(
                    "{what}: case {case} (seed {seed}) held {peak} bytes for {input} bytes of input"
                ));
                break;
            }
            Ok(_) => ok += 1,
        }
    }
    if let Some(f) = failure {
        panic!("{f}");
    }
    eprintln!("{what}: {ok} cases, peak {peak_max} bytes");
    (ok, peak_max)
}

fn write(path: &Path, bytes: &[u8]) -> usize {
    std::fs::write(path, bytes).unwrap();
    bytes.len()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Copies the tiny GPT-2 checkpoint (config.json, model.safetensors) into `dir`.
fn tiny_checkpoint(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let src = assets().join("gpt2-tiny");
    let config = read(&src.join(hf::CONFIG_FILE));
    let weights = read(&src.join(hf::WEIGHTS_FILE));
    write(&dir.join(hf::CONFIG_FILE), &config);
    write(&dir.join(hf::WEIGHTS_FILE), &weights);
    (config, weights)
}

// ---------------------------------------------------------------------------------------------
// The loaders.

#[test]
fn safetensors_reader_survives_corruption() {
    let dir = scratch("safetensors");
    let original = read(&assets().join("gpt2-tiny/fixture.safetensors"));
    let path = dir.join("x.safetensors");
    fuzz(
        "safetensors",
        1,
        1500,
        |rng| write(&path, &corrupt_safetensors(rng, &original)),
        || hf::read_safetensors(&path).map(|m| m.len()),
    );
}

#[test]
fn checkpoint_weights_survive_corruption() {
    let dir = scratch("weights");
    let (config, original) = tiny_checkpoint(&dir);
    let path = dir.join(hf::WEIGHTS_FILE);
    fuzz(
        "model.safetensors",
        2,
        600,
        |rng| config.len() + write(&path, &corrupt_safetensors(rng, &original)),
        || checkpoint::load(&dir).map(|c| c.params.len()),
    );
}

#[test]
fn config_json_survives_corruption() {
    let dir = scratch("config");
    let (original, weights) = tiny_checkpoint(&dir);
    let doc = json_of(&original);
    let path = dir.join(hf::CONFIG_FILE);
    fuzz(
        "config.json",
        3,
        600,
        |rng| weights.len() + write(&path, &corrupt(rng, &original, Some(&doc))),
        || checkpoint::load(&dir).map(|c| c.params.len()),
    );
    let path2 = assets().join("gpt2-bpe");
    let bpe = read(&path2.join(hf::CONFIG_FILE));
    let doc = json_of(&bpe);
    fuzz(
        "config.json (read_config)",
        4,
        600,
        |rng| write(&path, &corrupt(rng, &bpe, Some(&doc))),
        || hf::read_config(&dir).map(|c| c.num_params()),
    );
}

/// A trainer_state.json as `train` writes it (its step, the loader's state, the settings).
fn trainer_state() -> Value {
    let mut loader = Loader::new(LoaderKind::Random, 4, 8, 1337);
    let data: Vec<u32> = (0..200).collect();
    loader.next(&data);
    json!({
        "step": 1,
        "loader": loader.state(),
        "data_description": "fuzz",
        "config": TrainConfig::default().settings(),
    })
}

#[test]
fn trainer_state_survives_corruption() {
    let dir = scratch("state");
    let doc = trainer_state();
    let original = serde_json::to_vec_pretty(&doc).unwrap();
    let path = dir.join(checkpoint::STATE_FILE);
    let data: Vec<u32> = (0..200).collect();
    fuzz(
        "trainer_state.json",
        5,
        1500,
        |rng| write(&path, &corrupt(rng, &original, Some(&doc))),
        || -> shaderformer::Result<usize> {
            let state = checkpoint::read_state(&dir)?;
            let cfg = TrainConfig::default().with_settings(&state.config);
            let mut loader = Loader::new(cfg.loader, 4, 8, cfg.seed);
            loader.restore(&state.loader)?;
            Ok(loader.next(&data).tokens.len())
        },
    );
}

#[test]
fn vocabularies_survive_corruption() {
    let dir = scratch("vocab");
    Vocab::chars_of("To be, or not to be: that is the question.\n")
        .save(&dir)
        .unwrap();
    let path = dir.join(shaderformer::io::vocab::CHAR_VOCAB_FILE);
    let chars = read(&path);
    let doc = json_of(&chars);
    let ids = serde_json::to_vec(&json!({"type": "ids", "size": 50257})).unwrap();
    let ids_doc = json_of(&ids);
    fuzz(
        "vocab.json",
        6,
        1500,
        |rng| {
            let (b, d) = if below(rng, 2) == 0 {
                (&chars, &doc)
            } else {
                (&ids, &ids_doc)
            };
            write(&path, &corrupt(rng, b, Some(d)))
        },
        || Vocab::load(&dir).map(|v| v.map(|v| v.size())),
    );
}

#[test]
fn tokenizer_json_survives_corruption() {
    let dir = scratch("tokenizer");
    let original = read(
        &assets()
            .join("gpt2-bpe")
            .join(shaderformer::io::vocab::TOKENIZER_FILE),
    );
    let doc = json_of(&original);
    let path = dir.join(shaderformer::io::vocab::TOKENIZER_FILE);
    fuzz(
        "tokenizer.json",
        7,
        400,
        |rng| write(&path, &corrupt(rng, &original, Some(&doc))),
        || {
            Vocab::load(&dir).map(|v| {
                let v = v.expect("a tokenizer.json is a vocabulary");
                // A tokenizer that loads must also encode and decode.
                let ids = v.encode("Hello, world", "fuzz").unwrap_or_default();
                (v.size(), v.decode(&ids).len())
            })
        },
    );
}

/// The tokens of the BPE fixture's text, as a token file would hold them.
fn fixture_tokens() -> Vec<u16> {
    let text = std::fs::read_to_string(assets().join("gpt2-bpe/score.txt")).unwrap();
    text.bytes().map(|b| b as u16 * 97).collect()
}

#[test]
fn token_files_survive_corruption() {
    let dir = scratch("tokens");
    let toks = fixture_tokens();
    let llmc_path = dir.join("a.llmc");
    tokens::write_llmc(&llmc_path, &toks).unwrap();
    let llmc = read(&llmc_path);
    let nanogpt: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
    let bin_path = dir.join("b.bin");
    fuzz(
        "llm.c token file",
        8,
        1500,
        |rng| {
            let mut b = llmc.clone();
            if below(rng, 3) == 0 {
                // The token count field (header word 2) and the version (word 1).
                let word = 1 + below(rng, 2);
                let v = huge(rng) as u32;
                b[4 * word..4 * word + 4].copy_from_slice(&v.to_le_bytes());
            } else {
                mutate_bytes(rng, &mut b);
            }
            write(&llmc_path, &b)
        },
        || data::read_contents(&llmc_path).map(|_| ()),
    );
    fuzz(
        "nanoGPT token file",
        9,
        1500,
        |rng| write(&bin_path, &corrupt(rng, &nanogpt, None)),
        || match data::read_contents(&bin_path) {
            Ok(data::Contents::Tokens(t)) => Ok(t.len()),
            Ok(data::Contents::Text(_)) => panic!("a .bin file read as text"),
            Err(e) => Err(e),
        },
    );
}

#[test]
fn the_allocation_counter_sees_a_large_allocation() {
    // Guards the guard: an allocation of 64 MiB while tracking shows up as a peak that large.
    let (r, peak) = measured(|| vec![1u8; 64 << 20].len());
    assert_eq!(r.unwrap(), 64 << 20);
    assert!(peak >= 64 << 20, "peak {peak}");
    let (r, _) = measured(|| -> usize { panic!("caught") });
    assert!(r.is_err());
}
