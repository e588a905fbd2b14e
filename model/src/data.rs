//! Corpora: plain text and JSONL loaders, the Shakespeare plays split by play and
//! by speaking role, and seeded batching of token streams.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};

/// One text of a corpus (a file, or one JSONL record).
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// File name, or `file:line` for JSONL records.
    pub name: String,
    /// The text.
    pub text: String,
}

/// Load a corpus from a `.txt` file, a `.jsonl` file (one `{"text": ...}` object a
/// line), or a directory of those (sorted by name, not recursive).
///
/// An empty corpus is an error naming the path.
pub fn load_corpus(path: &Path) -> Result<Vec<Document>> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    let mut docs = Vec::new();
    if meta.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| ModelError::io(path, e))? {
            let p = entry.map_err(|e| ModelError::io(path, e))?.path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl")) {
                files.push(p);
            }
        }
        files.sort();
        for file in files {
            load_file(&file, &mut docs)?;
        }
    } else {
        load_file(path, &mut docs)?;
    }
    docs.retain(|d| !d.text.trim().is_empty());
    if docs.is_empty() {
        return Err(ModelError::EmptyCorpus { path: path.to_owned(), needed: None });
    }
    Ok(docs)
}

fn load_file(path: &Path, docs: &mut Vec<Document>) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
        #[derive(serde::Deserialize)]
        struct Record {
            text: String,
        }
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record: Record = serde_json::from_str(line).map_err(|source| ModelError::Json {
                path: PathBuf::from(format!("{}:{}", path.display(), i + 1)),
                source,
            })?;
            docs.push(Document { name: format!("{name}:{}", i + 1), text: record.text });
        }
    } else {
        docs.push(Document { name, text });
    }
    Ok(())
}

/// Split documents into (train, held-out) by holding out `n_holdout` whole documents
/// chosen by a seeded shuffle among those for which `eligible` holds.
pub fn holdout_documents(
    docs: Vec<Document>,
    n_holdout: usize,
    seed: u64,
    eligible: impl Fn(&Document) -> bool,
) -> (Vec<Document>, Vec<Document>) {
    let mut candidates: Vec<usize> = (0..docs.len()).filter(|&i| eligible(&docs[i])).collect();
    candidates.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    candidates.truncate(n_holdout);
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if candidates.contains(&i) { held.push(d) } else { train.push(d) }
    }
    (train, held)
}

/// One speech of a play: the speaker's tag as printed (`Ham.`, `PORTIA.`) and the lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Speech {
    /// The speaker tag without its final period.
    pub speaker: String,
    /// The lines spoken, newline-separated.
    pub text: String,
}

