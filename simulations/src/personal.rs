//! Personalisation in simulation: the keyboard-style evaluation of every evaluated device
//! with the base model, the global model and its personal model (a local adapter fitted
//! on the device's own training text, stacked on the global model:
//! `covey_model::personal`).
//!
//! Each device is scored on its own held-out text: next-token top-1 and top-3 accuracy
//! (next byte for the byte-level model), perplexity, and whole-word top-1 / top-3 (the
//! next word among the three completions decoded from the prefix, as a keyboard's
//! suggestion strip offers them). The report gives the
//! distribution over devices: the median, and the worst decile (the 10th percentile of
//! accuracy, the 90th of perplexity): the users the global model serves worst.

use std::borrow::Cow;

use covey_model::personal::{self, PersonalConfig, PersonalTraining};
use covey_model::{LocalRound, ModelError, NamedTensors, RoundBase};
use serde::{Deserialize, Serialize};

use crate::dataset::ClientData;
use crate::error::{Result, SimError};
use crate::prepare::{Prepared, seed_bytes};

/// Words of a device's held-out text the keyboard measure predicts (spread evenly).
pub const WORDS_PER_DEVICE: usize = 40;
/// Tokens of context before each predicted word.
pub const WORD_CONTEXT: usize = 64;

/// One model's figures on one device's held-out text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Perplexity (per token).
    pub perplexity: f64,
    /// Next-token top-1 accuracy.
    pub top1: f64,
    /// Next-token top-3 accuracy.
    pub top3: f64,
    /// Whole-word top-1: the next word is the first of three completions
    /// (`covey_model::keyboard::word_accuracy` on the int8 engine devices run).
    #[serde(with = "crate::report::nullable_f64")]
    pub word_top1: f64,
    /// Whole-word top-3: the next word is among the three completions.
    #[serde(with = "crate::report::nullable_f64")]
    pub word_top3: f64,
}

/// One device: its three models' figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceScores {
    /// The client id.
    pub client: String,
    /// Tokens of held-out text scored.
    pub tokens: usize,
    /// Training tokens behind the local adapter: steps × batch × sequence length, windows
    /// drawn from the device's training text (0: too little text for one window, so the
    /// personal model is the global one).
    pub train_tokens: u64,
    /// The base model (round 0).
    pub base: Scores,
    /// The global model after the last round.
    pub global: Scores,
    /// The global model with the device's local adapter.
    pub personal: Scores,
}

/// The distribution of one model's figures over devices.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Median top-1 accuracy.
    pub top1_median: f64,
    /// 10th percentile of top-1 accuracy.
    pub top1_p10: f64,
    /// Median top-3 accuracy.
    pub top3_median: f64,
    /// 10th percentile of top-3 accuracy.
    pub top3_p10: f64,
    /// Median perplexity.
    pub perplexity_median: f64,
    /// 90th percentile of perplexity (the worst decile).
    pub perplexity_p90: f64,
    /// Median whole-word top-1.
    #[serde(with = "crate::report::nullable_f64")]
    pub word_top1_median: f64,
    /// Median whole-word top-3.
    #[serde(with = "crate::report::nullable_f64")]
    pub word_top3_median: f64,
    /// 10th percentile of whole-word top-3.
    #[serde(with = "crate::report::nullable_f64")]
    pub word_top3_p10: f64,
}

impl Distribution {
    fn of(devices: &[DeviceScores], pick: impl Fn(&DeviceScores) -> Scores) -> Self {
        let column = |f: &dyn Fn(&Scores) -> f64| -> Vec<f64> { devices.iter().map(|d| f(&pick(d))).collect() };
        let (top1, top3, ppl) = (column(&|s| s.top1), column(&|s| s.top3), column(&|s| s.perplexity));
        let (w1, w3) = (column(&|s| s.word_top1), column(&|s| s.word_top3));
        Self {
            top1_median: quantile(&top1, 0.5),
            top1_p10: quantile(&top1, 0.1),
            top3_median: quantile(&top3, 0.5),
            top3_p10: quantile(&top3, 0.1),
            perplexity_median: quantile(&ppl, 0.5),
            perplexity_p90: quantile(&ppl, 0.9),
            word_top1_median: quantile(&w1, 0.5),
            word_top3_median: quantile(&w3, 0.5),
            word_top3_p10: quantile(&w3, 0.1),
        }
    }
}

