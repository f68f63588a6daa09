//! Data-parallel training under OpenMPI's `mpirun`, two ranks sharing this machine's adapter:
//! two ranks give what one rank with twice the gradient accumulation gives, a killed rank ends
//! the job quickly with the last checkpoint whole, a resumed run continues bit for bit, and
//! ranks started with different settings are refused. Built only with `--features mpi`.

#![cfg(all(feature = "mpi", unix))]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shaderformer::io::{hf, hf_weights};
use shaderformer::train::checkpoint;

mod common;
use common::text;

fn scratch(name: &str) -> PathBuf {
    common::scratch("mpi", name)
}

/// Some text of a few dozen distinct characters (seeded, so every run trains on the same).
fn data(dir: &Path, chars: usize) -> PathBuf {
    let words = [
        "the ",
        "king ",
        "shall ",
        "not ",
        "sleep ",
        "tonight, ",
        "my ",
        "lord; ",
        "and ",
        "yet ",
        "what ",
        "is ",
        "this ",
        "quiet ",
        "hour ",
        "of ",
        "bells?\n",
    ];
    let mut rng = shaderformer::rng::Rng::new(7);
    let mut s = String::new();
    while s.len() < chars {
        s.push_str(words[rng.below(words.len() as u64) as usize]);
    }
    let p = dir.join("data.txt");
    std::fs::write(&p, s).unwrap();
    p
}

/// `shaderformer` itself, for one process.
fn single() -> Command {
    let mut c = common::bin();
    env(&mut c);
    c
}

/// Kernel tuning off through the environment (mpirun would take a `--tune` flag for its own).
fn env(c: &mut Command) {
    common::runtime_env(c);
    c.env("SHADERFORMER_TUNE", "off");
}

/// `mpirun -np 2 shaderformer` (as root and on fewer cores than ranks, as in CI).
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    env(&mut c);
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ]);
    c.args(["-np", &np.to_string(), common::BIN]);
    c
}

/// A tiny model's training flags: 2 layers, C 32, T 16, batch 4, dropout on; `extra`
/// holds (flag, value) pairs.
fn tiny(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--metrics",
        out.join("metrics.jsonl").to_str().unwrap(),
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--dropout",
        "0.1",
        "--lr",
        "1e-3",
        "--warmup-iters",
        "1",
        "--log-interval",
        "1",
        "--eval-iters",
        "2",
        "--sample-tokens",
        "0",
    ]
    .map(String::from)
    .to_vec();
    // A flag of `extra` replaces the same flag's value here, or is added.
    for pair in extra.chunks(2) {
        match a.iter().position(|x| x == pair[0]) {
            Some(i) => a[i + 1] = pair[1].to_string(),
            None => a.extend(pair.iter().map(|s| s.to_string())),
        }
    }
    a
}

fn ok(mut c: Command) -> String {
    let o = c.output().expect("start the run");
    let t = text(&o);
    assert!(o.status.success(), "the run failed:\n{t}");
    t
}

/// (step, loss) of every step in a metrics file.
fn losses(out: &Path) -> Vec<(u64, f32)> {
    common::losses(&out.join("metrics.jsonl"))
        .into_iter()
        .map(|(s, l)| (s, l as f32))
        .collect()
}

