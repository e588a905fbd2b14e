//! Federated datasets: each client holds its own training and held-out texts.
//!
//! Three sources:
//!
//! - [`leaf_shakespeare`]: the LEAF Shakespeare benchmark (Caldas et al. 2018, "LEAF: A
//!   Benchmark for Federated Settings"), one client per speaking role of a play;
//! - [`client_dirs`]: a directory with one subdirectory of text files per client;
//! - [`jsonl_clients`]: a JSONL file of `{"client": ..., "text": ...}` records.
//!
//! Splits are chronological: a client's first texts train and its last texts test, as
//! LEAF does for Shakespeare so that near-duplicate neighbouring lines do not leak from
//! the training set into the test set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use covey_model::ModelError;
use covey_model::data::{Speech, load_corpus, speeches};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};

/// One client's local data: training texts and held-out test texts.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientData {
    /// The client's id, unique within its dataset.
    pub id: String,
    /// Texts the client trains on.
    pub train: Vec<String>,
    /// Held-out texts the client is evaluated on.
    pub test: Vec<String>,
}

impl ClientData {
    /// Bytes of training text.
    pub fn train_bytes(&self) -> usize {
        self.train.iter().map(String::len).sum()
    }

    /// Bytes of test text.
    pub fn test_bytes(&self) -> usize {
        self.test.iter().map(String::len).sum()
    }
}

/// A federated dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// What the dataset is (`leaf-shakespeare`, a directory or file name).
    pub name: String,
    /// The clients, sorted by id.
    pub clients: Vec<ClientData>,
}

impl Dataset {
    /// Bytes of training text over all clients.
    pub fn train_bytes(&self) -> usize {
        self.clients.iter().map(ClientData::train_bytes).sum()
    }

    /// Bytes of test text over all clients.
    pub fn test_bytes(&self) -> usize {
        self.clients.iter().map(ClientData::test_bytes).sum()
    }

    /// Number of clients.
    pub fn num_clients(&self) -> usize {
        self.clients.len()
    }

    /// Every client's test texts, in client order.
    pub fn all_test(&self) -> Vec<String> {
        self.clients.iter().flat_map(|c| c.test.iter().cloned()).collect()
    }

    /// Sizes at a glance, for logs and reports.
    pub fn summary(&self) -> DatasetSummary {
        let mut per_client: Vec<usize> = self.clients.iter().map(ClientData::train_bytes).collect();
        per_client.sort_unstable();
        let median = match per_client.len() {
            0 => 0,
            n if n % 2 == 1 => per_client[n / 2],
            n => (per_client[n / 2 - 1] + per_client[n / 2]) / 2,
        };
        DatasetSummary {
            name: self.name.clone(),
            clients: self.clients.len(),
            train_texts: self.clients.iter().map(|c| c.train.len()).sum(),
            test_texts: self.clients.iter().map(|c| c.test.len()).sum(),
            train_bytes: self.train_bytes(),
            test_bytes: self.test_bytes(),
            min_client_train_bytes: per_client.first().copied().unwrap_or(0),
            median_client_train_bytes: median,
            max_client_train_bytes: per_client.last().copied().unwrap_or(0),
        }
    }
}

/// Sizes of a [`Dataset`]: totals and the spread of training bytes over clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// The dataset's name.
    pub name: String,
    /// Number of clients.
    pub clients: usize,
    /// Training texts over all clients.
    pub train_texts: usize,
    /// Test texts over all clients.
    pub test_texts: usize,
    /// Bytes of training text over all clients.
    pub train_bytes: usize,
    /// Bytes of test text over all clients.
    pub test_bytes: usize,
    /// Training bytes of the smallest client.
    pub min_client_train_bytes: usize,
    /// Median training bytes per client (the mean of the two middle clients, rounded
    /// down, for an even count).
    pub median_client_train_bytes: usize,
    /// Training bytes of the largest client.
    pub max_client_train_bytes: usize,
}

