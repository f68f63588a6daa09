//! Chat prompts: a checkpoint's `chat_template` (tokenizer_config.json, or chat_template.jinja
//! beside it, which transformers prefers) rendered with minijinja as transformers renders it
//! (Jinja with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, Python's string
//! methods) for one user message, an optional system message and the generation prompt.

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value, context};
use serde_json::Value as Json;

use crate::error::{Error, Result};

pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const TEMPLATE_FILE: &str = "chat_template.jinja";

/// A checkpoint's chat template and the special tokens templates may refer to.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

fn bad(what: &Path, msg: impl Into<String>) -> Error {
    Error::invalid(what.display().to_string(), msg)
}

impl ChatTemplate {
    /// The template of checkpoint directory `dir`; a checkpoint without one is an error that
    /// says so.
    pub fn load(dir: &Path) -> Result<ChatTemplate> {
        let read = |name: &str| -> Result<Option<String>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(&path, e)),
            }
        };
        let config = read(TOKENIZER_CONFIG_FILE)?;
        let jinja = read(TEMPLATE_FILE)?;
        Self::from_texts(dir, config.as_deref(), jinja.as_deref())?.ok_or_else(|| {
            bad(
                dir,
                format!(
                    "has no chat template (no chat_template in {TOKENIZER_CONFIG_FILE}, no \
                     {TEMPLATE_FILE}): --chat needs one"
                ),
            )
        })
    }

    /// The template from the texts of tokenizer_config.json and chat_template.jinja (either may
    /// be absent; the .jinja file wins, as in transformers); `None` when neither holds one.
    pub fn from_texts(
        dir: &Path,
        tokenizer_config: Option<&str>,
        jinja: Option<&str>,
    ) -> Result<Option<ChatTemplate>> {
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: Json = match tokenizer_config {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| bad(&path, format!("not valid JSON: {e}")))?,
            None => Json::Null,
        };
        let source = match jinja {
            Some(text) => Some(text.to_string()),
            None => template_of(&path, config.get("chat_template"))?,
        };
        Ok(source.map(|source| ChatTemplate {
            source,
            bos_token: special_token(config.get("bos_token")),
            eos_token: special_token(config.get("eos_token")),
        }))
    }

    /// The prompt for `user`'s message after `system`'s (when given), ending with the
    /// assistant's turn (`add_generation_prompt=true`).
    pub fn render(&self, user: &str, system: Option<&str>) -> Result<String> {
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(context! { role => "system", content => system });
        }
        messages.push(context! { role => "user", content => user });
        let env = environment()?;
        let what = Path::new("chat_template");
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| bad(what, format!("does not parse: {e:#}")))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(|e| bad(what, format!("cannot be rendered: {e:#}")))
    }
}

/// Jinja as transformers configures it for chat templates.
fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::invalid("chat_template", e.to_string()))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    Ok(env)
}

/// `chat_template`: a string, or a list of named templates of which "default" is used.
fn template_of(path: &Path, v: Option<&Json>) -> Result<Option<String>> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let named = list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
            match named.and_then(|t| t.get("template")).and_then(Json::as_str) {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(bad(
                    path,
                    "chat_template is a list without a template named \"default\"",
                )),
            }
        }
        Some(_) => Err(bad(path, "chat_template is neither a string nor a list")),
    }
}

/// A special token as tokenizer_config.json writes it: a string or {"content": ...}.
fn special_token(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn qwen2() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/qwen2-tiny")
    }

    /// The fixture's metadata value `key` and tensor `name` (int32 ids).
    fn fixture(key: &str, name: &str) -> (String, Vec<u32>) {
        let bytes = std::fs::read(qwen2().join("fixture.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let text = meta.metadata().as_ref().unwrap()[key].clone();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ids = bytemuck::pod_collect_to_vec::<u8, i32>(st.tensor(name).unwrap().data());
        (text, ids.into_iter().map(|i| i as u32).collect())
    }

    #[test]
    fn renders_and_tokenizes_as_transformers_does() {
        let template = ChatTemplate::load(&qwen2()).unwrap();
        let vocab = crate::io::vocab::Vocab::load(&qwen2()).unwrap().unwrap();
        let (user, _) = fixture("chat_user", "chat_prompt_ids");
        let (system, _) = fixture("chat_system", "chat_prompt_ids");
        for (system, key, ids) in [
            (None, "chat_text", "chat_prompt_ids"),
            (
                Some(system.as_str()),
                "chat_system_text",
                "chat_system_prompt_ids",
            ),
        ] {
            let (want, want_ids) = fixture(key, ids);
            let text = template.render(&user, system).unwrap();
            assert_eq!(text, want);
            assert_eq!(vocab.encode(&text, "chat").unwrap(), want_ids, "{key}");
        }
    }

    #[test]
    fn templates_use_python_methods_and_can_refuse() {
        let t = ChatTemplate {
            source: "{% for m in messages %}{{ m.content.strip().upper() }}\n{% endfor %}\
                     {% if messages | length > 1 %}{{ raise_exception('one only') }}{% endif %}"
                .into(),
            bos_token: None,
            eos_token: None,
        };
        assert_eq!(t.render("  hi ", None).unwrap(), "HI\n");
        let e = t.render("hi", Some("sys")).unwrap_err().to_string();
        assert!(e.contains("one only"), "{e}");
    }

    #[test]
    fn a_checkpoint_without_a_template_says_so() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/gpt2-bpe");
        let e = ChatTemplate::load(&dir).unwrap_err().to_string();
        assert!(e.contains("has no chat template"), "{e}");
        let t = ChatTemplate::from_texts(&dir, Some(r#"{"chat_template": null}"#), Some("X"));
        assert_eq!(t.unwrap().unwrap().source, "X");
    }
}
