//! The shader registry: one hand-written WGSL source per kernel family (`shaders/<family>.wgsl`),
//! embedded at build time and optionally replaced by the files of a directory (`--shader-dir`)
//! for experiments.
//!
//! # Variants
//!
//! Some families run in more than one form: an f16 operand (GEMM weights, embedding tables, the
//! KV cache) or subgroup reductions (LayerNorm). Override constants cannot express these (they
//! change types, or use built-ins that do not exist without the feature), and copies of a file
//! drift apart. So every form comes from the family's one source, through three small rules:
//!
//! 1. **A prelude**, prepended by the loader, chosen by the [`ShaderVariant`]. For `F16` it is
//!    `enable f16;` and `alias <Elem> = f16;`, for `Base` `alias <Elem> = f32;`, where `<Elem>`
//!    is the family's storage alias ([`Shader::elem_alias`]: `BElem` for GEMM's B operand,
//!    `TableElem` for the embedding tables, `KvElem` for the attention K/V). The source declares
//!    those bindings as `array<BElem>` and widens every read through a tiny helper (gemm.wgsl's
//!    `read_b`, `read_b4`): `f32(x)` of an f32 is the value itself, so the base variant computes
//!    exactly what it did before, and the f16 variant the same sums on the widened values.
//! 2. **`#include "include/<file>.wgsl"`** on a line of its own inserts a shared helper file
//!    (paths relative to `shaders/`): the dropout counter hash lives once, in
//!    `shaders/include/hash.wgsl`, included by dropout.wgsl and attention.wgsl; GPT-2's GELU in
//!    `shaders/include/gelu.wgsl`, included by gelu.wgsl and gemm.wgsl's fused epilogues.
//! 3. **`#if NAME` / `#else` / `#endif`** on lines of their own keep or drop whole lines, for the
//!    few differences that neither an alias nor an override can carry: code that does not even
//!    parse without the feature (subgroup built-ins). A variant defines its names
//!    ([`ShaderVariant::defines`]; `SUBGROUP` for `Subgroup`); an unknown name is an error.
//!    An entry point may also be one function of the source compiled with names of its own
//!    ([`Shader::entry_form`]): GEMM's `gemm_tiled_vb` is `gemm_tiled` with `VEC_B`, reading b
//!    as vec4. WGSL lets an entry point use only one of two variables bound at one slot (`b`,
//!    `b4`), so without this each way of reading the operands would need its own copy of the
//!    loop.
//!
//! That is the whole language: no expressions, no macros, no dimensions pasted into the text
//! (shapes stay in the params struct and override constants, so a new shape never recompiles).
//! A line whose first non-blank character is `#` is a directive; WGSL itself has no use for `#`.
//!
//! The expanded text keeps a line map back to (file, line), so naga's errors name the line and
//! column of the file a person edits, never of the concatenation. Modules and pipelines are cached
//! per (family, variant).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

macro_rules! shaders {
    ($($variant:ident => $file:literal),* $(,)?) => {
        /// One WGSL source of `shaders/`, i.e. one kernel family.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Shader { $($variant),* }

        impl Shader {
            pub const ALL: &'static [Shader] = &[$(Shader::$variant),*];

            /// The file name under `shaders/` (or under `--shader-dir`).
            pub fn file_name(self) -> &'static str {
                match self { $(Shader::$variant => $file),* }
            }

            /// The copy compiled into the binary.
            pub fn embedded_source(self) -> &'static str {
                match self { $(Shader::$variant => include_str!(concat!("../../shaders/", $file))),* }
            }
        }
    };
}

