//! Tokenizers: a byte-level one built in, and Hugging Face `tokenizer.json` files
//! through the `tokenizers` crate.

use std::path::Path;

use crate::error::{ArtifactError, Result};

/// File name of a Hugging Face tokenizer inside a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A byte range `[start, end)` of a text.
pub type Span = (usize, usize);

/// Turns text into token ids and back.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// One token per byte of UTF-8 (vocabulary 256). Never fails, never unknown.
    Bytes,
    /// A Hugging Face tokenizer (BPE, WordPiece, Unigram...).
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ArtifactError::io(path, e))?;
        Self::from_json_bytes(&bytes, &path.display().to_string())
    }

    /// A Hugging Face tokenizer from the bytes of a `tokenizer.json` (`what` names their
    /// origin in errors).
    ///
    /// The `tokenizers` crate panics on JSON that is not well formed inside its decoder
    /// section (found by the `tokenizer` fuzz target), so the bytes are parsed as JSON first
    /// and the tokenizer built from the parsed value; any other panic of that crate is
    /// caught and reported as an error too.
    pub fn from_json_bytes(bytes: &[u8], what: &str) -> Result<Self> {
        let bad = |reason: String| ArtifactError::Tokenizer { path: what.into(), reason };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let tok = std::panic::catch_unwind(|| serde_json::from_value::<tokenizers::Tokenizer>(value))
            .map_err(|panic| bad(format!("malformed (the tokenizers crate panicked: {})", panic_message(&panic))))?
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self::HuggingFace(Box::new(tok)))
    }

    /// The `tokenizer.json` bytes of a Hugging Face tokenizer; `None` for bytes.
    pub fn to_json_bytes(&self) -> Result<Option<Vec<u8>>> {
        match self {
            Self::Bytes => Ok(None),
            Self::HuggingFace(t) => t
                .to_string(false)
                .map(|s| Some(s.into_bytes()))
                .map_err(|e| ArtifactError::Tokenizer { path: TOKENIZER_FILE.into(), reason: e.to_string() }),
        }
    }

    /// The tokenizer of a model directory: its `tokenizer.json` if present, else bytes.
    pub fn for_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if path.exists() { Self::from_file(&path) } else { Ok(Self::Bytes) }
    }

    /// Number of distinct token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => 256,
            Self::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Self::HuggingFace(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ArtifactError::Tokenizer { path: TOKENIZER_FILE.into(), reason: e.to_string() }),
        }
    }

    /// Token ids of `text` with the byte range of `text` each one covers.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        match self {
            Self::Bytes => Ok((text.bytes().map(u32::from).collect(), (0..text.len()).map(|i| (i, i + 1)).collect())),
            Self::HuggingFace(t) => t
                .encode(text, false)
                .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec()))
                .map_err(|e| ArtifactError::Tokenizer { path: TOKENIZER_FILE.into(), reason: e.to_string() }),
        }
    }

    /// Text of `ids`; invalid UTF-8 is replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::Bytes => {
                let bytes = ids
                    .iter()
                    .map(|&id| u8::try_from(id).map_err(|_| ArtifactError::TokenOutOfRange { id, vocab: 256 }))
                    .collect::<Result<Vec<u8>>>()?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Self::HuggingFace(t) => t
                .decode(ids, true)
                .map_err(|e| ArtifactError::Tokenizer { path: TOKENIZER_FILE.into(), reason: e.to_string() }),
        }
    }

    /// Write the tokenizer into a model directory (nothing to write for bytes).
    pub fn save_to_dir(&self, dir: &Path) -> Result<()> {
        match self {
            Self::Bytes => Ok(()),
            Self::HuggingFace(t) => {
                let path = dir.join(TOKENIZER_FILE);
                t.save(&path, false).map_err(|e| ArtifactError::Tokenizer { path: path.clone(), reason: e.to_string() })
            }
        }
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_utf8() {
        let t = Tokenizer::Bytes;
        let ids = t.encode("Wherefore art thou, Roméo?").expect("encode");
        assert_eq!(ids.len(), "Wherefore art thou, Roméo?".len());
        assert_eq!(t.decode(&ids).expect("decode"), "Wherefore art thou, Roméo?");
        assert!(t.decode(&[300]).is_err());
    }

    #[test]
    fn hugging_face_tokenizer_json_loads_and_encodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TOKENIZER_FILE);
        // A minimal word-level tokenizer in the tokenizer.json format.
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
          "normalizer": null,
          "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": null, "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "to": 1, "be": 2, "or": 3, "not": 4},
                    "unk_token": "[UNK]"}
        }"#;
        std::fs::write(&path, json).expect("write");
        let t = Tokenizer::from_file(&path).expect("load");
        assert_eq!(t.vocab_size(), 5);
        assert_eq!(t.encode("to be or not to be").expect("encode"), vec![1, 2, 3, 4, 1, 2]);
        let json = t.to_json_bytes().expect("serialize").expect("a tokenizer.json");
        let back = Tokenizer::from_json_bytes(&json, "round trip").expect("reload");
        assert_eq!(back.encode("not to be").expect("encode"), vec![4, 1, 2]);
        assert!(Tokenizer::Bytes.to_json_bytes().expect("bytes").is_none());
    }

    #[test]
    fn bad_tokenizer_file_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TOKENIZER_FILE);
        std::fs::write(&path, "{ not json").expect("write");
        let err = Tokenizer::from_file(&path).expect_err("malformed").to_string();
        assert!(err.contains("tokenizer.json") && err.contains("invalid tokenizer"), "{err}");
    }
}
