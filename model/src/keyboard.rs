//! The keyboard path on covey-infer's engine: the `k` most likely next tokens after a
//! prefix, each extended greedily to the end of the word it begins ([`complete_words`]);
//! and, over a text, how often the next whole word is the first completion or among the
//! `k` ([`word_accuracy`]), the measure a keyboard's suggestion strip is judged by.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::{InferenceModel, Tokenizer};

/// Tokens a word completion may take (a byte-level model spells a word byte by byte).
pub const MAX_WORD_TOKENS: usize = 16;

/// One suggestion: the next token, and the word it begins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The next token's text.
    pub token: String,
    /// Its probability.
    pub token_probability: f64,
    /// The token extended greedily to the end of its word.
    pub word: String,
    /// The probability of that whole extension.
    pub word_probability: f64,
}

/// Whether `text`, after its leading whitespace, holds a word and then something that is
/// not part of it (a space or punctuation: the start of what follows).
pub fn word_ended(text: &str) -> bool {
    let mut seen = false;
    for c in text.trim_start().chars() {
        if is_word_char(c) {
            seen = true;
        } else if seen {
            return true;
        }
    }
    false
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '\''
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let exp: Vec<f64> = logits.iter().map(|&x| f64::from(x - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

/// The `k` most likely next tokens after `ids`, most likely first, each with the word it
/// begins: extended greedily while the next token continues the same word, at most
/// [`MAX_WORD_TOKENS`] tokens. Where the most likely next token is only whitespace (a
/// byte-level model spells the space before a word on its own), it is taken first, and
/// the `k` alternatives are the tokens after it: the first letters of the word.
pub fn complete_words(
    engine: &InferenceModel,
    tokenizer: &Tokenizer,
    ids: &[u32],
    k: usize,
) -> Result<Vec<Completion>> {
    if ids.is_empty() {
        return Err(ModelError::config("prefix", "has no tokens"));
    }
    let mut session = engine.session();
    let mut probs = softmax(&engine.forward(&mut session, ids, true)?);
    let argmax = |p: &[f64]| p.iter().enumerate().fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
    // The whitespace the word starts with, when the model spells it apart.
    let mut lead: Vec<u32> = Vec::new();
    let mut lead_p = 1.0;
    while lead.len() < 4 {
        let (best, q) = argmax(&probs);
        let mut with = lead.clone();
        with.push(best as u32);
        let text = tokenizer.decode(&with)?;
        if text.is_empty() || !text.trim().is_empty() {
            break;
        }
        lead = with;
        lead_p *= q;
        probs = softmax(&engine.forward(&mut session, &[best as u32], true)?);
    }
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut out = Vec::with_capacity(k);
    for &first in order.iter().take(k) {
        let mut s = session.clone();
        let mut ext = lead.clone();
        ext.push(first as u32);
        let mut p = lead_p * probs[first];
        while ext.len() < MAX_WORD_TOKENS && !word_ended(&tokenizer.decode(&ext)?) {
            let row = softmax(&engine.forward(&mut s, &ext[ext.len() - 1..], true)?);
            let (best, q) = argmax(&row);
            let mut longer = ext.clone();
            longer.push(best as u32);
            if word_ended(&tokenizer.decode(&longer)?) {
                break;
            }
            ext = longer;
            p *= q;
        }
        let mut token_ids = lead.clone();
        token_ids.push(first as u32);
        out.push(Completion {
            token: tokenizer.decode(&token_ids)?,
            token_probability: lead_p * probs[first],
            word: tokenizer.decode(&ext)?,
            word_probability: p,
        });
    }
    Ok(out)
}

/// The words of `text` a keyboard predicts, as `(end of the prefix, word)`: every word
/// after the first, the prefix ending before the whitespace in front of it (a BPE
/// vocabulary carries the space on the word's token).
pub fn word_starts(text: &str) -> Vec<(usize, &str)> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut starts = Vec::new();
    for w in 1..chars.len() {
        let (i, c) = chars[w];
        if is_word_char(c) && chars[w - 1].1.is_whitespace() {
            let space = (0..w).rev().take_while(|&j| chars[j].1.is_whitespace()).last().unwrap_or(w);
            let before = chars[space].0;
            if text[..before].chars().any(is_word_char) {
                let end = text[i..].find(|c: char| !is_word_char(c)).map_or(text.len(), |e| i + e);
                starts.push((before, &text[i..end]));
            }
        }
    }
    starts
}

/// Word-level keyboard accuracy over a text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WordAccuracy {
    /// Words predicted.
    pub words: usize,
    /// Fraction whose first completion is the word.
    pub top1: f64,
    /// Fraction with the word among the `k` completions.
    pub topk: f64,
}

/// How often the next whole word of `text` is the first of [`complete_words`]'s `k`
/// completions, or among them: at up to `max_words` word starts spread evenly over the
/// text (each after at least one word), from the `context` tokens before it. A completion
/// matches when its word, without surrounding spaces, is the text's word exactly.
pub fn word_accuracy(
    engine: &InferenceModel,
    tokenizer: &Tokenizer,
    text: &str,
    k: usize,
    max_words: usize,
    context: usize,
) -> Result<WordAccuracy> {
    let starts = word_starts(text);
    if starts.is_empty() {
        return Err(ModelError::config("text", "has no word to predict"));
    }
    let step = starts.len().div_ceil(max_words.max(1));
    let (mut hit1, mut hitk, mut n) = (0usize, 0usize, 0usize);
    for &(before, word) in starts.iter().step_by(step.max(1)) {
        let ids = tokenizer.encode(&text[..before])?;
        let ids = &ids[ids.len().saturating_sub(context.max(1))..];
        if ids.is_empty() {
            continue;
        }
        let completions = complete_words(engine, tokenizer, ids, k)?;
        let matches = |c: &Completion| c.word.trim() == word;
        hit1 += usize::from(completions.first().is_some_and(matches));
        hitk += usize::from(completions.iter().any(matches));
        n += 1;
    }
    if n == 0 {
        return Err(ModelError::config("text", "has no word to predict"));
    }
    Ok(WordAccuracy { words: n, top1: hit1 as f64 / n as f64, topk: hitk as f64 / n as f64 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LlamaConfig, Precision};

    #[test]
    fn words_end_at_a_space_or_punctuation_after_a_letter() {
        assert!(!word_ended(" "));
        assert!(!word_ended(" the"));
        assert!(!word_ended("don't"));
        assert!(word_ended(" the "));
        assert!(word_ended("the,"));
        assert!(!word_ended("  ,"), "punctuation before any letter does not end a word");
    }

    #[test]
    fn the_words_to_predict_follow_their_prefixes() {
        let text = "To be, or  not to be:\nthat is";
        let starts = word_starts(text);
        let words: Vec<&str> = starts.iter().map(|s| s.1).collect();
        assert_eq!(words, ["be", "or", "not", "to", "be", "that", "is"]);
        assert_eq!(&text[..starts[0].0], "To");
        assert_eq!(&text[..starts[1].0], "To be,");
        assert_eq!(&text[..starts[2].0], "To be, or", "the prefix stops before the spaces");
        assert!(word_starts("   lonely").is_empty(), "the first word has no prefix");
    }

    #[test]
    fn completions_extend_to_the_end_of_the_word_and_accuracy_stays_in_range() {
        let config = LlamaConfig::tiny();
        let tensors = covey_infer::random_tensors(&config, 4);
        let engine = InferenceModel::from_tensors(config, &tensors, Precision::F32).expect("engine");
        let tok = Tokenizer::Bytes;
        let ids = tok.encode("the cat sat").expect("ids");
        let c = complete_words(&engine, &tok, &ids, 3).expect("complete");
        assert_eq!(c.len(), 3);
        assert!(c.windows(2).all(|w| w[0].token_probability >= w[1].token_probability));
        for x in &c {
            assert!(x.word.starts_with(&x.token) && x.word_probability <= x.token_probability, "{x:?}");
            let n = tok.encode(&x.word).expect("ids").len();
            assert!(n <= MAX_WORD_TOKENS && (n == MAX_WORD_TOKENS || !word_ended(&x.word)), "{x:?}");
        }
        let text = "the cat sat on the mat and the dog sat on the log";
        let acc = word_accuracy(&engine, &tok, text, 3, 4, 64).expect("accuracy");
        assert_eq!(acc.words, 4, "four of the eleven words, spread evenly");
        assert!((0.0..=1.0).contains(&acc.top1) && acc.topk >= acc.top1 && acc.topk <= 1.0, "{acc:?}");
        assert!(word_accuracy(&engine, &tok, "   ", 3, 10, 64).is_err());
    }
}