/// The speeches of a play: speaker tags ending with a period (`Ham.`), or, for a text
/// where those yield fewer than [`MIN_PLAY_SPEECHES`], tags without one (`THESEUS` on its
/// own line, as the Gutenberg A Midsummer Night's Dream prints them). Texts with fewer
/// speeches either way (the sonnets and poems) have none.
fn play_speeches(text: &str) -> Vec<Speech> {
    let tagged = speeches(text);
    if tagged.len() >= MIN_PLAY_SPEECHES {
        return tagged;
    }
    let untagged = untagged_speeches(text);
    if untagged.len() >= MIN_PLAY_SPEECHES { untagged } else { tagged }
}

/// Fewest speeches that make a text a play.
const MIN_PLAY_SPEECHES: usize = 50;

/// Speeches whose speaker tag is an all-capitals line without a final period: a blank
/// line, the tag, then the speech up to the next blank line.
fn untagged_speeches(text: &str) -> Vec<Speech> {
    let is_tag = |line: &str| {
        let l = line.trim();
        (2..=40).contains(&l.len())
            && l.chars().filter(|c| c.is_ascii_alphabetic()).count() >= 2
            && l.chars().all(|c| c.is_ascii_uppercase() || matches!(c, ' ' | '\'' | '-'))
            && !l.starts_with("ACT")
            && !l.starts_with("SCENE")
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < lines.len() {
        let after_blank = i == 0 || lines[i - 1].trim().is_empty();
        if after_blank && is_tag(lines[i]) && !lines[i + 1].trim().is_empty() {
            let mut j = i + 1;
            while j < lines.len() && !lines[j].trim().is_empty() {
                j += 1;
            }
            out.push(Speech { speaker: lines[i].trim().to_owned(), text: lines[i + 1..j].join("\n") });
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Options of [`leaf_shakespeare`] (an experiment's `[data.leaf]`).
pub use covey_experiment::LeafOptions;

const PLAY_SUFFIX: &str = "_gut.txt";

/// The stems of the plays in `dir` (files named `{stem}_gut.txt`), sorted.
pub fn leaf_plays(dir: &Path) -> Result<Vec<String>> {
    let mut stems = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| SimError::io(dir, e))? {
        let entry = entry.map_err(|e| SimError::io(dir, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(PLAY_SUFFIX)) else { continue };
        if !stem.is_empty() && entry.path().is_file() {
            stems.push(stem.to_owned());
        }
    }
    stems.sort();
    Ok(stems)
}

/// The LEAF Shakespeare benchmark (Caldas et al. 2018): one client per speaking role of
/// a play, with id `{play_stem}/{speaker}` (`hamlet/Ham`).
///
/// `dir` holds Gutenberg plays named `{stem}_gut.txt`. Each speech is rendered as the
/// play prints it, `"{speaker}.\n{text}\n"`. A role's speeches are split chronologically:
/// the first `ceil(train_fraction * n)` train and the rest test (at least one speech is
/// kept for test), without shuffling, as LEAF does to keep near-duplicate neighbouring
/// lines out of the test set. Roles with fewer than `min_speeches` speeches are dropped;
/// poems (no speeches) contribute no clients. Clients are sorted by id.
pub fn leaf_shakespeare(dir: &Path, opts: &LeafOptions) -> Result<Dataset> {
    check_train_fraction(opts.train_fraction)?;
    if opts.min_speeches < 2 {
        return Err(SimError::config(
            "data.leaf.min-speeches",
            format!("is {}, but a role needs at least 2 speeches: one to train on and one to test", opts.min_speeches),
        ));
    }
    let available = leaf_plays(dir)?;
    if available.is_empty() {
        return Err(SimError::Data(format!("no plays (`*{PLAY_SUFFIX}` files) in {}", dir.display())));
    }
    for (field, list) in [("data.leaf.plays", &opts.plays), ("data.leaf.exclude-plays", &opts.exclude_plays)] {
        let unknown: Vec<&str> = list.iter().filter(|p| !available.contains(p)).map(String::as_str).collect();
        if !unknown.is_empty() {
            return Err(SimError::config(
                field,
                format!("unknown plays {unknown:?}; available: {}", available.join(", ")),
            ));
        }
    }
    let selected = available
        .iter()
        .filter(|p| opts.plays.is_empty() || opts.plays.contains(p))
        .filter(|p| !opts.exclude_plays.contains(p));

    let mut clients = Vec::new();
    for stem in selected {
        let path = dir.join(format!("{stem}{PLAY_SUFFIX}"));
        let text = std::fs::read_to_string(&path).map_err(|e| SimError::io(&path, e))?;
        let mut roles: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for speech in play_speeches(&text) {
            let rendered = format!("{}.\n{}\n", speech.speaker, speech.text);
            roles.entry(speech.speaker).or_default().push(rendered);
        }
        for (speaker, texts) in roles {
            if texts.len() < opts.min_speeches {
                continue;
            }
            let (train, test) = split_chronologically(texts, opts.train_fraction);
            if !train.is_empty() && !test.is_empty() {
                clients.push(ClientData { id: format!("{stem}/{speaker}"), train, test });
            }
        }
    }
    if opts.max_clients > 0 && clients.len() > opts.max_clients {
        clients.sort_by_cached_key(|c| (std::cmp::Reverse(c.train_bytes()), c.id.clone()));
        clients.truncate(opts.max_clients);
    }
    clients.sort_by(|a, b| a.id.cmp(&b.id));
    if clients.is_empty() {
        return Err(SimError::Data(format!(
            "no role in {} has {} or more speeches; include more plays or lower `dataset.min_speeches`",
            dir.display(),
            opts.min_speeches
        )));
    }
    Ok(Dataset { name: "leaf-shakespeare".into(), clients })
}

/// One client per subdirectory of `dir` (sorted), with the subdirectory's name as id.
///
/// A subdirectory with `train/` and `test/` subdirectories is loaded from those (each
/// `.txt` file or JSONL record is one text). Otherwise its own `.txt`/`.jsonl` files are
/// cut into paragraphs (runs of non-blank lines) that are split chronologically: the
/// first `ceil(train_fraction * n)` train and the rest test. Clients left without train
/// or test texts are skipped with a warning; none left is an error.
pub fn client_dirs(dir: &Path, train_fraction: f64) -> Result<Dataset> {
    check_train_fraction(train_fraction)?;
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| SimError::io(dir, e))? {
        let path = entry.map_err(|e| SimError::io(dir, e))?.path();
        if path.is_dir() {
            subdirs.push(path);
        }
    }
    subdirs.sort();

    let mut clients = Vec::new();
    for sub in subdirs {
        let id = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (train_dir, test_dir) = (sub.join("train"), sub.join("test"));
        let (train, test) = match (train_dir.is_dir(), test_dir.is_dir()) {
            (true, true) => (texts_or_empty(&train_dir)?, texts_or_empty(&test_dir)?),
            (false, false) => {
                let paragraphs = texts_or_empty(&sub)?.iter().flat_map(|t| paragraphs(t)).collect();
                split_chronologically(paragraphs, train_fraction)
            }
            _ => {
                return Err(SimError::Data(format!(
                    "client directory {} has only one of `train/` and `test/`; give it both or neither",
                    sub.display()
                )));
            }
        };
        keep_client(&mut clients, id, train, test, &sub);
    }
    if clients.is_empty() {
        return Err(SimError::Data(format!(
            "no client directory in {} has both training and test text",
            dir.display()
        )));
    }
    Ok(Dataset { name: dataset_name(dir), clients })
}

/// One client per distinct `client` of a JSONL file of `{"client": ..., "text": ...}`
/// records, with an optional `"split": "train"` or `"test"`.
///
/// Clients are sorted by id; each keeps its records in file order. A client's records
/// without `split` are split chronologically: the first `ceil(train_fraction * n)` train
/// and the rest test, after its explicitly split records. Blank texts are ignored; clients
/// left without train or test texts are skipped with a warning; none left is an error.
pub fn jsonl_clients(path: &Path, train_fraction: f64) -> Result<Dataset> {
    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Split {
        Train,
        Test,
    }
    #[derive(Deserialize)]
    struct Record {
        client: String,
        text: String,
        #[serde(default)]
        split: Option<Split>,
    }
    #[derive(Default)]
    struct Texts {
        train: Vec<String>,
        test: Vec<String>,
        unsplit: Vec<String>,
    }

    check_train_fraction(train_fraction)?;
    let content = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
    let mut by_client: BTreeMap<String, Texts> = BTreeMap::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let record: Record =
            serde_json::from_str(line).map_err(|source| SimError::Json { path: PathBuf::from(at()), source })?;
        if record.client.trim().is_empty() {
            return Err(SimError::Data(format!("{}: empty `client`", at())));
        }
        if record.text.trim().is_empty() {
            continue;
        }
        let texts = by_client.entry(record.client).or_default();
        match record.split {
            Some(Split::Train) => texts.train.push(record.text),
            Some(Split::Test) => texts.test.push(record.text),
            None => texts.unsplit.push(record.text),
        }
    }

    let mut clients = Vec::new();
    for (id, mut texts) in by_client {
        let (train, test) = split_chronologically(texts.unsplit, train_fraction);
        texts.train.extend(train);
        texts.test.extend(test);
        keep_client(&mut clients, id, texts.train, texts.test, path);
    }
    if clients.is_empty() {
        return Err(SimError::Data(format!("no client in {} has both training and test text", path.display())));
    }
    Ok(Dataset { name: dataset_name(path), clients })
}

/// Split `texts` in order: the first `ceil(train_fraction * n)` train, the rest test;
/// when that leaves no test text, the last text moves to test.
fn split_chronologically(mut texts: Vec<String>, train_fraction: f64) -> (Vec<String>, Vec<String>) {
    let n = texts.len();
    // The epsilon keeps float noise (0.7 * 10 = 7.000000000000001) from rounding up.
    let mut k = ((train_fraction * n as f64 - 1e-9).ceil().max(0.0) as usize).min(n);
    if k == n {
        k = n.saturating_sub(1);
    }
    let test = texts.split_off(k);
    (texts, test)
}

fn check_train_fraction(train_fraction: f64) -> Result<()> {
    if train_fraction > 0.0 && train_fraction < 1.0 {
        Ok(())
    } else {
        Err(SimError::config(
            "data.train-fraction",
            format!("is {train_fraction}, but must be strictly between 0 and 1"),
        ))
    }
}

/// The texts of a corpus (see [`load_corpus`]); an empty corpus gives no texts.
fn texts_or_empty(path: &Path) -> Result<Vec<String>> {
    match load_corpus(path) {
        Ok(docs) => Ok(docs.into_iter().map(|d| d.text).collect()),
        Err(ModelError::EmptyCorpus { .. }) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Runs of non-blank lines, joined with newlines.
fn paragraphs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(current.join("\n"));
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    out
}

fn keep_client(clients: &mut Vec<ClientData>, id: String, train: Vec<String>, test: Vec<String>, source: &Path) {
    if train.is_empty() || test.is_empty() {
        tracing::warn!(
            client = %id,
            source = %source.display(),
            train = train.len(),
            test = test.len(),
            "skipping client without both training and test text"
        );
    } else {
        clients.push(ClientData { id, train, test });
    }
}

fn dataset_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAKESPEARE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/shakespeare");

    fn shakespeare() -> &'static Path {
        Path::new(SHAKESPEARE)
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn chronological_split_rounds_up_and_keeps_a_test_text() {
        let texts: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let (train, test) = split_chronologically(texts.clone(), 0.8);
        assert_eq!((train.len(), test.len()), (8, 2));
        assert_eq!(test, ["8", "9"]);
        assert_eq!(split_chronologically(texts.clone(), 0.7).0.len(), 7, "no float noise");
        assert_eq!(split_chronologically(texts.clone(), 0.75).0.len(), 8, "ceil");
        assert_eq!(split_chronologically(texts.clone(), 0.99).1, ["9"], "the last text moves to test");
        assert_eq!(split_chronologically(texts[..1].to_vec(), 0.5), (vec![], strings(&["0"])));
        assert_eq!(split_chronologically(Vec::new(), 0.5), (vec![], vec![]));
    }

    #[test]
    fn leaf_has_one_client_per_role_over_all_plays() {
        let data = leaf_shakespeare(shakespeare(), &LeafOptions::default()).expect("leaf");
        let summary = data.summary();
        println!("LEAF Shakespeare, all plays: {summary:?}");
        assert!((300..=2000).contains(&data.num_clients()), "{} clients", data.num_clients());
        assert!(data.clients.windows(2).all(|w| w[0].id < w[1].id), "ids unique and sorted");
        assert!(data.clients.iter().all(|c| !c.train.is_empty() && !c.test.is_empty()));
        assert!(data.clients.iter().all(|c| c.train.len() + c.test.len() >= 8));
        assert!(!data.clients.iter().any(|c| c.id.starts_with("sonnets/")), "poems have no roles");
        assert_eq!(summary.train_bytes, data.train_bytes());
        assert!(summary.min_client_train_bytes <= summary.median_client_train_bytes);
        assert!(summary.median_client_train_bytes <= summary.max_client_train_bytes);
        assert_eq!(data.all_test().len(), summary.test_texts);

        let ham = data.clients.iter().find(|c| c.id == "hamlet/Ham").expect("hamlet/Ham");
        assert!(ham.train[0].starts_with("Ham.\n") && ham.train[0].ends_with('\n'));
        // 80/20 split, chronological: the last training speech precedes the first test one.
        let n = ham.train.len() + ham.test.len();
        assert_eq!(ham.train.len(), (0.8 * n as f64).ceil() as usize);
        // Every speech, train then test, is found in the play after the previous one.
        let play = std::fs::read_to_string(shakespeare().join("hamlet_gut.txt")).expect("hamlet");
        let mut at = 0;
        for (i, speech) in ham.train.iter().chain(&ham.test).enumerate() {
            let found = play[at..].find(&format!("\n{speech}")).unwrap_or_else(|| panic!("speech {i} out of order"));
            at += found + speech.len();
        }
    }

    #[test]
    fn plays_without_periods_after_speaker_tags_are_parsed() {
        let dream = leaf_shakespeare(
            shakespeare(),
            &LeafOptions { plays: strings(&["midsummer_nights_dream"]), ..LeafOptions::default() },
        )
        .expect("A Midsummer Night's Dream");
        let ids: Vec<&str> = dream.clients.iter().map(|c| c.id.as_str()).collect();
        assert!(ids.contains(&"midsummer_nights_dream/THESEUS"), "{ids:?}");
        assert!(ids.contains(&"midsummer_nights_dream/HERMIA"), "{ids:?}");
        assert!(dream.clients[0].train[0].contains(".\n"), "speeches rendered with their tag");
        // The sonnets have numbered headings, not speakers.
        let err =
            leaf_shakespeare(shakespeare(), &LeafOptions { plays: strings(&["sonnets"]), ..LeafOptions::default() });
        assert!(err.is_err(), "the sonnets yield no clients");
    }

    #[test]
    fn leaf_play_filters_and_max_clients() {
        let plays = leaf_plays(shakespeare()).expect("plays");
        assert!(plays.contains(&"hamlet".to_owned()) && plays.contains(&"sonnets".to_owned()));
        assert!(plays.windows(2).all(|w| w[0] < w[1]));

        let opts = LeafOptions { plays: strings(&["hamlet", "macbeth"]), ..LeafOptions::default() };
        let two = leaf_shakespeare(shakespeare(), &opts).expect("two plays");
        assert!(two.clients.iter().all(|c| c.id.starts_with("hamlet/") || c.id.starts_with("macbeth/")));
        assert!(two.clients.iter().any(|c| c.id.starts_with("macbeth/")));
        assert!(two.clients.iter().any(|c| c.id == "hamlet/Ham"));

        let opts = LeafOptions { exclude_plays: strings(&["hamlet"]), ..LeafOptions::default() };
        let all = leaf_shakespeare(shakespeare(), &LeafOptions::default()).expect("all");
        let rest = leaf_shakespeare(shakespeare(), &opts).expect("all but hamlet");
        assert!(rest.clients.iter().all(|c| !c.id.starts_with("hamlet/")));
        let hamlet_roles = all.clients.iter().filter(|c| c.id.starts_with("hamlet/")).count();
        assert_eq!(rest.num_clients() + hamlet_roles, all.num_clients());

        let opts = LeafOptions { plays: strings(&["hamlet"]), max_clients: 3, ..LeafOptions::default() };
        let top = leaf_shakespeare(shakespeare(), &opts).expect("top 3");
        let hamlet = leaf_shakespeare(shakespeare(), &LeafOptions { max_clients: 0, ..opts.clone() }).expect("hamlet");
        let mut sizes: Vec<usize> = hamlet.clients.iter().map(ClientData::train_bytes).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(top.num_clients(), 3);
        assert!(top.clients.windows(2).all(|w| w[0].id < w[1].id), "id order restored");
        let mut top_sizes: Vec<usize> = top.clients.iter().map(ClientData::train_bytes).collect();
        top_sizes.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(top_sizes, sizes[..3]);
        assert!(top.clients.iter().any(|c| c.id == "hamlet/Ham"));

        let opts = LeafOptions { plays: strings(&["sonnets"]), ..LeafOptions::default() };
        let err = leaf_shakespeare(shakespeare(), &opts).expect_err("no roles").to_string();
        assert!(err.contains("no role"), "{err}");
    }

    #[test]
    fn leaf_options_are_validated() {
        let cases = [
            (LeafOptions { plays: strings(&["hamlet", "hamlett"]), ..LeafOptions::default() }, "data.leaf.plays"),
            (LeafOptions { exclude_plays: strings(&["nope"]), ..LeafOptions::default() }, "data.leaf.exclude-plays"),
            (LeafOptions { train_fraction: 1.0, ..LeafOptions::default() }, "data.train-fraction"),
            (LeafOptions { train_fraction: f64::NAN, ..LeafOptions::default() }, "data.train-fraction"),
            (LeafOptions { min_speeches: 1, ..LeafOptions::default() }, "data.leaf.min-speeches"),
        ];
        for (opts, field) in cases {
            let err = leaf_shakespeare(shakespeare(), &opts).expect_err(field).to_string();
            assert!(err.contains(field), "{err}");
        }
        let err = leaf_shakespeare(shakespeare(), &LeafOptions { plays: strings(&["hamlett"]), ..Default::default() })
            .expect_err("unknown play")
            .to_string();
        assert!(err.contains("\"hamlett\"") && err.contains("macbeth"), "lists available plays: {err}");

        let opts: LeafOptions = toml::from_str("plays = [\"hamlet\"]\nmax-clients = 5").expect("toml");
        assert_eq!(opts, LeafOptions { plays: strings(&["hamlet"]), max_clients: 5, ..LeafOptions::default() });
        assert!(toml::from_str::<LeafOptions>("play = [\"hamlet\"]").is_err(), "unknown fields are denied");
    }

    #[test]
    fn leaf_reads_a_small_play_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut play = String::from("A PLAY\n\nACT I.\n\nScene I. A room.\n\n");
        for i in 0..5 {
            play.push_str(&format!("Ann.\nLine {i} of Ann.\n\nBob.\nBob says {i}.\n\n"));
        }
        play.push_str("Cy.\nOnce.\n");
        std::fs::write(dir.path().join("tiny_gut.txt"), &play).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "Ann.\nnot a play\n").expect("write");
        let opts = LeafOptions { min_speeches: 5, ..LeafOptions::default() };
        let data = leaf_shakespeare(dir.path(), &opts).expect("tiny");
        assert_eq!(data.clients.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["tiny/Ann", "tiny/Bob"]);
        assert_eq!(data.clients[0].train.len(), 4);
        assert_eq!(data.clients[0].test, ["Ann.\nLine 4 of Ann.\n"]);
    }

    #[test]
    fn client_directories_load_split_and_skip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // `alice`: pre-split.
        std::fs::create_dir_all(root.join("alice/train")).expect("mkdir");
        std::fs::create_dir_all(root.join("alice/test")).expect("mkdir");
        std::fs::write(root.join("alice/train/a.txt"), "alice train one").expect("write");
        std::fs::write(root.join("alice/train/b.jsonl"), "{\"text\": \"alice train two\"}\n").expect("write");
        std::fs::write(root.join("alice/test/c.txt"), "alice test").expect("write");
        // `bob`: five paragraphs over two files, split 0.8 -> 4 / 1.
        std::fs::create_dir_all(root.join("bob")).expect("mkdir");
        std::fs::write(root.join("bob/1.txt"), "p1 line a\np1 line b\n\n\np2\n  \np3\n").expect("write");
        std::fs::write(root.join("bob/2.txt"), "p4\n\np5").expect("write");
        // `carol`: one paragraph, so no training text: skipped.
        std::fs::create_dir_all(root.join("carol")).expect("mkdir");
        std::fs::write(root.join("carol/only.txt"), "just one paragraph").expect("write");
        // `dave`: empty test directory: skipped.
        std::fs::create_dir_all(root.join("dave/train")).expect("mkdir");
        std::fs::create_dir_all(root.join("dave/test")).expect("mkdir");
        std::fs::write(root.join("dave/train/a.txt"), "dave").expect("write");
        std::fs::write(root.join("stray.txt"), "not a client").expect("write");

        let data = client_dirs(root, 0.8).expect("client dirs");
        assert_eq!(data.clients.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
        assert_eq!(data.clients[0].train, ["alice train one", "alice train two"]);
        assert_eq!(data.clients[0].test, ["alice test"]);
        assert_eq!(data.clients[1].train, ["p1 line a\np1 line b", "p2", "p3", "p4"]);
        assert_eq!(data.clients[1].test, ["p5"]);

        std::fs::create_dir_all(root.join("erin/train")).expect("mkdir");
        let err = client_dirs(root, 0.8).expect_err("train without test").to_string();
        assert!(err.contains("erin") && err.contains("test/"), "{err}");

        let empty = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(empty.path().join("x")).expect("mkdir");
        assert!(matches!(client_dirs(empty.path(), 0.8), Err(SimError::Data(_))));
        assert!(matches!(client_dirs(root, 0.0), Err(SimError::Config { field: "data.train-fraction", .. })));
        assert!(matches!(client_dirs(&root.join("missing"), 0.8), Err(SimError::Io { .. })));
    }

    #[test]
    fn jsonl_clients_group_split_and_report_bad_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clients.jsonl");
        let mut lines = Vec::new();
        for i in 0..5 {
            lines.push(format!("{{\"client\": \"zed\", \"text\": \"z{i}\"}}"));
            lines.push(format!("{{\"client\": \"amy\", \"text\": \"a{i}\", \"extra\": 1}}"));
        }
        lines.push("{\"client\": \"amy\", \"text\": \"held\", \"split\": \"test\"}".into());
        lines.push(String::new());
        lines.push("{\"client\": \"solo\", \"text\": \"s\", \"split\": \"train\"}".into());
        lines.push("{\"client\": \"zed\", \"text\": \"  \"}".into());
        std::fs::write(&path, lines.join("\n")).expect("write");

        let data = jsonl_clients(&path, 0.6).expect("jsonl");
        assert_eq!(data.name, "clients.jsonl");
        assert_eq!(data.clients.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["amy", "zed"]);
        assert_eq!(data.clients[0].train, ["a0", "a1", "a2"]);
        assert_eq!(data.clients[0].test, ["held", "a3", "a4"]);
        assert_eq!(data.clients[1].train, ["z0", "z1", "z2"]);
        assert_eq!(data.clients[1].test, ["z3", "z4"]);
        assert_eq!(data.all_test(), ["held", "a3", "a4", "z3", "z4"]);

        std::fs::write(&path, "{\"client\": \"a\", \"text\": \"x\"}\n{\"client\": \"a\", \"text\": \n").expect("write");
        let err = jsonl_clients(&path, 0.8).expect_err("bad json");
        assert!(matches!(err, SimError::Json { .. }));
        assert!(err.to_string().contains("clients.jsonl:2"), "{err}");

        std::fs::write(&path, "\n{\"text\": \"x\"}\n").expect("write");
        let err = jsonl_clients(&path, 0.8).expect_err("missing client").to_string();
        assert!(err.contains("clients.jsonl:2") && err.contains("missing field `client`"), "{err}");

        std::fs::write(&path, "{\"client\": \"a\", \"text\": \"x\", \"split\": \"dev\"}\n").expect("write");
        let err = jsonl_clients(&path, 0.8).expect_err("bad split").to_string();
        assert!(err.contains("clients.jsonl:1") && err.contains("dev"), "{err}");

        std::fs::write(&path, "{\"client\": \"\", \"text\": \"x\"}\n").expect("write");
        let err = jsonl_clients(&path, 0.8).expect_err("empty client").to_string();
        assert!(err.contains("clients.jsonl:1") && err.contains("empty `client`"), "{err}");

        std::fs::write(&path, "{\"client\": \"a\", \"text\": \"only\"}\n").expect("write");
        assert!(matches!(jsonl_clients(&path, 0.8), Err(SimError::Data(_))));
    }
}