shaders! {
    Gemm => "gemm.wgsl",
    LayerNorm => "layernorm.wgsl",
    Gelu => "gelu.wgsl",
    Embedding => "embedding.wgsl",
    CrossEntropy => "cross_entropy.wgsl",
    Residual => "residual.wgsl",
    Convert => "convert.wgsl",
    Dropout => "dropout.wgsl",
    Adamw => "adamw.wgsl",
    Reduce => "reduce.wgsl",
    Attention => "attention.wgsl",
    RmsNorm => "rmsnorm.wgsl",
    Rope => "rope.wgsl",
    Swiglu => "swiglu.wgsl",
    QkvPack => "qkv_pack.wgsl",
}

/// Helper files that families `#include`, by their path under `shaders/`.
pub const INCLUDES: &[(&str, &str)] = &[
    (
        "include/attention_rows.wgsl",
        include_str!("../../shaders/include/attention_rows.wgsl"),
    ),
    (
        "include/hash.wgsl",
        include_str!("../../shaders/include/hash.wgsl"),
    ),
    (
        "include/gelu.wgsl",
        include_str!("../../shaders/include/gelu.wgsl"),
    ),
    (
        "include/gemm_ureg.wgsl",
        include_str!("../../shaders/include/gemm_ureg.wgsl"),
    ),
    (
        "include/grid.wgsl",
        include_str!("../../shaders/include/grid.wgsl"),
    ),
    (
        "include/reduce_wg.wgsl",
        include_str!("../../shaders/include/reduce_wg.wgsl"),
    ),
    (
        "include/row_norm.wgsl",
        include_str!("../../shaders/include/row_norm.wgsl"),
    ),
    (
        "include/step.wgsl",
        include_str!("../../shaders/include/step.wgsl"),
    ),
];

/// The form a family's source is compiled in: what the loader's prelude declares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShaderVariant {
    /// The source as written: its storage alias (if any) is f32, no optional feature.
    #[default]
    Base,
    /// The family's storage alias is f16 (`enable f16;`): adapters with SHADER_F16.
    F16,
    /// The `#if SUBGROUP` sections: adapters with SUBGROUP. naga 30 rejects
    /// `enable subgroups;` as unsupported and checks the built-ins against the device's
    /// capabilities instead, so this prelude has no directive.
    Subgroup,
}

impl ShaderVariant {
    /// The names `#if` sees as defined.
    pub fn defines(self) -> &'static [&'static str] {
        match self {
            ShaderVariant::Base | ShaderVariant::F16 => &[],
            ShaderVariant::Subgroup => &["SUBGROUP"],
        }
    }

    /// What kernel names add after the family: "" for `Base`, "_f16", "_subgroup".
    pub fn suffix(self) -> &'static str {
        match self {
            ShaderVariant::Base => "",
            ShaderVariant::F16 => "_f16",
            ShaderVariant::Subgroup => "_subgroup",
        }
    }
}

/// Every name any variant or entry form defines: `#if` of anything else is a typo.
const KNOWN_DEFINES: &[&str] = &["SUBGROUP", "VEC_A", "VEC_B"];

/// Entry points compiled from another function of their family's source with `#if` names of
/// their own: (family, entry point as kernels name it, function in the source, names).
const ENTRY_FORMS: &[(Shader, &str, &str, &[&str])] = &[
    (Shader::Gemm, "gemm_tiled_va", "gemm_tiled", &["VEC_A"]),
    (Shader::Gemm, "gemm_tiled_vb", "gemm_tiled", &["VEC_B"]),
    (
        Shader::Gemm,
        "gemm_tiled_vab",
        "gemm_tiled",
        &["VEC_A", "VEC_B"],
    ),
    (
        Shader::Gemm,
        "gemm_gemvc_vab",
        "gemm_gemvc",
        &["VEC_A", "VEC_B"],
    ),
    (Shader::Gemm, "gemm_reg_vb", "gemm_reg", &["VEC_B"]),
    (Shader::Gemm, "gemm_ureg_vb", "gemm_ureg", &["VEC_B"]),
    (
        Shader::Gemm,
        "gemm_ureg_vab",
        "gemm_ureg",
        &["VEC_A", "VEC_B"],
    ),
];

