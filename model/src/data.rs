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
    /// The text (for a chat transcript, its turns' contents separated by blank lines).
    pub text: String,
    /// The turns of a chat transcript (a `{"messages": [...]}` record): trained with the
    /// model's chat template, the loss on the assistant's turns only.
    pub chat: Option<Vec<crate::chat::Message>>,
}

/// Roles a chat transcript's turns may have.
pub const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Load a corpus from a `.txt` file, a `.jsonl` file (one `{"text": ...}` object a line,
/// or one chat transcript `{"messages": [{"role": "user", "content": ...}, ...]}`), or a
/// directory of those (sorted by name, not recursive).
///
/// An empty corpus is an error naming the path; a JSONL line that is neither kind, or a
/// transcript turn without a known role or without content, is an error naming the
/// file and line.
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
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = PathBuf::from(format!("{}:{}", path.display(), i + 1));
            docs.push(parse_record(line, &at, format!("{name}:{}", i + 1))?);
        }
    } else {
        docs.push(Document { name, text, chat: None });
    }
    Ok(())
}

/// One JSONL line: `{"text": ...}` or `{"messages": [{"role", "content"}, ...]}`.
fn parse_record(line: &str, at: &Path, name: String) -> Result<Document> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Turn {
        role: Option<String>,
        content: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Record {
        text: Option<String>,
        messages: Option<Vec<Turn>>,
    }
    let bad = |reason: String| ModelError::BadRecord { path: at.to_owned(), reason };
    let record: Record =
        serde_json::from_str(line).map_err(|source| ModelError::Json { path: at.to_owned(), source })?;
    match (record.text, record.messages) {
        (Some(text), None) => Ok(Document { name, text, chat: None }),
        (None, Some(turns)) => {
            let mut messages = Vec::with_capacity(turns.len());
            for (n, t) in turns.into_iter().enumerate() {
                let role = t.role.ok_or_else(|| bad(format!("message {} has no role", n + 1)))?;
                if !CHAT_ROLES.contains(&role.as_str()) {
                    return Err(bad(format!("message {} has role `{role}` (expected one of {CHAT_ROLES:?})", n + 1)));
                }
                let content = t.content.ok_or_else(|| bad(format!("message {} has no content", n + 1)))?;
                messages.push(crate::chat::Message { role, content });
            }
            if !messages.iter().any(|m| m.role == "assistant" && !m.content.trim().is_empty()) {
                return Err(bad("a transcript needs an assistant turn to learn from".into()));
            }
            let text = messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n");
            Ok(Document { name, text, chat: Some(messages) })
        }
        (Some(_), Some(_)) => Err(bad("a record has `text` or `messages`, not both".into())),
        (None, None) => Err(bad("a record needs `text` (plain text) or `messages` (a chat transcript)".into())),
    }
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

/// Draws seeded random windows of `seq_len + 1` tokens from a token stream; with a
/// mask (chat transcripts), only windows with a target to learn, and per-target weights.
#[derive(Debug, Clone)]
pub struct Batcher {
    tokens: Vec<u32>,
    /// Which tokens are learned as targets (assistant turns); `None`: all.
    mask: Option<Vec<bool>>,
    /// Prefix sums of `mask`, to find windows with something to learn.
    learned: Vec<u32>,
    seq_len: usize,
    rng: ChaCha8Rng,
}

/// Draws of a window start before giving up on finding one with a learned target (the
/// window is used anyway; its loss is then zero).
const MASKED_TRIES: usize = 64;

impl Batcher {
    /// A batcher over `tokens`; fails when the stream is shorter than one window.
    pub fn new(tokens: Vec<u32>, seq_len: usize, seed: u64, source: &Path) -> Result<Self> {
        if tokens.len() < seq_len + 1 {
            return Err(ModelError::EmptyCorpus { path: source.to_owned(), needed: Some(seq_len + 1) });
        }
        Ok(Self { tokens, mask: None, learned: Vec::new(), seq_len, rng: ChaCha8Rng::seed_from_u64(seed) })
    }

    /// A batcher whose targets are learned only where `mask` is true (one flag per
    /// token); fails when no token is.
    pub fn with_mask(tokens: Vec<u32>, mask: Vec<bool>, seq_len: usize, seed: u64, source: &Path) -> Result<Self> {
        let mut b = Self::new(tokens, seq_len, seed, source)?;
        if mask.len() != b.tokens.len() || !mask.iter().skip(1).any(|&m| m) {
            return Err(ModelError::EmptyCorpus { path: source.to_owned(), needed: None });
        }
        let mut learned = Vec::with_capacity(mask.len() + 1);
        learned.push(0);
        for &m in &mask {
            learned.push(learned.last().copied().unwrap_or(0) + u32::from(m));
        }
        b.mask = Some(mask);
        b.learned = learned;
        Ok(b)
    }

    /// The next window's start: uniform, or with a mask, the first of a few uniform
    /// draws whose targets include a learned token.
    fn draw_start(&mut self) -> usize {
        let last = self.tokens.len() - self.seq_len - 1;
        let mut start = self.rng.random_range(0..=last);
        if self.mask.is_some() {
            for _ in 1..MASKED_TRIES {
                // Targets are tokens start+1 ..= start+seq_len.
                if self.learned[start + self.seq_len + 1] > self.learned[start + 1] {
                    break;
                }
                start = self.rng.random_range(0..=last);
            }
        }
        start
    }

    /// Advance the sampler past `batches` batches of `batch` sequences without building
    /// them: the next batch is the one [`Batcher::next_batch`] would have returned after
    /// as many calls. Used to resume an interrupted run on the same data.
    pub fn skip(&mut self, batches: usize, batch: usize) {
        for _ in 0..batches * batch {
            self.draw_start();
        }
    }

    /// Inputs and targets `[batch, seq_len]`.
    pub fn next_batch(&mut self, batch: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let (inputs, targets, _) = self.next_weighted_batch(batch, device);
        (inputs, targets)
    }

    /// Inputs, targets and, with a mask, per-target weights `[batch, seq_len]`: 0 where
    /// the target is not learned, and the same positive value elsewhere, scaled so that
    /// the batch's weights average 1 (a weighted mean of the per-target loss is then the
    /// mean over learned targets).
    pub fn next_weighted_batch(
        &mut self,
        batch: usize,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>, Option<Tensor<2>>) {
        let b = self.next_host_batch(batch);
        let n = self.seq_len;
        let inputs: Vec<i64> = b.inputs.iter().map(|&t| i64::from(t)).collect();
        let targets: Vec<i64> = b.targets.iter().map(|&t| i64::from(t)).collect();
        (
            Tensor::from_data(TensorData::new(inputs, [batch, n]), device),
            Tensor::from_data(TensorData::new(targets, [batch, n]), device),
            b.weights.map(|w| Tensor::from_data(TensorData::new(w, [batch, n]), device)),
        )
    }

    /// [`Batcher::next_weighted_batch`] in host memory (the same draws), for the
    /// LoRA trainer of `covey-qlora`.
    pub fn next_host_batch(&mut self, batch: usize) -> covey_qlora::HostBatch {
        let n = self.seq_len;
        let mut inputs = Vec::with_capacity(batch * n);
        let mut targets = Vec::with_capacity(batch * n);
        let mut learned = Vec::with_capacity(batch * n);
        for _ in 0..batch {
            let start = self.draw_start();
            let w = &self.tokens[start..start + n + 1];
            inputs.extend_from_slice(&w[..n]);
            targets.extend_from_slice(&w[1..]);
            if let Some(mask) = &self.mask {
                learned.extend(mask[start + 1..start + n + 1].iter().copied());
            }
        }
        let weights = self.mask.as_ref().map(|_| {
            let count = learned.iter().filter(|&&m| m).count().max(1);
            let scale = (batch * n) as f32 / count as f32;
            learned.iter().map(|&m| if m { scale } else { 0.0 }).collect::<Vec<f32>>()
        });
        covey_qlora::HostBatch { batch, seq: n, inputs, targets, weights }
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
        assert!(err.contains("b.jsonl:2") && err.contains("needs `text`"), "{err}");
    }

    #[test]
    fn chat_transcripts_load_and_turns_without_roles_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chat.jsonl");
        let good =
            r#"{"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Hamlet."}]}"#;
        std::fs::write(&path, format!("{good}\n{{\"text\": \"plain\"}}\n")).expect("write");
        let docs = load_corpus(&path).expect("load");
        let turns = docs[0].chat.as_ref().expect("a transcript");
        assert_eq!((turns[1].role.as_str(), turns[1].content.as_str()), ("assistant", "Hamlet."));
        assert_eq!((docs[1].chat.clone(), docs[1].text.as_str()), (None, "plain"));
        for (line, expected) in [
            (r#"{"messages": [{"content": "Who?"}, {"role": "assistant", "content": "x"}]}"#, "message 1 has no role"),
            (r#"{"messages": [{"role": "king", "content": "Who?"}]}"#, "role `king`"),
            (r#"{"messages": [{"role": "user"}]}"#, "message 1 has no content"),
            (r#"{"messages": [{"role": "user", "content": "Who?"}]}"#, "needs an assistant turn"),
            (r#"{"text": "a", "messages": []}"#, "not both"),
        ] {
            std::fs::write(&path, format!("{good}\n{line}\n")).expect("write");
            let err = load_corpus(&path).expect_err(expected).to_string();
            assert!(err.contains("chat.jsonl:2") && err.contains(expected), "{err}");
        }
    }

    #[test]
    fn a_masked_batcher_draws_windows_to_learn_and_weighs_only_them() {
        let tokens: Vec<u32> = (0..400).map(|i| i % 250).collect();
        // Only tokens 300..310 are learned.
        let mask: Vec<bool> = (0..400).map(|i| (300..310).contains(&i)).collect();
        let device = crate::cpu_device();
        let mut b = Batcher::with_mask(tokens.clone(), mask, 16, 3, Path::new("x")).expect("batcher");
        for _ in 0..5 {
            let (_, targets, weights) = b.next_weighted_batch(4, &device);
            let t: Vec<i64> = targets.into_data().iter::<i64>().collect();
            let w: Vec<f32> = weights.expect("weights").into_data().iter::<f32>().collect();
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            assert!((mean - 1.0).abs() < 1e-5, "weights average 1: {mean}");
            // Positions 300..310 hold the values 50..60.
            for (target, weight) in t.iter().zip(&w) {
                assert!(*weight == 0.0 || (50..60).contains(target), "token {target} weighed {weight}");
            }
            assert!(w.chunks(16).all(|row| row.iter().any(|&x| x > 0.0)), "every window has a target to learn");
        }
        assert!(Batcher::with_mask(tokens.clone(), vec![false; 400], 16, 3, Path::new("x")).is_err());
        assert!(Batcher::with_mask(tokens, vec![true; 3], 16, 3, Path::new("x")).is_err());
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
        let docs: Vec<Document> =
            (0..10).map(|i| Document { name: format!("{i}"), text: "x".into(), chat: None }).collect();
        let (a, b) = holdout_documents(docs.clone(), 3, 7, |_| true);
        let (c, d) = holdout_documents(docs, 3, 7, |_| true);
        assert_eq!((a.len(), b.len()), (7, 3));
        assert_eq!(b, d);
        assert_eq!(a, c);
        assert!(b.iter().all(|h| !a.contains(h)));
    }
}
