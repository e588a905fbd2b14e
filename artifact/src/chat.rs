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

/// A conversation rendered for training, and the byte ranges of the rendered text the
/// model learns to produce: each assistant turn's content, and the end-of-turn text the
/// template puts right after it (up to and including `eos_token`, when that follows
/// within a few bytes), so the model learns where a reply ends.
pub fn training_text(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
) -> Result<(String, Vec<(usize, usize)>)> {
    let text = render(template, messages, false, bos_token, eos_token)?;
    let mut spans = Vec::new();
    let mut cursor = 0;
    for m in messages {
        if m.content.is_empty() {
            continue;
        }
        let Some(found) = text[cursor..].find(&m.content) else {
            return Err(ArtifactError::ChatTemplate(format!(
                "the template does not keep the {} turn's text verbatim; cannot tell which tokens to learn",
                m.role
            )));
        };
        let start = cursor + found;
        let mut end = start + m.content.len();
        if m.role == "assistant" {
            if !eos_token.is_empty()
                && let Some(eos) = text[end..].find(eos_token).filter(|&at| at <= 2)
            {
                end += eos + eos_token.len();
            }
            spans.push((start, end));
        }
        cursor = end;
    }
    Ok((text, spans))
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

    #[test]
    fn training_text_marks_assistant_turns_and_their_end() {
        let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";
        let messages = [
            Message::new("system", "Be brief."),
            Message::new("user", "Who is Hamlet?"),
            Message::new("assistant", "A prince."),
            Message::new("user", "Of where?"),
            Message::new("assistant", "Denmark."),
        ];
        let (text, spans) = training_text(template, &messages, "", "<|im_end|>").expect("render");
        let learned: Vec<&str> = spans.iter().map(|&(a, b)| &text[a..b]).collect();
        assert_eq!(learned, vec!["A prince.<|im_end|>", "Denmark.<|im_end|>"]);
        let err = training_text("{{ messages | length }}", &messages, "", "").expect_err("not verbatim");
        assert!(err.to_string().contains("verbatim"), "{err}");
    }
}