impl Shader {
    /// The variants this family's source compiles to, `Base` first.
    pub fn variants(self) -> &'static [ShaderVariant] {
        match self {
            Shader::Gemm | Shader::Embedding | Shader::Attention => {
                &[ShaderVariant::Base, ShaderVariant::F16]
            }
            Shader::LayerNorm => &[ShaderVariant::Base, ShaderVariant::Subgroup],
            _ => &[ShaderVariant::Base],
        }
    }

    /// The function of the source that entry point `entry` runs, and the `#if` names its module
    /// is expanded with beyond the variant's: `entry` itself and none for most entry points.
    pub fn entry_form(self, entry: &'static str) -> (&'static str, &'static [&'static str]) {
        ENTRY_FORMS
            .iter()
            .find(|(s, e, _, _)| *s == self && *e == entry)
            .map_or((entry, &[]), |&(_, _, f, d)| (f, d))
    }

    /// Every set of entry-form names this family's modules are expanded with, the empty set
    /// first.
    pub fn form_defines(self) -> Vec<&'static [&'static str]> {
        let mut out: Vec<&'static [&'static str]> = vec![&[]];
        for &(s, _, _, d) in ENTRY_FORMS {
            if s == self && !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// The alias of the family's storage element type that the `Base` and `F16` preludes define.
    pub fn elem_alias(self) -> Option<&'static str> {
        match self {
            Shader::Gemm => Some("BElem"),
            Shader::Embedding => Some("TableElem"),
            Shader::Attention => Some("KvElem"),
            _ => None,
        }
    }

    /// "family" or "family_variant" (e.g. "gemm_f16"): the prefix of kernel names and labels.
    pub fn name(self, variant: ShaderVariant) -> String {
        format!(
            "{}{}",
            self.file_name().trim_end_matches(".wgsl"),
            variant.suffix()
        )
    }

    /// The text the loader puts before the family's source for `variant`.
    pub fn prelude(self, variant: ShaderVariant) -> String {
        let mut s = String::new();
        if variant == ShaderVariant::F16 {
            s.push_str("enable f16;\n");
        }
        if let Some(alias) = self.elem_alias() {
            let ty = if variant == ShaderVariant::F16 {
                "f16"
            } else {
                "f32"
            };
            s.push_str(&format!("alias {alias} = {ty};\n"));
        }
        s
    }
}

/// Source text after prelude, `#include` and `#if` expansion, with a map from each of its lines
/// back to the file and line it came from.
#[derive(Clone, Debug)]
pub struct Expanded {
    pub text: String,
    /// The files that contributed lines, first the prelude's pseudo-file then the family's.
    files: Vec<String>,
    /// For line n (0-based) of `text`: (index into `files`, 1-based line in that file).
    lines: Vec<(usize, u32)>,
}

impl Expanded {
    /// Text that came from one file as it is, line for line (no prelude, no directives).
    pub fn plain(file: &str, text: &str) -> Expanded {
        Expanded {
            text: text.to_string(),
            files: vec![file.to_string()],
            lines: (1..=text.lines().count().max(1) as u32)
                .map(|l| (0, l))
                .collect(),
        }
    }

    /// The file and line that line `line` (1-based) of the text came from.
    pub fn origin(&self, line: u32) -> (&str, u32) {
        let i = (line.max(1) as usize - 1).min(self.lines.len().saturating_sub(1));
        match self.lines.get(i) {
            Some(&(f, l)) => (&self.files[f], l),
            None => (&self.files[0], line),
        }
    }

    /// Every file that contributed at least one line (the family's and its includes).
    pub fn files(&self) -> impl Iterator<Item = &str> {
        let used: BTreeSet<usize> = self.lines.iter().map(|&(f, _)| f).collect();
        used.into_iter().map(|f| self.files[f].as_str())
    }

    /// The name errors without a line are reported under: the family's file.
    pub fn main_file(&self) -> &str {
        self.files.get(1).unwrap_or(&self.files[0])
    }
}

