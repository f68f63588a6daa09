//! The GPU context: adapter choice, device with the adapter's real limits and the optional
//! features we use, buffers and views, the pipeline cache, dispatch recording and the profiler.
//!
//! Nothing here knows about transformers: kernels build on this module, never the reverse.

mod buffer;
mod dispatch;
mod pipeline;
pub mod prior;
mod profiler;
pub mod shaders;
pub mod signal;
/// The shared test device: for this crate's own tests and, through the `testing` feature that
/// the dev-dependency on this crate turns on, its integration tests; never in a build that ships.
#[cfg(all(not(target_arch = "wasm32"), any(test, feature = "testing")))]
mod testing;
pub mod tuning_cache;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use buffer::{DType, View};
pub use dispatch::{Cost, Dispatch, grid};
pub use pipeline::{Binding, KernelSpec, STEP_BINDING};
pub use profiler::TimingMethod;
pub use shaders::{Shader, ShaderSource, ShaderVariant};
pub use signal::Signal;
#[cfg(all(not(target_arch = "wasm32"), any(test, feature = "testing")))]
pub use testing::{own_test_gpu, test_gpu};
pub use tuning_cache::{TuneMode, Tuner};

use crate::error::{Error, Result};

/// Environment variable naming the backend (`vulkan`, `metal`, `dx12`, `gl`).
pub const ENV_BACKEND: &str = "SHADERFORMER_BACKEND";
/// Environment variable choosing the adapter, by index in `shaderformer devices` or name substring.
pub const ENV_ADAPTER: &str = "SHADERFORMER_ADAPTER";
/// When set to 1, a missing adapter fails tests instead of skipping them.
pub const ENV_REQUIRE_GPU: &str = "SHADERFORMER_REQUIRE_GPU";
/// Bytes: lowers the storage-binding size the engine plans for below the adapter's, so that a
/// small model's tensors are split into row chunks as a large model's are (for tests).
pub const ENV_MAX_BINDING: &str = "SHADERFORMER_MAX_BINDING";

/// The adapter's limits as the engine plans with them: `ENV_MAX_BINDING`, when set, lowers the
/// storage-binding size.
fn planned_limits(mut limits: wgpu::Limits) -> Result<wgpu::Limits> {
    if let Ok(v) = std::env::var(ENV_MAX_BINDING)
        && !v.trim().is_empty()
    {
        let cap: u64 = v.trim().parse().ok().filter(|&c| c >= 256).ok_or_else(|| {
            Error::invalid(
                ENV_MAX_BINDING,
                format!("{v:?} is not a number of bytes of at least 256"),
            )
        })?;
        limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
    }
    Ok(limits)
}

/// How to pick and configure the device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// `vulkan`, `metal`, `dx12` or `gl`; all backends when `None`.
    pub backend: Option<String>,
    /// An index into the adapter list, or a case-insensitive substring of the adapter's name.
    pub adapter: Option<String>,
    /// Embedded shaders or a directory of replacements.
    pub shaders: ShaderSource,
    /// When kernel variants are chosen by measurement.
    pub tune: TuneMode,
}

impl GpuOptions {
    /// Options read from `SHADERFORMER_BACKEND`, `SHADERFORMER_ADAPTER` and `SHADERFORMER_TUNE`
    /// (for tests and examples: tuning is off unless that variable asks for it, so that a test
    /// runs the same kernels wherever it runs).
    pub fn from_env() -> Self {
        GpuOptions {
            backend: std::env::var(ENV_BACKEND).ok().filter(|s| !s.is_empty()),
            adapter: std::env::var(ENV_ADAPTER).ok().filter(|s| !s.is_empty()),
            shaders: ShaderSource::Embedded,
            tune: TuneMode::from_env_or(TuneMode::Off).unwrap_or(TuneMode::Off),
        }
    }
}

/// Features we turn on whenever the adapter has them.
pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::SUBGROUP);

