//! Partitioners: spread a dataset's texts over a chosen number of clients.
//!
//! The examples are the individual texts of a [`Dataset`] (every element of each
//! client's `train` and `test`), each labelled with its original client (a LEAF role, a
//! client directory) and keeping its train/test flag. Train and test examples are pooled
//! and partitioned together, so that every new client's test texts come from the same
//! distribution as its training texts. New client `i` is named `client-{i:05}` and keeps
//! its texts in the original pooled order (clients in order, train before test).

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::dataset::{ClientData, Dataset};
use crate::error::{Result, SimError};

/// How to spread a pooled corpus over clients (an experiment's `data.partitioner`).
pub use covey_experiment::Partitioner;

/// How many Dirichlet draws to try before giving up on `min_examples`.
const DIRICHLET_TRIES: usize = 100;

/// One text of the pooled corpus.
struct Example<'a> {
    /// Index of the original client.
    label: usize,
    text: &'a str,
    train: bool,
}

/// Spread `dataset`'s texts over new clients as `partitioner` says, seeded by `seed`.
///
/// [`Partitioner::Natural`] returns the dataset unchanged. Otherwise the result has
/// clients `client-00000`, `client-00001`, ...; the same dataset, partitioner and seed
/// always give the same result. A new client left without training or test texts is an
/// error: use fewer clients or more data.
pub fn partition(dataset: &Dataset, partitioner: &Partitioner, seed: u64) -> Result<Dataset> {
    let examples: Vec<Example<'_>> = dataset
        .clients
        .iter()
        .enumerate()
        .flat_map(|(label, c)| {
            let train = c.train.iter().map(move |t| Example { label, text: t, train: true });
            train.chain(c.test.iter().map(move |t| Example { label, text: t, train: false }))
        })
        .collect();
    let n = examples.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (clients, assignment) = match *partitioner {
        Partitioner::Natural {} => return Ok(dataset.clone()),
        Partitioner::Iid { clients } => {
            check_clients(clients, n)?;
            (clients, iid(&examples, clients, &mut rng))
        }
        Partitioner::Dirichlet { clients, alpha, min_examples } => {
            check_clients(clients, n)?;
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(SimError::config("partitioner.alpha", format!("is {alpha}, but must be finite and > 0")));
            }
            if min_examples.saturating_mul(clients) > n {
                return Err(SimError::config(
                    "partitioner.min_examples",
                    format!("{min_examples} examples for each of {clients} clients, but the dataset has only {n}"),
                ));
            }
            (clients, dirichlet(&examples, clients, alpha, min_examples, &mut rng)?)
        }
        Partitioner::Shards { clients, shards_per_client } => {
            check_clients(clients, n)?;
            if shards_per_client == 0 {
                return Err(SimError::config("partitioner.shards_per_client", "must be at least 1"));
            }
            if clients.saturating_mul(shards_per_client) > n {
                return Err(SimError::config(
                    "partitioner.shards_per_client",
                    format!("{clients} clients x {shards_per_client} shards is more shards than the {n} examples"),
                ));
            }
            (clients, shards(&examples, clients, shards_per_client, &mut rng))
        }
    };

    let mut out: Vec<ClientData> = (0..clients)
        .map(|i| ClientData { id: format!("client-{i:05}"), train: Vec::new(), test: Vec::new() })
        .collect();
    for (example, &client) in examples.iter().zip(&assignment) {
        let texts = if example.train { &mut out[client].train } else { &mut out[client].test };
        texts.push(example.text.to_owned());
    }
    if let Some(c) = out.iter().find(|c| c.train.is_empty() || c.test.is_empty()) {
        let missing = if c.train.is_empty() { "training" } else { "test" };
        return Err(SimError::Data(format!(
            "partitioner {partitioner} left {} without {missing} texts ({n} examples over {clients} clients); \
             use fewer clients or more data",
            c.id
        )));
    }
    Ok(Dataset { name: dataset.name.clone(), clients: out })
}

fn check_clients(clients: usize, examples: usize) -> Result<()> {
    if clients == 0 || clients > examples {
        return Err(SimError::config(
            "partitioner.clients",
            format!("is {clients}, but must be between 1 and the number of examples ({examples})"),
        ));
    }
    Ok(())
}