/// A source text and the name to report its errors under.
pub type Loaded = (String, Cow<'static, str>);

/// Expands `family`'s source for `variant`: prelude, then the source with its `#include` and
/// `#if` lines resolved. `read(path)` returns the file `path` (relative to `shaders/`) and its
/// display name.
pub fn expand(
    family: Shader,
    variant: ShaderVariant,
    read: &dyn Fn(&str) -> Result<Loaded>,
) -> Result<Expanded> {
    expand_form(family, variant, &[], read)
}

/// [`expand`] with the entry-form names `form` defined as well as the variant's.
pub fn expand_form(
    family: Shader,
    variant: ShaderVariant,
    form: &[&str],
    read: &dyn Fn(&str) -> Result<Loaded>,
) -> Result<Expanded> {
    let prelude = family.prelude(variant);
    let mut out = Expanded {
        text: String::new(),
        files: vec![format!("<prelude of {}>", family.name(variant))],
        lines: Vec::new(),
    };
    for (i, line) in prelude.lines().enumerate() {
        out.text.push_str(line);
        out.text.push('\n');
        out.lines.push((0, i as u32 + 1));
    }
    let mut defines = variant.defines().to_vec();
    defines.extend_from_slice(form);
    let mut expander = Expander {
        defines: &defines,
        read,
        out: &mut out,
        stack: Vec::new(),
    };
    expander.file(family.file_name())?;
    Ok(out)
}

/// The error for a bad directive at `file:line`.
fn directive_error(file: &str, line: usize, message: String) -> Error {
    Error::ShaderParse {
        file: file.to_string(),
        line: line as u32,
        column: 1,
        message,
    }
}

/// One open `#if`: whether its current branch is kept, whether `#else` was seen, its line.
struct Cond {
    keep: bool,
    seen_else: bool,
    line: usize,
}

/// A directive line: `#include "path"`, `#if NAME`, `#else` or `#endif`.
enum Directive<'t> {
    Include(&'t str),
    If(&'t str),
    Else,
    Endif,
}

impl<'t> Directive<'t> {
    /// Parses `directive`, the text after `#` on line `n` of `file`.
    fn parse(directive: &'t str, file: &str, n: usize) -> Result<Directive<'t>> {
        let mut words = directive.split_whitespace();
        let (word, arg) = (words.next().unwrap_or(""), words.next());
        if words.next().is_some() {
            return Err(directive_error(
                file,
                n,
                format!("`#{word}` takes at most one argument"),
            ));
        }
        match (word, arg) {
            ("include", Some(arg)) => match arg.strip_prefix('"').and_then(|a| a.strip_suffix('"'))
            {
                Some(target) => Ok(Directive::Include(target)),
                None => Err(directive_error(
                    file,
                    n,
                    format!("`#include` needs a quoted path, got {arg}"),
                )),
            },
            ("if", Some(arg)) if KNOWN_DEFINES.contains(&arg) => Ok(Directive::If(arg)),
            ("if", Some(arg)) => Err(directive_error(
                file,
                n,
                format!(
                    "`#if {arg}`: unknown name (known: {})",
                    KNOWN_DEFINES.join(", ")
                ),
            )),
            ("else", None) => Ok(Directive::Else),
            ("endif", None) => Ok(Directive::Endif),
            _ => Err(directive_error(
                file,
                n,
                format!(
                    "unknown directive `#{}` (expected #include \"file\", #if NAME, #else, \
                     #endif)",
                    directive.trim()
                ),
            )),
        }
    }
}

/// Expands files into `out` for one variant, following includes.
struct Expander<'e> {
    /// The names `#if` sees as defined.
    defines: &'e [&'e str],
    read: &'e dyn Fn(&str) -> Result<Loaded>,
    out: &'e mut Expanded,
    /// The files being expanded, outermost first: an include of one of them is a cycle.
    stack: Vec<String>,
}

impl Expander<'_> {
    /// Appends the lines of `path` that the variant keeps, with its includes expanded.
    fn file(&mut self, path: &str) -> Result<()> {
        let (name, text) = (self.read)(path)?;
        if self.stack.iter().any(|p| p == path) {
            return Err(Error::ShaderInvalid {
                file: name,
                message: format!("includes itself (through {})", self.stack.join(" -> ")),
            });
        }
        self.stack.push(path.to_string());
        let file = self.out.files.len();
        self.out.files.push(name.clone());
        let mut conds: Vec<Cond> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let kept = conds.iter().all(|c| c.keep);
            let Some(directive) = line.trim_start().strip_prefix('#') else {
                if kept {
                    self.out.text.push_str(line);
                    self.out.text.push('\n');
                    self.out.lines.push((file, n as u32));
                }
                continue;
            };
            match Directive::parse(directive, &name, n)? {
                Directive::Include(target) if kept => self.include(target, &name, n)?,
                Directive::Include(_) => {}
                Directive::If(arg) => conds.push(Cond {
                    keep: self.defines.contains(&arg),
                    seen_else: false,
                    line: n,
                }),
                Directive::Else => match conds.last_mut() {
                    Some(c) if !c.seen_else => {
                        c.keep = !c.keep;
                        c.seen_else = true;
                    }
                    _ => {
                        let message = "`#else` without an open `#if`".into();
                        return Err(directive_error(&name, n, message));
                    }
                },
                Directive::Endif => {
                    if conds.pop().is_none() {
                        let message = "`#endif` without an open `#if`".into();
                        return Err(directive_error(&name, n, message));
                    }
                }
            }
        }
        if let Some(c) = conds.last() {
            let message = "`#if` without `#endif`".into();
            return Err(directive_error(&name, c.line, message));
        }
        self.stack.pop();
        Ok(())
    }

    /// Expands `target`, included from line `n` of `from`; a file that cannot be read is an
    /// error at the `#include` line.
    fn include(&mut self, target: &str, from: &str, n: usize) -> Result<()> {
        self.file(target).map_err(|e| match e {
            Error::ShaderRead { file, source } => directive_error(
                from,
                n,
                format!("cannot include \"{target}\" ({file}: {source})"),
            ),
            other => other,
        })
    }
}

