//! The shared device of native tests and examples, and the count of tests skipped without one.

use super::{ENV_REQUIRE_GPU, Gpu, GpuOptions};

/// The shared device for tests and examples: `None` when no adapter is present, unless
/// `SHADERFORMER_REQUIRE_GPU=1`, in which case a missing adapter panics so the test fails loudly.
/// A test that gets `None` is skipped, never passed in silence: each one prints
/// `skipped: no GPU adapter: <test>` on the process's stderr (past the test harness's capture),
/// and the process ends with a count of them.
pub fn test_gpu() -> Option<&'static Gpu> {
    static GPU: std::sync::OnceLock<Option<Gpu>> = std::sync::OnceLock::new();
    let gpu = GPU.get_or_init(|| match Gpu::new(&GpuOptions::from_env()) {
        Ok(g) => Some(g),
        Err(e) => {
            if std::env::var(ENV_REQUIRE_GPU).as_deref() == Ok("1") {
                panic!("{ENV_REQUIRE_GPU}=1 but no GPU is usable: {e}");
            }
            report_to_stderr(&format!("no GPU adapter ({e}); GPU tests are skipped"));
            None
        }
    });
    if gpu.is_none() {
        note_skipped_test();
    }
    gpu.as_ref()
}

/// A device of the caller's own, beside `test_gpu`'s (which every test of a process shares), its
/// tuner in `mode` and keeping its choices in memory only, whatever the user's cache holds: for
/// tests that pin or defer choices. `None` (the test skipped) where `test_gpu` finds no adapter.
pub fn own_test_gpu(mode: super::TuneMode) -> Option<Gpu> {
    test_gpu()?;
    let options = GpuOptions {
        tune: super::TuneMode::Off,
        ..GpuOptions::from_env()
    };
    let mut gpu = Gpu::new(&options).expect("a second device on the adapter test_gpu opened");
    gpu.tuner = super::tuning_cache::Tuner::new(mode, gpu.tuner.identity().clone(), None);
    Some(gpu)
}

/// Writes a line to the process's stderr directly: `eprintln!` inside a test is captured by the
/// harness and shown only when the test fails.
fn report_to_stderr(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Names of the tests that found no GPU in this process, each recorded once.
static SKIPPED_TESTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records the current test (the harness names each test's thread after it) as skipped, prints
/// it once, and on the first skip arranges for the total to be printed when the process exits.
fn note_skipped_test() {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_string();
    let mut skipped = SKIPPED_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    if skipped.contains(&test) {
        return;
    }
    if skipped.is_empty() {
        unsafe extern "C" {
            fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
        }
        // SAFETY: atexit is the C library's; the handler only reads a static and writes stderr.
        unsafe { atexit(report_skipped_tests) };
    }
    report_to_stderr(&format!("skipped: no GPU adapter: {test}"));
    skipped.push(test);
}

extern "C" fn report_skipped_tests() {
    let n = SKIPPED_TESTS.lock().map_or(0, |s| s.len());
    report_to_stderr(&format!(
        "{n} GPU test(s) skipped: no GPU adapter (set {ENV_REQUIRE_GPU}=1 to make them fail)"
    ));
}