/// The personalisation section of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonalReport {
    /// The local adapter and its training.
    pub config: PersonalConfig,
    /// Every evaluated device, in id order.
    pub devices: Vec<DeviceScores>,
    /// Over devices: the base model.
    pub base: Distribution,
    /// Over devices: the global model.
    pub global: Distribution,
    /// Over devices: the personal models.
    pub personal: Distribution,
    /// Fraction of devices whose top-1 accuracy the personal model raises over the global.
    pub top1_improved: f64,
    /// Seconds spent fitting and scoring.
    pub seconds: f64,
}

/// Linear-interpolated quantile `q` of `values` (NaN for none).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The devices evaluated: the clients whose held-out texts the experiment scores.
pub fn devices(prepared: &Prepared) -> Vec<&ClientData> {
    prepared.dataset.clients.iter().filter(|c| prepared.eval_clients.contains(&c.id)).collect()
}

/// `weights` scored on each device's held-out text; `None` for a device with fewer than
/// two tokens of it.
pub fn score(
    prepared: &Prepared,
    weights: &NamedTensors,
    devices: &[&ClientData],
) -> Result<Vec<Option<(usize, Scores)>>> {
    parallel_map(prepared, devices, |client| score_one(prepared, weights, &client.test))
}

fn score_one(prepared: &Prepared, weights: &NamedTensors, texts: &[String]) -> Result<Option<(usize, Scores)>> {
    let device = covey_model::cpu_device();
    let seq_len = prepared.experiment.eval_seq_len();
    let m = match covey_model::evaluate_texts(&prepared.config, weights, &prepared.tokenizer, texts, seq_len, &device) {
        Ok(m) => m,
        Err(ModelError::EmptyCorpus { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let engine =
        covey_model::InferenceModel::from_tensors(prepared.config.clone(), weights, covey_model::Precision::Int8)
            .map_err(ModelError::from)?;
    let text = texts.join("\n");
    let words =
        covey_model::keyboard::word_accuracy(&engine, &prepared.tokenizer, &text, 3, WORDS_PER_DEVICE, WORD_CONTEXT)
            .ok();
    Ok(Some((
        m.tokens,
        Scores {
            perplexity: m.perplexity,
            top1: m.top1,
            top3: m.top3,
            word_top1: words.map_or(f64::NAN, |w| w.top1),
            word_top3: words.map_or(f64::NAN, |w| w.topk),
        },
    )))
}

/// Fit every device's local adapter on the final global model `global` and score the
/// three models; `base_scores` are the devices' scores with the base model, from
/// [`score`] before round 1.
pub fn personalise(
    prepared: &Prepared,
    cfg: &PersonalConfig,
    devices: &[&ClientData],
    base_scores: &[Option<(usize, Scores)>],
    global: &NamedTensors,
) -> Result<PersonalReport> {
    let started = std::time::Instant::now();
    let global_scores = score(prepared, global, devices)?;
    let personal = parallel_map(prepared, devices, |client| {
        let seed = u64::from_be_bytes(
            seed_bytes(prepared.experiment.seed, &format!("personal/{}", client.id), 0)[..8]
                .try_into()
                .unwrap_or([0; 8]),
        );
        let a = cfg.a_factors(&prepared.config, seed);
        let round = LocalRound {
            config: &prepared.config,
            base: RoundBase::Tensors(Cow::Borrowed(global)),
            adapter: None,
            a: &a,
            tokenizer: &prepared.tokenizer,
            corpus: &client.train,
            chats: &[],
            chat_format: None,
        };
        let threads = prepared.experiment.rounds.training_threads;
        match personal::train_local(round, cfg, seed, threads, None) {
            Ok((adapter, result)) => {
                let mut weights = global.clone();
                adapter.merge_into(&mut weights)?;
                Ok(Some((result.tokens, score_one(prepared, &weights, &client.test)?)))
            }
            Err(ModelError::EmptyCorpus { .. }) => Ok(None),
            Err(e) => Err(SimError::Client { client: client.id.clone(), reason: e.to_string() }),
        }
    })?;
    let mut rows = Vec::new();
    for (((client, base), global), personal) in devices.iter().zip(base_scores).zip(&global_scores).zip(personal) {
        let (Some((tokens, base)), Some((_, global))) = (base, global) else { continue };
        let (train_tokens, personal) = match personal {
            Some((t, Some((_, s)))) => (t, s),
            // Too little training text for one window: the device keeps the global model.
            _ => (0, *global),
        };
        rows.push(DeviceScores {
            client: client.id.clone(),
            tokens: *tokens,
            train_tokens,
            base: *base,
            global: *global,
            personal,
        });
    }
    if rows.is_empty() {
        return Err(SimError::Data("personalisation: no evaluated device has held-out text to score".into()));
    }
    let improved = rows.iter().filter(|d| d.personal.top1 > d.global.top1).count() as f64 / rows.len() as f64;
    Ok(PersonalReport {
        config: cfg.clone(),
        base: Distribution::of(&rows, |d| d.base),
        global: Distribution::of(&rows, |d| d.global),
        personal: Distribution::of(&rows, |d| d.personal),
        top1_improved: improved,
        devices: rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `f` over `devices`, `rounds.parallel` at a time, results in order.
fn parallel_map<T: Send>(
    prepared: &Prepared,
    devices: &[&ClientData],
    f: impl Fn(&ClientData) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    crate::parallel::map_in_order(devices, prepared.experiment.rounds.parallel, "personalisation", |_, d| f(d))
}

/// `personal.csv`: one line per device.
pub fn devices_csv(report: &PersonalReport) -> String {
    let mut out = String::from("client,tokens,train_tokens");
    for model in ["base", "global", "personal"] {
        for figure in ["perplexity", "top1", "top3", "word_top1", "word_top3"] {
            out.push_str(&format!(",{model}_{figure}"));
        }
    }
    out.push('\n');
    for d in &report.devices {
        out.push_str(&format!("{},{},{}", d.client, d.tokens, d.train_tokens));
        for s in [d.base, d.global, d.personal] {
            for v in [s.perplexity, s.top1, s.top3, s.word_top1, s.word_top3] {
                out.push_str(&format!(",{v:.4}"));
            }
        }
        out.push('\n');
    }
    out
}

/// The distribution table, for the console and the README.
pub fn table(report: &PersonalReport) -> String {
    let mut out = format!(
        "personalisation ({}, local adapter r{} on {} devices, {:.0} s): personal top-1 above global on {:.0} % of devices\n",
        report.config.method,
        report.config.rank,
        report.devices.len(),
        report.seconds,
        100.0 * report.top1_improved
    );
    out.push_str(
        "model     top-1 median  top-1 p10  top-3 median  top-3 p10  ppl median  ppl p90  word-1 median  word-3 median  word-3 p10\n",
    );
    for (name, d) in [("base", &report.base), ("global", &report.global), ("personal", &report.personal)] {
        out.push_str(&format!(
            "{name:<9} {:>12.4} {:>10.4} {:>13.4} {:>10.4} {:>11.3} {:>8.3} {:>14.4} {:>14.4} {:>11.4}\n",
            d.top1_median,
            d.top1_p10,
            d.top3_median,
            d.top3_p10,
            d.perplexity_median,
            d.perplexity_p90,
            d.word_top1_median,
            d.word_top3_median,
            d.word_top3_p10
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_and_skip_non_finite_values() {
        let v = [4.0, 1.0, 3.0, 2.0, f64::NAN];
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert!((quantile(&v, 0.1) - 1.3).abs() < 1e-12);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