/// Shuffle the examples and deal them round robin: sizes differ by at most one.
fn iid(examples: &[Example<'_>], clients: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    // Train and test texts are dealt separately (stratified), one continuous round robin,
    // so every client gets its share of both and sizes differ by at most one.
    let mut train: Vec<usize> = (0..examples.len()).filter(|&i| examples[i].train).collect();
    let mut test: Vec<usize> = (0..examples.len()).filter(|&i| !examples[i].train).collect();
    train.shuffle(rng);
    test.shuffle(rng);
    let mut assignment = vec![0; examples.len()];
    for (position, &example) in train.iter().chain(test.iter()).enumerate() {
        assignment[example] = position % clients;
    }
    assignment
}

/// Per label, Dirichlet(alpha) proportions over clients; redrawn until every client has
/// `min_examples` examples and both train and test texts.
fn dirichlet(
    examples: &[Example<'_>],
    clients: usize,
    alpha: f64,
    min_examples: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<usize>> {
    let gamma = Gamma::new(alpha, 1.0)
        .map_err(|e| SimError::config("partitioner.alpha", format!("is {alpha}, not a valid concentration: {e}")))?;
    let mut by_label: Vec<Vec<usize>> = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        if by_label.len() <= e.label {
            by_label.resize_with(e.label + 1, Vec::new);
        }
        by_label[e.label].push(i);
    }
    let mut assignment = vec![0; examples.len()];
    let mut weights = vec![0.0; clients];
    for _ in 0..DIRICHLET_TRIES {
        for members in &mut by_label {
            members.shuffle(rng);
            for w in &mut weights {
                *w = gamma.sample(rng);
            }
            let total: f64 = weights.iter().sum();
            if !(total.is_finite() && total > 0.0) {
                // Every draw underflowed (tiny alpha): the limit is one client at random.
                weights.fill(0.0);
                weights[rng.random_range(0..clients)] = 1.0;
            }
            let total: f64 = weights.iter().sum();
            // Cut the label's examples at the rounded cumulative proportions (monotone).
            let m = members.len();
            let (mut cumulative, mut start) = (0.0, 0);
            for (client, w) in weights.iter().enumerate() {
                cumulative += w / total;
                let end = if client + 1 == clients { m } else { ((cumulative * m as f64).round() as usize).min(m) };
                for &i in &members[start..end] {
                    assignment[i] = client;
                }
                start = end;
            }
        }
        let mut counts = vec![(0_usize, false, false); clients];
        for (e, &client) in examples.iter().zip(&assignment) {
            let (count, train, test) = &mut counts[client];
            *count += 1;
            *train |= e.train;
            *test |= !e.train;
        }
        if counts.iter().all(|&(count, train, test)| count >= min_examples && train && test) {
            return Ok(assignment);
        }
    }
    Err(SimError::Data(format!(
        "dirichlet partition (alpha={alpha}) left a client with fewer than {min_examples} examples or without \
         training or test texts in {DIRICHLET_TRIES} draws; use fewer clients, a larger alpha or more data"
    )))
}

/// Sort by label, cut into `clients * shards_per_client` contiguous shards of equal size
/// (to one example), and deal each client `shards_per_client` random shards.
fn shards(examples: &[Example<'_>], clients: usize, shards_per_client: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    // Within a label, interleave train and test examples evenly (by their relative
    // position in their split) so that a shard cut from the middle of a label carries
    // its share of test texts rather than only training or only test texts.
    let mut split_sizes = std::collections::HashMap::<(usize, bool), usize>::new();
    let mut rank = Vec::with_capacity(examples.len());
    for e in examples {
        let seen = split_sizes.entry((e.label, e.train)).or_default();
        rank.push(*seen);
        *seen += 1;
    }
    let key = |i: usize| {
        let e = &examples[i];
        (rank[i] as f64 + 0.5) / split_sizes[&(e.label, e.train)] as f64
    };
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by(|&a, &b| examples[a].label.cmp(&examples[b].label).then(key(a).total_cmp(&key(b))).then(a.cmp(&b)));

    let n = examples.len();
    let total = clients * shards_per_client;
    let mut shard_ids: Vec<usize> = (0..total).collect();
    shard_ids.shuffle(rng);
    let mut assignment = vec![0; n];
    for (position, &shard) in shard_ids.iter().enumerate() {
        let client = position / shards_per_client;
        for &i in &order[shard * n / total..(shard + 1) * n / total] {
            assignment[i] = client;
        }
    }
    assignment
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// `labels` original clients with `train` and `test` texts each, named
    /// `l{label}-{train|test}-{i}`.
    fn synthetic(labels: usize, train: usize, test: usize) -> Dataset {
        let clients = (0..labels)
            .map(|l| ClientData {
                id: format!("orig-{l:03}"),
                train: (0..train).map(|i| format!("l{l}-train-{i}")).collect(),
                test: (0..test).map(|i| format!("l{l}-test-{i}")).collect(),
            })
            .collect();
        Dataset { name: "synthetic".into(), clients }
    }

    fn label(text: &str) -> &str {
        text.split('-').next().expect("label")
    }

    /// Every text lands in exactly one client, with its train/test flag, in pooled order.
    fn assert_preserved(before: &Dataset, after: &Dataset) {
        let pooled: Vec<&String> = before.clients.iter().flat_map(|c| c.train.iter().chain(&c.test)).collect();
        let position: BTreeMap<&str, usize> = pooled.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        assert_eq!(position.len(), pooled.len(), "synthetic texts are unique");
        let mut seen = Vec::new();
        for c in &after.clients {
            assert!(c.train.iter().all(|t| t.contains("-train-")), "{}: test text in train", c.id);
            assert!(c.test.iter().all(|t| t.contains("-test-")), "{}: train text in test", c.id);
            for texts in [&c.train, &c.test] {
                let positions: Vec<usize> = texts.iter().map(|t| position[t.as_str()]).collect();
                assert!(positions.windows(2).all(|w| w[0] < w[1]), "{}: not in pooled order", c.id);
            }
            seen.extend(c.train.iter().chain(&c.test).cloned());
        }
        seen.sort();
        let mut expected: Vec<String> = pooled.into_iter().cloned().collect();
        expected.sort();
        assert_eq!(seen, expected);
    }

    fn labels_per_client(data: &Dataset) -> Vec<usize> {
        data.clients
            .iter()
            .map(|c| c.train.iter().chain(&c.test).map(|t| label(t)).collect::<BTreeSet<_>>().len())
            .collect()
    }

    /// Mean over clients of the largest share one label has of the client's examples.
    fn mean_max_label_share(data: &Dataset) -> f64 {
        let shares = data.clients.iter().map(|c| {
            let mut counts = BTreeMap::<&str, usize>::new();
            for t in c.train.iter().chain(&c.test) {
                *counts.entry(label(t)).or_default() += 1;
            }
            *counts.values().max().expect("non-empty") as f64 / (c.train.len() + c.test.len()) as f64
        });
        shares.sum::<f64>() / data.num_clients() as f64
    }

    #[test]
    fn natural_keeps_the_dataset() {
        let data = synthetic(3, 4, 1);
        assert_eq!(partition(&data, &Partitioner::default(), 7).expect("natural"), data);
    }

    #[test]
    fn iid_deals_equal_sizes_and_preserves_examples() {
        let data = synthetic(7, 9, 3);
        let out = partition(&data, &Partitioner::Iid { clients: 5 }, 1).expect("iid");
        assert_preserved(&data, &out);
        let ids: Vec<&str> = out.clients.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["client-00000", "client-00001", "client-00002", "client-00003", "client-00004"]);
        let sizes: Vec<usize> = out.clients.iter().map(|c| c.train.len() + c.test.len()).collect();
        let (min, max) = (sizes.iter().min().expect("min"), sizes.iter().max().expect("max"));
        assert!(max - min <= 1, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 84);
        assert_eq!(out.name, data.name);
    }

    #[test]
    fn iid_gives_every_client_test_texts_even_when_they_are_scarce() {
        // 1 test text in 20: dealt without stratification, some of 50 clients would get none.
        let data = synthetic(10, 95, 5);
        let out = partition(&data, &Partitioner::Iid { clients: 50 }, 4).expect("iid");
        assert_preserved(&data, &out);
        assert!(out.clients.iter().all(|c| c.test.len() == 1 && c.train.len() == 19), "uneven split");
    }

    #[test]
    fn dirichlet_skew_grows_as_alpha_shrinks() {
        let data = synthetic(20, 40, 10);
        let skew = |alpha: f64| {
            let p = Partitioner::Dirichlet { clients: 10, alpha, min_examples: 5 };
            let out = partition(&data, &p, 3).expect("dirichlet");
            assert_preserved(&data, &out);
            assert!(out.clients.iter().all(|c| c.train.len() + c.test.len() >= 5));
            mean_max_label_share(&out)
        };
        let (skewed, uniform) = (skew(0.1), skew(100.0));
        println!("mean max label share: alpha 0.1 -> {skewed:.3}, alpha 100 -> {uniform:.3}");
        assert!(skewed > 0.25 && skewed > 3.0 * uniform, "{skewed} vs {uniform}");
        assert!(uniform < 0.15, "{uniform}");

        let impossible = Partitioner::Dirichlet { clients: 50, alpha: 0.01, min_examples: 20 };
        let err = partition(&data, &impossible, 3).expect_err("too many examples per client").to_string();
        assert!(err.contains("fewer clients"), "{err}");
    }

    #[test]
    fn shards_give_each_client_few_labels() {
        let data = synthetic(20, 40, 10);
        let out = partition(&data, &Partitioner::Shards { clients: 10, shards_per_client: 2 }, 5).expect("shards");
        assert_preserved(&data, &out);
        // 20 shards of 50 examples: exactly one label each.
        assert!(labels_per_client(&out).iter().all(|&l| l <= 2), "{:?}", labels_per_client(&out));
        assert!(out.clients.iter().all(|c| c.train.len() == 80 && c.test.len() == 20), "test texts spread evenly");
        let iid = partition(&data, &Partitioner::Iid { clients: 10 }, 5).expect("iid");
        assert!(labels_per_client(&iid).iter().all(|&l| l >= 10), "{:?}", labels_per_client(&iid));

        // Uneven shards still cover every example.
        let data = synthetic(7, 11, 4);
        let out = partition(&data, &Partitioner::Shards { clients: 4, shards_per_client: 3 }, 9).expect("uneven");
        assert_preserved(&data, &out);
    }

    #[test]
    fn partitions_are_deterministic_per_seed() {
        let data = synthetic(10, 8, 2);
        for p in [
            Partitioner::Iid { clients: 4 },
            Partitioner::Dirichlet { clients: 4, alpha: 0.5, min_examples: 1 },
            Partitioner::Shards { clients: 4, shards_per_client: 2 },
        ] {
            let a = partition(&data, &p, 11).expect("a");
            assert_eq!(a, partition(&data, &p, 11).expect("same seed"), "{p}");
            assert_ne!(a, partition(&data, &p, 12).expect("other seed"), "{p}");
        }
    }

    #[test]
    fn impossible_partitions_are_config_errors() {
        let data = synthetic(3, 4, 1);
        let cases = [
            (Partitioner::Iid { clients: 0 }, "partitioner.clients"),
            (Partitioner::Iid { clients: 16 }, "partitioner.clients"),
            (Partitioner::Dirichlet { clients: 2, alpha: 0.0, min_examples: 1 }, "partitioner.alpha"),
            (Partitioner::Dirichlet { clients: 2, alpha: f64::INFINITY, min_examples: 1 }, "partitioner.alpha"),
            (Partitioner::Dirichlet { clients: 2, alpha: 1.0, min_examples: 8 }, "partitioner.min_examples"),
            (Partitioner::Shards { clients: 2, shards_per_client: 0 }, "partitioner.shards_per_client"),
            (Partitioner::Shards { clients: 4, shards_per_client: 4 }, "partitioner.shards_per_client"),
        ];
        for (p, field) in cases {
            match partition(&data, &p, 0) {
                Err(SimError::Config { field: f, .. }) => assert_eq!(f, field, "{p}"),
                other => panic!("{p}: expected a config error on {field}, got {other:?}"),
            }
        }
        // 15 examples, 3 of them test, over 15 clients: each client gets one example.
        let err = partition(&data, &Partitioner::Iid { clients: 15 }, 0).expect_err("one example each").to_string();
        assert!(err.contains("left client-") && err.contains("fewer clients"), "{err}");
        // Over 5 clients, at least two get no test text.
        let err = partition(&data, &Partitioner::Iid { clients: 5 }, 0).expect_err("no test texts").to_string();
        assert!(err.contains("without") && err.contains("fewer clients"), "{err}");
    }
}
