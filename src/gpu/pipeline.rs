//! Shader modules, layouts and compute pipelines, each created once and cached.
//!
//! Binding convention for every kernel: `@group(0) @binding(0)` is the kernel's uniform params
//! struct; bindings 1.. are the storage buffers listed in `KernelSpec::bindings`, in order; a
//! kernel that reads the per-step uniform (shaders/include/step.wgsl) lists `Binding::Step`, which
//! is bound at `STEP_BINDING` wherever it stands in the list.

use super::{Gpu, PipelineKey, Shader, ShaderVariant};
use crate::error::{Error, Result};

/// How a binding is accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// `var<storage, read>`
    Read,
    /// `var<storage, read_write>`
    ReadWrite,
    /// `var<uniform> step: Step` at `STEP_BINDING` (shaders/include/step.wgsl).
    Step,
}

/// The binding number of the per-step uniform in every kernel that reads it.
pub const STEP_BINDING: u32 = 15;

impl Binding {
    /// The binding number of the `i`-th entry of `KernelSpec::bindings`.
    pub fn number(self, i: usize) -> u32 {
        match self {
            Binding::Step => STEP_BINDING,
            _ => i as u32 + 1,
        }
    }

    fn buffer_type(self) -> wgpu::BufferBindingType {
        match self {
            Binding::Step => wgpu::BufferBindingType::Uniform,
            _ => wgpu::BufferBindingType::Storage {
                read_only: self == Binding::Read,
            },
        }
    }
}

/// One entry point of one shader family in one variant, with its storage bindings (after the
/// params uniform).
#[derive(Clone, Copy, Debug)]
pub struct KernelSpec {
    pub shader: Shader,
    /// The form the family's source is compiled in (see `gpu::shaders`).
    pub variant: ShaderVariant,
    pub entry: &'static str,
    pub bindings: &'static [Binding],
}

impl KernelSpec {
    /// "family.entry" or "family_variant.entry" (e.g. "gemm_f16.gemm_tiled"), the name used in
    /// labels, errors and profiles.
    pub fn name(&self) -> String {
        format!("{}.{}", self.shader.name(self.variant), self.entry)
    }

    /// The same entry point and bindings compiled as `variant`.
    pub const fn with_variant(self, variant: ShaderVariant) -> KernelSpec {
        KernelSpec { variant, ..self }
    }
}

impl Gpu {
    fn module(
        &self,
        shader: Shader,
        variant: ShaderVariant,
        form: &'static [&'static str],
    ) -> Result<wgpu::ShaderModule> {
        if let Some(m) = self.modules.lock().unwrap().get(&(shader, variant, form)) {
            return Ok(m.clone());
        }
        let source = self.shaders.load_form(shader, variant, form)?;
        // naga first: its errors carry the source file, line and column.
        super::shaders::validate(&source)?;
        let label = shader.name(variant);
        let module = self.scoped(source.main_file(), 0, || {
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&label),
                    source: wgpu::ShaderSource::Wgsl(source.text.as_str().into()),
                })
        })?;
        self.modules
            .lock()
            .unwrap()
            .insert((shader, variant, form), module.clone());
        Ok(module)
    }

    pub(crate) fn layout(
        &self,
        bindings: &[Binding],
    ) -> (wgpu::BindGroupLayout, wgpu::PipelineLayout) {
        let mut cache = self.layouts.lock().unwrap();
        if let Some(l) = cache.get(bindings) {
            return l.clone();
        }
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, b) in bindings.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: b.number(i),
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: b.buffer_type(),
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let bgl = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: None,
                entries: &entries,
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: None,
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
        cache.insert(bindings.to_vec(), (bgl.clone(), pl.clone()));
        (bgl, pl)
    }

    /// The compute pipeline for `spec` specialized with `constants` (WGSL `override` values),
    /// created once per distinct key.
    pub fn pipeline(
        &self,
        spec: &KernelSpec,
        constants: &[(&str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        let key: PipelineKey = (
            spec.shader,
            spec.variant,
            spec.entry,
            constants
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_bits()))
                .collect(),
        );
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let (function, form) = spec.shader.entry_form(spec.entry);
        let module = self.module(spec.shader, spec.variant, form)?;
        let (_, layout) = self.layout(spec.bindings);
        let name = spec.name();
        let pipeline = self
            .scoped(&name, 0, || {
                self.device
                    .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(&name),
                        layout: Some(&layout),
                        module: &module,
                        entry_point: Some(function),
                        compilation_options: wgpu::PipelineCompilationOptions {
                            constants,
                            zero_initialize_workgroup_memory: false,
                        },
                        cache: None,
                    })
            })
            .map_err(|e| match e {
                Error::Validation { message, .. } => Error::Pipeline {
                    kernel: name.clone(),
                    message,
                },
                other => other,
            })?;
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
    }
}