fn weights(out: &Path) -> Vec<f32> {
    checkpoint::load(out).unwrap().params.concat()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn two_ranks_match_one_rank_with_twice_the_accumulation() {
    two_ranks_against_one("equal", &[], weights);
}

/// The same with a Llama-shaped model (RMSNorm, rotary positions, grouped-query attention, the
/// gated MLP): one key/value head for the two query heads.
#[test]
fn two_ranks_of_a_llama_model_match_one_rank_with_twice_the_accumulation() {
    let llama = ["--arch", "llama", "--n-kv-head", "1"];
    two_ranks_against_one("equal-llama", &llama, |out| {
        hf_weights::load(out).unwrap().params.concat()
    });
}

/// The same for a LoRA adapter on a GPT-2 checkpoint (gpt2-bpe, its BPE tokenizer), dropout on
/// the adapter's input: the ranks sum the adapter's gradients alone, and its weights agree.
#[test]
fn two_ranks_of_a_lora_run_match_one_rank_with_twice_the_accumulation() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/gpt2-bpe");
    let lora = [
        "--init",
        base.to_str().unwrap(),
        "--n-head",
        "4",
        "--n-embd",
        "40",
        "--lora-r",
        "4",
        "--lora-alpha",
        "32",
        "--lora-dropout",
        "0.1",
        "--lora-targets",
        "c_attn,c_fc",
        "--lr",
        "1e-2",
    ];
    two_ranks_against_one("equal-lora", &lora, |out| {
        let mut t: Vec<_> = hf::read_safetensors(&out.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t.into_iter().flat_map(|(_, (_, v))| v).collect()
    });
}

/// A run of 2 ranks against one rank with `--grad-accum 2` on the tiny model with `flags` added,
/// its checkpoint's weights read by `weights`: the same losses and weights within rounding.
fn two_ranks_against_one(name: &str, flags: &[&str], weights: fn(&Path) -> Vec<f32>) {
    let dir = scratch(name);
    let data = data(&dir, 20_000);
    let (two, one) = (dir.join("two"), dir.join("one"));
    let steps = [&["--max-iters", "10", "--loader", "sequential"][..], flags].concat();
    let mut c = mpirun(2);
    c.args(tiny(&data, &two, &steps));
    let log = ok(c);
    let mut c = single();
    c.args(tiny(&data, &one, &steps))
        .args(["--grad-accum", "2"]);
    ok(c);

    // Rank 0 alone logs: one table, one global batch, one checkpoint line.
    assert!(
        log.contains("rank 0: host") && log.contains("rank 1: host"),
        "{log}"
    );
    assert_eq!(
        log.matches("global batch: 2 ranks x 4 sequences").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("checkpoint: ").count(), 1, "{log}");
    // The ranks compared their weights' checksums at the evaluation and found them equal.
    assert!(
        log.contains("step     10: weights identical on all 2 ranks"),
        "{log}"
    );

    let (a, b) = (losses(&two), losses(&one));
    assert_eq!(a.len(), 10);
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5,
            "step {s}: loss {x} (2 ranks) vs {y} (1 rank)"
        );
    }
    // Not bit for bit: one rank adds the second micro-step's gradient inside the backward
    // kernels (dw += ...), two ranks add whole gradients; AdamW then magnifies the last bits of
    // gradients near zero in proportion to the learning rate (1e-3 here, the default).
    let d = max_diff(&weights(&two), &weights(&one));
    eprintln!("weights: 2 ranks vs 1 rank with --grad-accum 2 differ by at most {d:e}");
    assert!(d <= 1e-5, "weights differ by up to {d}");
    // Dropout was on and the model moved: the comparison is not between untouched copies.
    assert!(a[0].1 - a[9].1 > 0.1, "the loss did not fall: {a:?}");
}

/// The ranks' processes: children of `mpirun` with OMPI_COMM_WORLD_RANK in their environment.
fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the parent follows the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(mpirun) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_rank_ends_the_job_and_the_checkpoint_stays_whole() {
    let dir = scratch("kill");
    let data = data(&dir, 20_000);
    let out = dir.join("out");
    let mut c = mpirun(2);
    c.args(tiny(
        &data,
        &out,
        &[
            "--max-iters",
            "100000",
            "--eval-interval",
            "2",
            "--log-interval",
            "1000",
        ],
    ));
    let mut job: Child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = job.id();
    let state = out.join("trainer_state.json");
    wait_for("a first checkpoint", Duration::from_secs(300), || {
        assert!(job.try_wait().unwrap().is_none(), "the job ended early");
        state.exists()
    });
    let pid = rank_pid(id, 1).expect("rank 1's process");
    let killed = Instant::now();
    let k = Command::new("kill").args(["-9", &pid.to_string()]).status();
    assert!(k.unwrap().success());
    wait_for("the job to end", Duration::from_secs(30), || {
        job.try_wait().unwrap().is_some()
    });
    let took = killed.elapsed();
    let o = job.wait_with_output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "the job reported success:\n{t}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(t.contains("rank 1"), "nothing names the lost rank:\n{t}");
    let ck = checkpoint::load(&out).unwrap();
    let s = ck.state.unwrap();
    assert!(
        s.step >= 2 && s.step.is_multiple_of(2) && s.ranks == 2,
        "{s:?}"
    );
}

