//! Chat prompts: a model's own Jinja chat template (`tokenizer.chat_template` of a GGUF
//! file, `chat_template` of `tokenizer_config.json`) rendered with minijinja, as
//! Hugging Face's `apply_chat_template` does.

use serde::{Deserialize, Serialize};

use crate::error::{ArtifactError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A turn of `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Render `messages` with `template`; with `add_generation_prompt`, the template's
/// opening of the assistant's turn is appended.
pub fn render(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| ArtifactError::ChatTemplate(e.to_string()))?;
    let tmpl = env.get_template("chat").map_err(|e| ArtifactError::ChatTemplate(e.to_string()))?;
    let messages: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| {
            let turn = std::collections::BTreeMap::from([
                ("role".to_string(), minijinja::Value::from(m.role.as_str())),
                ("content".to_string(), minijinja::Value::from(m.content.as_str())),
            ]);
            minijinja::Value::from(turn)
        })
        .collect();
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| ArtifactError::ChatTemplate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its GGUF file carries it.
    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_template_renders_as_transformers_does() {
        let out = render(SMOLLM2, &[Message::new("user", "Hi!")], true, "", "").expect("render");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        let sys = [Message::new("system", "Be brief."), Message::new("user", "2+2?")];
        let out = render(SMOLLM2, &sys, false, "", "").expect("render");
        assert_eq!(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n");
    }

    #[test]
    fn broken_templates_are_errors() {
        let err = render("{% for %}", &[], true, "", "").expect_err("syntax").to_string();
        assert!(err.contains("chat template"), "{err}");
        let err = render("{{ raise_exception('no system role') }}", &[], true, "", "").expect_err("raise").to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