fn parse_backends(backend: Option<&str>) -> Result<wgpu::Backends> {
    Ok(match backend.map(|b| b.to_ascii_lowercase()) {
        // A browser has one API: WebGPU (never its WebGL fallback, which has no compute).
        None if cfg!(target_arch = "wasm32") => wgpu::Backends::BROWSER_WEBGPU,
        None => wgpu::Backends::all(),
        Some(b) => match b.as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            other => {
                return Err(Error::invalid(
                    "--backend",
                    format!("unknown backend '{other}' (expected vulkan, metal, dx12 or gl)"),
                ));
            }
        },
    })
}

fn new_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    // Validation layers slow everything down; wgpu's own validation is always on.
    desc.flags = wgpu::InstanceFlags::empty();
    wgpu::Instance::new(desc)
}

/// Ranks adapters for the default choice: real GPUs first, then native APIs before GL.
fn preference(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (kind, api)
}

/// Every adapter visible through `backends`, in the order `shaderformer devices` prints them.
pub fn enumerate(backend: Option<&str>) -> Result<Vec<wgpu::Adapter>> {
    block_on("listing adapters", enumerate_async(backend))
}

/// The adapters, awaited (a browser offers at most one, the one `requestAdapter` gives).
pub async fn enumerate_async(backend: Option<&str>) -> Result<Vec<wgpu::Adapter>> {
    let instance = new_instance(parse_backends(backend)?);
    let mut adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
    adapters.sort_by_key(|a| preference(&a.get_info()));
    Ok(adapters)
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?})", info.name, info.backend)
}

/// A human-readable report of one adapter, for `shaderformer devices`.
pub fn adapter_report(index: usize, adapter: &wgpu::Adapter) -> String {
    let info = adapter.get_info();
    let l = adapter.limits();
    let f = adapter.features();
    let yes = |feat| if f.contains(feat) { "yes" } else { "no" };
    format!(
        "[{index}] {name}\n    backend {backend:?}, type {ty:?}, driver {driver} {driver_info}\n    \
         max storage binding {msb} B ({msb_mib:.0} MiB), max buffer {mb} B ({mb_mib:.0} MiB)\n    \
         workgroup storage {ws} B, invocations per workgroup {inv}, workgroups per dimension {wpd}\n    \
         storage buffers per stage {sbs}, subgroup size {smin}..{smax}\n    \
         timestamps {ts}, f16 {f16}, subgroups {sg}",
        name = info.name,
        backend = info.backend,
        ty = info.device_type,
        driver = info.driver,
        driver_info = info.driver_info,
        msb = l.max_storage_buffer_binding_size,
        msb_mib = l.max_storage_buffer_binding_size as f64 / (1u64 << 20) as f64,
        mb = l.max_buffer_size,
        mb_mib = l.max_buffer_size as f64 / (1u64 << 20) as f64,
        ws = l.max_compute_workgroup_storage_size,
        inv = l.max_compute_invocations_per_workgroup,
        wpd = l.max_compute_workgroups_per_dimension,
        sbs = l.max_storage_buffers_per_shader_stage,
        smin = info.subgroup_min_size,
        smax = info.subgroup_max_size,
        ts = yes(wgpu::Features::TIMESTAMP_QUERY),
        f16 = yes(wgpu::Features::SHADER_F16),
        sg = yes(wgpu::Features::SUBGROUP),
    )
}

type PipelineKey = (Shader, ShaderVariant, &'static str, Vec<(String, u64)>);
/// A shader module: family, variant and the entry-form names it was expanded with.
type ModuleKey = (Shader, ShaderVariant, &'static [&'static str]);

/// An open device and everything created on it once: shader modules, layouts, pipelines.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    shaders: ShaderSource,
    /// Measured kernel choices for this adapter (`kernels::measure` measures).
    pub tuner: Tuner,
    /// Per family, variant and entry-form names (see `shaders`).
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    layouts: Mutex<HashMap<Vec<Binding>, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    scratch: Mutex<HashMap<(String, DType, usize), View>>,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Vec<String>>>,
}