/// The speeches of a Gutenberg Shakespeare play: a blank line, a speaker tag ending
/// with a period on its own line, then the speech up to the next blank line.
pub fn speeches(text: &str) -> Vec<Speech> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < lines.len() {
        let prev_blank = i == 0 || lines[i - 1].trim().is_empty();
        if prev_blank && is_speaker_tag(lines[i]) && !lines[i + 1].trim().is_empty() {
            let speaker = lines[i].trim().trim_end_matches('.').to_string();
            let mut j = i + 1;
            let mut body = Vec::new();
            while j < lines.len() && !lines[j].trim().is_empty() {
                body.push(lines[j]);
                j += 1;
            }
            out.push(Speech { speaker, text: body.join("\n") });
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn is_speaker_tag(line: &str) -> bool {
    let l = line.trim();
    l.len() >= 2
        && l.len() <= 40
        && l.ends_with('.')
        && l.starts_with(|c: char| c.is_ascii_uppercase())
        && l.chars().all(|c| c.is_alphabetic() || matches!(c, ' ' | '.' | '\'' | '-'))
        && !l.starts_with("ACT")
        && !l.starts_with("SCENE")
        && !l.starts_with("Scene")
}

/// A role's speeches as training and held-out text: every `k`-th speech (k = 10) is
/// held out, the rest is training text. Speeches are rendered as the play prints them.
pub fn role_split(text: &str, speaker: &str) -> (String, String) {
    let mut train = String::new();
    let mut test = String::new();
    for (n, s) in speeches(text).into_iter().filter(|s| s.speaker == speaker).enumerate() {
        let rendered = format!("{}.\n{}\n\n", s.speaker, s.text);
        if n % 10 == 9 { test.push_str(&rendered) } else { train.push_str(&rendered) }
    }
    (train, test)
}

/// The speakers of a play with the number of bytes they speak, largest first.
pub fn roles_by_size(text: &str) -> Vec<(String, usize)> {
    let mut sizes = std::collections::BTreeMap::<String, usize>::new();
    for s in speeches(text) {
        *sizes.entry(s.speaker).or_default() += s.text.len();
    }
    let mut v: Vec<_> = sizes.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// Draws seeded random windows of `seq_len + 1` tokens from a token stream.
#[derive(Debug, Clone)]
pub struct Batcher {
    tokens: Vec<u32>,
    seq_len: usize,
    rng: ChaCha8Rng,
}

impl Batcher {
    /// A batcher over `tokens`; fails when the stream is shorter than one window.
    pub fn new(tokens: Vec<u32>, seq_len: usize, seed: u64, source: &Path) -> Result<Self> {
        if tokens.len() < seq_len + 1 {
            return Err(ModelError::EmptyCorpus { path: source.to_owned(), needed: Some(seq_len + 1) });
        }
        Ok(Self { tokens, seq_len, rng: ChaCha8Rng::seed_from_u64(seed) })
    }

    /// Advance the sampler past `batches` batches of `batch` sequences without building
    /// them: the next batch is the one [`Batcher::next_batch`] would have returned after
    /// as many calls. Used to resume an interrupted run on the same data.
    pub fn skip(&mut self, batches: usize, batch: usize) {
        let last = self.tokens.len() - self.seq_len - 1;
        for _ in 0..batches * batch {
            let _: usize = self.rng.random_range(0..=last);
        }
    }

    /// Inputs and targets `[batch, seq_len]`.
    pub fn next_batch(&mut self, batch: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let n = self.seq_len;
        let mut inputs = Vec::with_capacity(batch * n);
        let mut targets = Vec::with_capacity(batch * n);
        for _ in 0..batch {
            let start = self.rng.random_range(0..=self.tokens.len() - n - 1);
            let w = &self.tokens[start..start + n + 1];
            inputs.extend(w[..n].iter().map(|&t| t as i64));
            targets.extend(w[1..].iter().map(|&t| t as i64));
        }
        (
            Tensor::from_data(TensorData::new(inputs, [batch, n]), device),
            Tensor::from_data(TensorData::new(targets, [batch, n]), device),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAY: &str = "ACT I.\n\nScene I. A room.\n\n[Enter Hamlet.]\n\nHam.\nTo be, or not to be:\nthat is the question.\n\nHor.\nMy lord?\n\nHam.\nAy.\n";

    #[test]
    fn speeches_are_split_by_speaker_tags() {
        let s = speeches(PLAY);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].speaker, "Ham");
        assert_eq!(s[0].text, "To be, or not to be:\nthat is the question.");
        assert_eq!(s[1], Speech { speaker: "Hor".into(), text: "My lord?".into() });
        assert_eq!(roles_by_size(PLAY)[0].0, "Ham");
    }

    #[test]
    fn jsonl_and_text_corpora_load_and_bad_lines_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.txt"), "hello").expect("write");
        std::fs::write(dir.path().join("b.jsonl"), "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n").expect("write");
        let docs = load_corpus(dir.path()).expect("load");
        assert_eq!(docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(), ["hello", "one", "two"]);

        std::fs::write(dir.path().join("b.jsonl"), "{\"text\": \"one\"}\n{\"txt\": 1}\n").expect("write");
        let err = load_corpus(dir.path()).expect_err("bad record").to_string();
        assert!(err.contains("b.jsonl:2") && err.contains("missing field `text`"), "{err}");
    }

    #[test]
    fn empty_corpus_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.txt");
        std::fs::write(&path, "  \n").expect("write");
        let err = load_corpus(&path).expect_err("empty").to_string();
        assert!(err.contains("empty.txt") && err.contains("corpus is empty"), "{err}");
        let err = Batcher::new(vec![1, 2], 8, 0, &path).expect_err("short").to_string();
        assert!(err.contains("needs at least 9 tokens"), "{err}");
    }

    #[test]
    fn skipping_batches_lands_on_the_same_batch() {
        let device = crate::cpu_device();
        let tokens: Vec<u32> = (0..500).map(|i| i % 251).collect();
        let mut a = Batcher::new(tokens.clone(), 8, 5, Path::new("t")).expect("batcher");
        let mut b = Batcher::new(tokens, 8, 5, Path::new("t")).expect("batcher");
        for _ in 0..3 {
            a.next_batch(4, &device);
        }
        b.skip(3, 4);
        let (xa, ya) = a.next_batch(4, &device);
        let (xb, yb) = b.next_batch(4, &device);
        assert_eq!(xa.into_data(), xb.into_data());
        assert_eq!(ya.into_data(), yb.into_data());
    }

    #[test]
    fn holdout_is_seeded_and_disjoint() {
        let docs: Vec<Document> = (0..10).map(|i| Document { name: format!("{i}"), text: "x".into() }).collect();
        let (a, b) = holdout_documents(docs.clone(), 3, 7, |_| true);
        let (c, d) = holdout_documents(docs, 3, 7, |_| true);
        assert_eq!((a.len(), b.len()), (7, 3));
        assert_eq!(b, d);
        assert_eq!(a, c);
        assert!(b.iter().all(|h| !a.contains(h)));
    }
}