#[test]
fn a_resumed_two_rank_run_continues_bit_for_bit() {
    let dir = scratch("resume");
    let data = data(&dir, 20_000);
    let (straight, split) = (dir.join("straight"), dir.join("split"));
    // The random loader: each rank's stream must come back from the checkpoint.
    let common = ["--lr-decay-iters", "6", "--loader", "random"];
    let mut c = mpirun(2);
    c.args(tiny(&data, &straight, &common))
        .args(["--max-iters", "6"]);
    ok(c);
    let mut c = mpirun(2);
    c.args(tiny(&data, &split, &common))
        .args(["--max-iters", "3"]);
    ok(c);
    let st = checkpoint::load(&split).unwrap().state.unwrap();
    assert_eq!((st.step, st.ranks, st.rank_loaders.len()), (3, 2, 1));
    let mut c = mpirun(2);
    c.args([
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--out",
        split.to_str().unwrap(),
        "--metrics",
        split.join("metrics.jsonl").to_str().unwrap(),
        "--max-iters",
        "6",
        "--sample-tokens",
        "0",
    ]);
    let log = ok(c);
    assert!(log.contains("resuming at step 3"), "{log}");

    let (a, b) = (losses(&straight), losses(&split));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.to_bits(), y.to_bits(), "step {s}: loss {x} vs {y}");
    }
    let (wa, wb) = (weights(&straight), weights(&split));
    assert!(
        wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "weights differ by up to {}",
        max_diff(&wa, &wb)
    );

    // One process continues the two ranks' checkpoint from the same global batch, and says so.
    let mut c = single();
    c.args([
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--out",
        split.to_str().unwrap(),
        "--max-iters",
        "7",
        "--sample-tokens",
        "0",
    ]);
    let log = ok(c);
    assert!(
        log.contains("the checkpoint was written by 2 ranks, this run has 1: the loader continues at global batch 12"),
        "{log}"
    );
    let st = checkpoint::load(&split).unwrap().state.unwrap();
    assert_eq!((st.step, st.ranks, st.loader.position), (7, 1, 13));
}

#[test]
fn ranks_with_different_settings_or_too_little_data_are_refused() {
    let dir = scratch("refuse");
    let data_path = data(&dir, 20_000);
    let out = dir.join("out");
    // Two app contexts: rank 1 is started with another batch size.
    let mut c = mpirun(1);
    c.args(tiny(&data_path, &out, &["--max-iters", "2"]));
    c.args([":", "-np", "1", common::BIN]);
    c.args(tiny(
        &data_path,
        &out,
        &["--max-iters", "2", "--batch-size", "8"],
    ));
    let o = c.output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("error: rank 0: --batch-size: the ranks were started with different values: rank 0 has 4, rank 1 has 8"),
        "{t}"
    );
    assert!(!out.join("trainer_state.json").exists());

    // 2 ranks x 8 x 16 tokens need 257 training tokens; about 200 characters hold 180 (and
    // their validation split the 17 one sequence needs).
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let data_small = data(&small, 200);
    let mut c = mpirun(2);
    c.args(tiny(
        &data_small,
        &small.join("out"),
        &["--max-iters", "2", "--batch-size", "8"],
    ));
    let o = c.output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains(
            "error: rank 0: -np: 2 ranks x --batch-size 8 x --block-size 16 need 257 tokens of \
             training data per round of batches, but the train split holds 180"
        ),
        "{t}"
    );
}

/// A rank started with another --shader-dir (its GELU edited) would feed gradients of other
/// kernels into the sum: the job is refused at start-up, naming the rank.
#[test]
fn ranks_with_different_shaders_are_refused() {
    let dir = scratch("shaders");
    let data_path = data(&dir, 20_000);
    let out = dir.join("out");
    let shaders = dir.join("shaders");
    std::fs::create_dir_all(&shaders).unwrap();
    let gelu =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/gelu.wgsl")).unwrap();
    std::fs::write(shaders.join("gelu.wgsl"), gelu + "\n// edited\n").unwrap();
    let mut c = mpirun(1);
    c.args(tiny(&data_path, &out, &["--max-iters", "2"]));
    c.args([":", "-np", "1", env!("CARGO_BIN_EXE_shaderformer")]);
    c.args(["--shader-dir", shaders.to_str().unwrap()]);
    c.args(tiny(&data_path, &out, &["--max-iters", "2"]));
    let o = c.output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("error: rank 0: --shader-dir: the ranks load different shader sources: rank 1"),
        "{t}"
    );
    assert!(!out.join("trainer_state.json").exists());
}
