//! The fuzz targets' committed corpora, replayed on the stable toolchain: every input that
//! libFuzzer kept (and every crash it ever found, once fixed) goes through the same target
//! bodies as `cargo fuzz run`, then a few thousand seeded mutations of each. The coverage-
//! guided runs themselves need nightly (README, "Reliability").

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
mod targets;

mod common;
use common::SplitMix64;

/// A fuzz target's body.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 10] = [
    ("fleet_messages", targets::fleet_messages),
    ("update_header", targets::update_header),
    ("update_payload", targets::update_payload),
    ("stored_weights", targets::stored_weights),
    ("manifest", targets::manifest),
    ("gguf", targets::gguf),
    ("tokenizer", targets::tokenizer),
    ("coordinator_config", targets::coordinator_config),
    ("agent_config", targets::agent_config),
    ("experiment", targets::experiment),
];

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).expect("corpus file"))).collect()
}

/// One of libFuzzer's simpler mutations: flip, set an interesting byte, insert, erase,
/// truncate, or copy a span over another.
fn mutate(input: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = v.len();
        match rng.below(6) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'9'][rng.below(8)];
            }
            2 => {
                let i = rng.below(n + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if n > 0 => {
                v.remove(rng.below(n));
            }
            4 if n > 0 => v.truncate(rng.below(n)),
            _ if n > 1 => {
                let (from, to, len) = (rng.below(n), rng.below(n), 1 + rng.below(8));
                let span: Vec<u8> = v[from..(from + len).min(n)].to_vec();
                for (k, b) in span.into_iter().enumerate() {
                    if to + k < v.len() {
                        v[to + k] = b;
                    }
                }
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

#[test]
fn every_corpus_input_and_its_mutations_are_handled_without_a_panic() {
    const MUTATIONS: usize = 5_000;
    for (target, run) in TARGETS {
        let inputs = corpus(target);
        assert!(inputs.iter().any(|(p, _)| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-"))));
        for (path, bytes) in &inputs {
            if let Err(panic) = std::panic::catch_unwind(|| run(bytes)) {
                panic!("{target}: {} panics: {panic:?}", path.display());
            }
        }
        let mut rng = SplitMix64(0xC0FE);
        for i in 0..MUTATIONS {
            let (_, seed) = &inputs[i % inputs.len()];
            let input = mutate(seed, &mut rng);
            if let Err(panic) = std::panic::catch_unwind(|| run(&input)) {
                panic!("{target}: mutation {i} of the corpus panics on {input:?}: {panic:?}");
            }
        }
    }
}