/// Where shader sources come from.
#[derive(Clone, Debug, Default)]
pub enum ShaderSource {
    /// The copies embedded at build time.
    #[default]
    Embedded,
    /// `<dir>/<file_name>` (and `<dir>/include/...`) read at pipeline-creation time; files
    /// missing there fall back to the embedded copy, so a directory can hold only the shader
    /// being edited.
    Dir(PathBuf),
}

impl ShaderSource {
    /// The text of `path` (relative to `shaders/`: a family's file or an include) and the name
    /// to report errors under.
    pub fn read(&self, path: &str) -> Result<Loaded> {
        match self {
            ShaderSource::Embedded => embedded(path)
                .map(|text| (format!("shaders/{path}"), Cow::Borrowed(text)))
                .ok_or_else(|| Error::ShaderRead {
                    file: format!("shaders/{path}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such shader or include is embedded",
                    ),
                }),
            ShaderSource::Dir(dir) => {
                let file = dir.join(path);
                // Only a file that is not there at all falls back: a dangling link or a link
                // loop is the user's file, broken, and an error naming it.
                if std::fs::symlink_metadata(&file).is_err() && embedded(path).is_some() {
                    return ShaderSource::Embedded.read(path);
                }
                let text = crate::io::files::read_text(&file, crate::io::files::Kind::Shader)
                    .map_err(|source| Error::ShaderRead {
                        file: file.display().to_string(),
                        source,
                    })?;
                Ok((file.display().to_string(), Cow::Owned(text)))
            }
        }
    }