impl Gpu {
    /// Opens the adapter chosen by `opts` (high-performance by default) with its real limits.
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        block_on("opening the device", Self::new_async(opts))
    }

    /// `new`, awaited: the adapter and device requests are futures (promises in a browser).
    pub async fn new_async(opts: &GpuOptions) -> Result<Gpu> {
        let adapters = enumerate_async(opts.backend.as_deref()).await?;
        let wanted = || {
            let mut w = String::new();
            if let Some(b) = &opts.backend {
                w += &format!("backend '{b}'");
            }
            if let Some(a) = &opts.adapter {
                if !w.is_empty() {
                    w += " and ";
                }
                w += &format!("adapter '{a}'");
            }
            if w.is_empty() { "any".into() } else { w }
        };
        // The list the index counts in: `shaderformer devices` with the same --backend.
        let listed: Vec<String> = adapters.iter().map(|a| describe(&a.get_info())).collect();
        let available = || {
            let names: Vec<String> = listed
                .iter()
                .enumerate()
                .map(|(i, a)| format!("[{i}] {a}"))
                .collect();
            if names.is_empty() {
                "none (install a Vulkan driver, e.g. mesa-vulkan-drivers)".to_string()
            } else {
                names.join(", ")
            }
        };
        let adapter = match &opts.adapter {
            None => adapters.into_iter().next(),
            Some(sel) => match sel.parse::<usize>() {
                Ok(i) => adapters.into_iter().nth(i),
                Err(_) => {
                    let needle = sel.to_ascii_lowercase();
                    adapters
                        .into_iter()
                        .find(|a| a.get_info().name.to_ascii_lowercase().contains(&needle))
                }
            },
        };
        let Some(adapter) = adapter else {
            return Err(Error::NoAdapter {
                wanted: wanted(),
                available: available(),
            });
        };
        Self::open(adapter, opts.shaders.clone(), opts.tune).await
    }

    async fn open(adapter: wgpu::Adapter, shaders: ShaderSource, tune: TuneMode) -> Result<Gpu> {
        let info = adapter.get_info();
        let tuner = Tuner::new(
            tune,
            tuning_cache::Identity::new(&info, shaders.hash()),
            tuning_cache::cache_dir().as_deref(),
        );
        let features = adapter.features() & OPTIONAL_FEATURES;
        // Ask for everything the adapter really offers, not wgpu's conservative defaults:
        // storage bindings of 1-4 GiB on discrete GPUs instead of 128 MiB.
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("shaderformer"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) =
            adapter
                .request_device(&desc)
                .await
                .map_err(|e| Error::RequestDevice {
                    adapter: describe(&info),
                    message: e.to_string(),
                })?;
        let lost = Arc::new(Mutex::new(None));
        let lost2 = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                *lost2.lock().unwrap() = Some(format!("{reason:?}: {message}"));
            }
        });
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let uncaptured2 = uncaptured.clone();
        // wgpu's default handler panics; keep the message and report it as a typed error instead.
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            uncaptured2.lock().unwrap().push(e.to_string());
        }));
        Ok(Gpu {
            device,
            queue,
            info,
            limits: planned_limits(limits)?,
            features,
            shaders,
            tuner,
            modules: Mutex::default(),
            layouts: Mutex::default(),
            pipelines: Mutex::default(),
            scratch: Mutex::default(),
            lost,
            uncaptured,
        })
    }

    /// "name (Backend)", for reports and benchmark tables.
    /// Where `shader`'s source is read from, for messages (the embedded copy or --shader-dir's).
    pub fn shader_file(&self, shader: Shader) -> String {
        self.shaders.file_of(shader)
    }

    pub fn adapter_name(&self) -> String {
        describe(&self.info)
    }

    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }

    /// The largest number of bytes one storage binding may cover.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Runs `f` inside validation, out-of-memory and internal error scopes and turns whatever they
    /// catch (and any uncaptured error or device loss) into a typed error naming `context`.
    /// In a browser the scopes' answers arrive only from the event loop, which a synchronous
    /// caller cannot wait for: there the errors surface through the uncaptured-error handler and
    /// `check` (at the next readback at the latest).
    #[cfg(target_arch = "wasm32")]
    pub fn scoped<T>(&self, context: &str, _bytes: u64, f: impl FnOnce() -> T) -> Result<T> {
        let value = f();
        self.check(context)?;
        Ok(value)
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn scoped<T>(&self, context: &str, bytes: u64, f: impl FnOnce() -> T) -> Result<T> {
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        let i = pollster::block_on(internal.pop());
        if let Some(e) = o {
            let _ = e;
            return Err(Error::OutOfMemory {
                context: context.to_string(),
                bytes,
            });
        }
        if let Some(e) = v.or(i) {
            return Err(Error::Validation {
                context: context.to_string(),
                message: first_line(&e.to_string()),
            });
        }
        self.check(context)?;
        Ok(value)
    }

    /// Runs `f` inside a validation scope whose verdict is read later from the returned signal
    /// (the error's message, or `None`): natively it is known at once; in a browser it arrives
    /// from the event loop, so a caller that cannot wait (a kernel family building candidates to
    /// measure later) still learns which of them the device refused, and the refusal does not
    /// surface as an unrelated error at the next `check`.
    pub fn scoped_later<T>(&self, f: impl FnOnce() -> T) -> (T, Signal<Option<String>>) {
        let verdict = Signal::new();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let popped = scope.pop();
        #[cfg(not(target_arch = "wasm32"))]
        verdict.set(pollster::block_on(popped).map(|e| first_line(&e.to_string())));
        #[cfg(target_arch = "wasm32")]
        {
            let v = verdict.clone();
            wasm_bindgen_futures::spawn_local(async move {
                v.set(popped.await.map(|e| first_line(&e.to_string())));
            });
        }
        (value, verdict)
    }

    /// Reports device loss or an error that escaped every scope.
    pub fn check(&self, context: &str) -> Result<()> {
        if let Some(reason) = self.lost.lock().unwrap().clone() {
            return Err(Error::DeviceLost { reason });
        }
        let mut errs = self.uncaptured.lock().unwrap();
        if let Some(e) = errs.first().cloned() {
            errs.clear();
            return Err(Error::Validation {
                context: context.to_string(),
                message: first_line(&e),
            });
        }
        Ok(())
    }

    /// A scratch tensor shared by every caller asking for the same `tag`, dtype and length, so
    /// that many dispatch lists of the same shape (one per layer) need one buffer between them.
    /// Safe for scratch that a launcher's dispatches write and then consume before the caller
    /// records anything else using the same tag: wgpu orders the accesses within a submission.
    pub fn shared_scratch(&self, tag: &str, dtype: DType, len: usize) -> Result<View> {
        let key = (tag.to_string(), dtype, len);
        if let Some(v) = self.scratch.lock().unwrap().get(&key) {
            return Ok(v.clone());
        }
        let v = self.zeros(tag, dtype, len)?;
        self.scratch.lock().unwrap().insert(key, v.clone());
        Ok(v)
    }

    /// Blocks until the queue is idle.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost {
                reason: e.to_string(),
            })?;
        self.check("wait")
    }

    /// `wait`, awaited: natively it blocks as `wait` does; in a browser it resolves when the
    /// queue reports its submitted work done (from the event loop).
    pub async fn wait_async(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        return self.wait();
        #[cfg(target_arch = "wasm32")]
        {
            let done = Signal::new();
            let d = done.clone();
            self.queue.on_submitted_work_done(move || d.set(()));
            done.wait().await;
            self.check("wait")
        }
    }
}

/// Runs the GPU layer's async core to completion for a synchronous caller. Natively it blocks
/// (every future here is driven by `device.poll` and ready when first polled). A browser's
/// promises settle only from its event loop, which a synchronous call cannot yield to: there a
/// future not ready at once is an error naming `what` and the `_async` form to call instead.
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<T>(_what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    pollster::block_on(f)
}

#[cfg(target_arch = "wasm32")]
pub fn block_on<T>(what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => Err(Error::invalid(
            what,
            "cannot wait synchronously in a browser (use the _async form)",
        )),
    }
}

/// wgpu's messages span several lines; the first names the problem, the rest repeat context.
fn first_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines.join(" | ")
}