    /// Reads every family file and include present in a `--shader-dir` (a dangling link, a link
    /// loop, a FIFO, a device, a file far larger than a shader: an error naming the file), so a
    /// broken file stops the run at start-up instead of falling back or hanging later.
    pub fn check_files(&self) -> Result<()> {
        let ShaderSource::Dir(dir) = self else {
            return Ok(());
        };
        let names = Shader::ALL
            .iter()
            .map(|s| s.file_name())
            .chain(INCLUDES.iter().map(|(p, _)| *p));
        for name in names {
            if std::fs::symlink_metadata(dir.join(name)).is_ok() {
                self.read(name)?;
            }
        }
        Ok(())
    }

    /// The file `shader`'s source is read from: `--shader-dir`'s copy where one is there, else
    /// the embedded one.
    pub fn file_of(&self, shader: Shader) -> String {
        let name = shader.file_name();
        match self {
            ShaderSource::Dir(dir) if std::fs::symlink_metadata(dir.join(name)).is_ok() => {
                dir.join(name).display().to_string()
            }
            _ => format!("shaders/{name} (embedded)"),
        }
    }

    /// `shader`'s source expanded for `variant` (see the module documentation).
    pub fn load(&self, shader: Shader, variant: ShaderVariant) -> Result<Expanded> {
        expand(shader, variant, &|path| self.read(path))
    }

    /// [`ShaderSource::load`] with the entry-form names `form` defined too.
    pub fn load_form(
        &self,
        shader: Shader,
        variant: ShaderVariant,
        form: &[&str],
    ) -> Result<Expanded> {
        expand_form(shader, variant, form, &|path| self.read(path))
    }
}

impl ShaderSource {
    /// A hash of every shader source as this source loads it (an unreadable file hashes its
    /// error), so measurements made with other shader text are not reused.
    pub fn hash(&self) -> u64 {
        let mut text = Vec::new();
        for &shader in Shader::ALL {
            for variant in [
                ShaderVariant::Base,
                ShaderVariant::F16,
                ShaderVariant::Subgroup,
            ] {
                for form in shader.form_defines() {
                    match self.load_form(shader, variant, form) {
                        Ok(src) => text.extend_from_slice(src.text.as_bytes()),
                        Err(e) => text.extend_from_slice(e.to_string().as_bytes()),
                    }
                    text.push(0);
                }
            }
        }
        super::tuning_cache::fnv1a(&text)
    }
}

/// The embedded text of a family's file or an include, by its path under `shaders/`.
fn embedded(path: &str) -> Option<&'static str> {
    Shader::ALL
        .iter()
        .find(|s| s.file_name() == path)
        .map(|s| s.embedded_source())
        .or_else(|| INCLUDES.iter().find(|(p, _)| *p == path).map(|(_, t)| *t))
}

/// Parses and validates plain WGSL with naga, turning the first problem into a one-line error
/// that names the file, line and column. `file` is only used in messages.
pub fn validate_wgsl(file: &str, source: &str) -> Result<naga::Module> {
    validate(&Expanded::plain(file, source))
}

/// Parses and validates expanded WGSL with naga; an error names the file, line and column that
/// the offending text came from (through the line map), not its place in the expansion.
pub fn validate(src: &Expanded) -> Result<naga::Module> {
    let at = |loc: naga::SourceLocation, message: String| {
        let (file, line) = src.origin(loc.line_number);
        Error::ShaderParse {
            file: file.to_string(),
            line,
            column: loc.line_position,
            message,
        }
    };
    let module = naga::front::wgsl::parse_str(&src.text).map_err(|e| {
        let message = e.message().to_string();
        match e.location(&src.text) {
            Some(loc) => at(loc, message),
            None => Error::ShaderInvalid {
                file: src.main_file().to_string(),
                message,
            },
        }
    })?;
    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    validator.validate(&module).map_err(|e| {
        let mut message = e.as_inner().to_string();
        let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(e.as_inner());
        while let Some(s) = cause {
            message.push_str(": ");
            message.push_str(&s.to_string());
            cause = s.source();
        }
        match e.location(&src.text) {
            Some(loc) => at(loc, message),
            None => Error::ShaderInvalid {
                file: src.main_file().to_string(),
                message,
            },
        }
    })?;
    Ok(module)
}

/// The `shaders/` directory of the source tree (for tests and tools that read the files).
pub fn source_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader over in-memory files, for expanding sources without touching `shaders/`.
    fn files(list: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Result<Loaded> {
        move |path: &str| {
            list.iter()
                .find(|(p, _)| *p == path)
                .map(|(p, t)| (p.to_string(), Cow::Borrowed(*t)))
                .ok_or_else(|| Error::ShaderRead {
                    file: path.to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "missing"),
                })
        }
    }

    #[test]
    fn prelude_declares_the_alias_of_the_variant() {
        assert_eq!(
            Shader::Gemm.prelude(ShaderVariant::F16),
            "enable f16;\nalias BElem = f16;\n"
        );
        assert_eq!(
            Shader::Gemm.prelude(ShaderVariant::Base),
            "alias BElem = f32;\n"
        );
        assert_eq!(Shader::LayerNorm.prelude(ShaderVariant::Subgroup), "");
        assert_eq!(Shader::Gemm.name(ShaderVariant::F16), "gemm_f16");
        assert_eq!(Shader::Gelu.name(ShaderVariant::Base), "gelu");
    }

    #[test]
    fn includes_and_conditionals_expand_with_a_line_map() {
        let read = files(&[
            (
                "layernorm.wgsl",
                "a\n#include \"include/x.wgsl\"\n#if SUBGROUP\nsg\n#else\nshared\n#endif\nz\n",
            ),
            ("include/x.wgsl", "x1\nx2\n"),
        ]);
        let sub = expand(Shader::LayerNorm, ShaderVariant::Subgroup, &read).unwrap();
        assert_eq!(sub.text, "a\nx1\nx2\nsg\nz\n");
        assert_eq!(sub.origin(1), ("layernorm.wgsl", 1));
        assert_eq!(sub.origin(3), ("include/x.wgsl", 2));
        assert_eq!(sub.origin(4), ("layernorm.wgsl", 4));
        assert_eq!(sub.origin(5), ("layernorm.wgsl", 8));
        let base = expand(Shader::LayerNorm, ShaderVariant::Base, &read).unwrap();
        assert_eq!(base.text, "a\nx1\nx2\nshared\nz\n");
        assert_eq!(base.origin(4), ("layernorm.wgsl", 6));
        // The prelude's lines map to the prelude.
        let read = files(&[("gemm.wgsl", "b\n")]);
        let f16 = expand(Shader::Gemm, ShaderVariant::F16, &read).unwrap();
        assert_eq!(f16.text, "enable f16;\nalias BElem = f16;\nb\n");
        assert_eq!(f16.origin(2), ("<prelude of gemm_f16>", 2));
        assert_eq!(f16.origin(3), ("gemm.wgsl", 1));
    }

    /// A family file in --shader-dir that is a dangling link, a link loop, a FIFO or an endless
    /// device is an error naming it, found without blocking or reading gigabytes; a file that
    /// is not there falls back to the embedded copy.
    #[cfg(unix)]
    #[test]
    fn unreadable_files_in_a_shader_dir_are_errors_naming_them() {
        let dir = std::env::temp_dir().join(format!("sf-shader-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = ShaderSource::Dir(dir.clone());
        assert!(src.check_files().is_ok());
        assert!(src.read("gemm.wgsl").unwrap().0.starts_with("shaders/"));
        let gemm = dir.join("gemm.wgsl");
        let make: [(&str, &dyn Fn()); 4] = [
            ("dangling", &|| {
                std::os::unix::fs::symlink(dir.join("nowhere.wgsl"), &gemm).unwrap()
            }),
            ("loop", &|| {
                std::os::unix::fs::symlink(&gemm, &gemm).unwrap()
            }),
            ("fifo", &|| {
                let ok = std::process::Command::new("mkfifo").arg(&gemm).status();
                assert!(ok.unwrap().success());
            }),
            ("zero", &|| {
                std::os::unix::fs::symlink("/dev/zero", &gemm).unwrap()
            }),
        ];
        for (what, make) in make {
            let _ = std::fs::remove_file(&gemm);
            make();
            let t0 = std::time::Instant::now();
            let e = src.check_files().expect_err(what).to_string();
            assert!(e.contains("gemm.wgsl"), "{what}: {e}");
            let e = src.read("gemm.wgsl").expect_err(what).to_string();
            assert!(e.contains(&gemm.display().to_string()), "{what}: {e}");
            assert!(t0.elapsed().as_secs() < 5, "{what}: slow");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_directives_name_their_file_and_line() {
        type Files = &'static [(&'static str, &'static str)];
        let cases: &[(Files, &str)] = &[
            (&[("gelu.wgsl", "a\n#if NOPE\n#endif\n")], "gelu.wgsl:2:"),
            (&[("gelu.wgsl", "a\n\n#if SUBGROUP\n")], "gelu.wgsl:3:"),
            (&[("gelu.wgsl", "#else\n")], "gelu.wgsl:1:"),
            (&[("gelu.wgsl", "a\n#endif\n")], "gelu.wgsl:2:"),
            (&[("gelu.wgsl", "a\n#define X 1\n")], "gelu.wgsl:2:"),
            (&[("gelu.wgsl", "a\n#include x.wgsl\n")], "gelu.wgsl:2:"),
            (
                &[("gelu.wgsl", "a\nb\n#include \"include/gone.wgsl\"\n")],
                "gelu.wgsl:3:",
            ),
            (
                &[
                    ("gelu.wgsl", "#include \"include/a.wgsl\"\n"),
                    ("include/a.wgsl", "x\n#include \"include/gone.wgsl\"\n"),
                ],
                "include/a.wgsl:2:",
            ),
        ];
        for &(list, want) in cases {
            let err = expand(Shader::Gelu, ShaderVariant::Base, &files(list))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "expected {want}..., got {err}");
        }
        let list: Files = &[
            ("gelu.wgsl", "#include \"include/a.wgsl\"\n"),
            ("include/a.wgsl", "#include \"include/a.wgsl\"\n"),
        ];
        let err = expand(Shader::Gelu, ShaderVariant::Base, &files(list)).unwrap_err();
        assert!(err.to_string().contains("includes itself"), "{err}");
    }

    #[test]
    fn naga_errors_are_translated_to_the_source_line() {
        // Line 3 of the include is broken; in the expansion it is line 2 + 1 + 3 = 6.
        let list: &'static [(&'static str, &'static str)] = &[
            (
                "gemm.wgsl",
                "// gemm\n#include \"include/h.wgsl\"\nfn g() {}\n",
            ),
            (
                "include/h.wgsl",
                "fn h() -> u32 {\n    var x = 1u;\n    return x +;\n}\n",
            ),
        ];
        let src = expand(Shader::Gemm, ShaderVariant::F16, &files(list)).unwrap();
        let err = validate(&src).unwrap_err().to_string();
        assert!(err.starts_with("include/h.wgsl:3:"), "{err}");
        // A validation (not parse) error in the family's file: an unknown function.
        let list: &'static [(&'static str, &'static str)] = &[(
            "gemm.wgsl",
            "// gemm\n\n\nfn g() -> f32 {\n    return read_b(0u);\n}\n",
        )];
        let src = expand(Shader::Gemm, ShaderVariant::Base, &files(list)).unwrap();
        let err = validate(&src).unwrap_err().to_string();
        assert!(err.starts_with("gemm.wgsl:5:12:"), "{err}");
    }
}
