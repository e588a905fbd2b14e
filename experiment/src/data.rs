//! Where an experiment's clients come from: the LEAF Shakespeare options and the
//! partitioner that spreads a pooled corpus over clients. Loading and partitioning are
//! `covey-sim`'s (`dataset`, `partition`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Options of the LEAF Shakespeare source (`covey_sim::dataset::leaf_shakespeare`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LeafOptions {
    /// Play stems to include (`hamlet`, `macbeth`); empty means every play.
    pub plays: Vec<String>,
    /// Play stems to leave out.
    pub exclude_plays: Vec<String>,
    /// Fewest speeches a role needs to become a client (at least 2: one to train on,
    /// one to test).
    pub min_speeches: usize,
    /// Fraction of each role's speeches, the earliest ones, used for training; in (0, 1).
    pub train_fraction: f64,
    /// Keep at most this many clients, those with the most training bytes; 0 keeps all.
    pub max_clients: usize,
}

impl Default for LeafOptions {
    fn default() -> Self {
        Self { plays: Vec::new(), exclude_plays: Vec::new(), min_speeches: 8, train_fraction: 0.8, max_clients: 0 }
    }
}

/// How to spread a pooled corpus over clients (`covey_sim::partition::partition` does it).
///
/// In an experiment file: `partitioner = { kind = "dirichlet", clients = 20, alpha = 0.5 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Partitioner {
    /// Keep the dataset's own clients (LEAF's speaking roles, client directories).
    Natural {},
    /// Uniformly random assignment with equal sizes (to one example): shuffle the
    /// examples and deal them round robin.
    Iid {
        /// Number of clients. Train and test texts are dealt separately, so each client
        /// gets a share of both.
        clients: usize,
    },
    /// Label skew after Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data
    /// Distribution for Federated Visual Classification"): for each label, draw
    /// proportions over clients from a symmetric Dirichlet(alpha) and deal that label's
    /// examples accordingly. Small alpha gives each client few labels; large alpha
    /// approaches IID. Draws are repeated (a bounded number of times) until every client
    /// has `min_examples` examples and both train and test texts.
    Dirichlet {
        /// Number of clients.
        clients: usize,
        /// Concentration; finite and positive.
        alpha: f64,
        /// Fewest examples a client may get (default 1).
        #[serde(default = "min_one")]
        min_examples: usize,
    },
    /// Pathological label skew after McMahan et al. 2017 ("Communication-Efficient
    /// Learning of Deep Networks from Decentralized Data"): sort the examples by label,
    /// cut them into `clients * shards_per_client` contiguous shards and give each client
    /// `shards_per_client` random shards, so a client sees only a few labels.
    Shards {
        /// Number of clients.
        clients: usize,
        /// Shards per client.
        shards_per_client: usize,
    },
}

fn min_one() -> usize {
    1
}

impl Default for Partitioner {
    fn default() -> Self {
        Self::Natural {}
    }
}

impl fmt::Display for Partitioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Natural {} => write!(f, "natural"),
            Self::Iid { clients } => write!(f, "iid(clients={clients})"),
            Self::Dirichlet { clients, alpha, min_examples } => {
                write!(f, "dirichlet(clients={clients}, alpha={alpha}, min_examples={min_examples})")
            }
            Self::Shards { clients, shards_per_client } => {
                write!(f, "shards(clients={clients}, shards_per_client={shards_per_client})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioners_read_from_toml_and_json() {
        #[derive(serde::Deserialize)]
        struct Experiment {
            partitioner: Partitioner,
        }
        let read = |s: &str| toml::from_str::<Experiment>(s).map(|e| e.partitioner);
        assert_eq!(read("partitioner = { kind = \"natural\" }").expect("natural"), Partitioner::Natural {});
        assert_eq!(
            read("partitioner = { kind = \"iid\", clients = 8 }").expect("iid"),
            Partitioner::Iid { clients: 8 }
        );
        assert_eq!(
            read("[partitioner]\nkind = \"dirichlet\"\nclients = 8\nalpha = 0.5").expect("dirichlet"),
            Partitioner::Dirichlet { clients: 8, alpha: 0.5, min_examples: 1 }
        );
        assert_eq!(
            read("partitioner = { kind = \"shards\", clients = 8, shards_per_client = 2 }").expect("shards"),
            Partitioner::Shards { clients: 8, shards_per_client: 2 }
        );
        assert!(read("partitioner = { kind = \"iid\", clients = 8, alpha = 1.0 }").is_err(), "unknown field");
        assert!(read("partitioner = { kind = \"pathological\" }").is_err(), "unknown kind");
        let p = Partitioner::Dirichlet { clients: 3, alpha: 0.1, min_examples: 2 };
        let json = serde_json::to_string(&p).expect("json");
        assert_eq!(json, r#"{"kind":"dirichlet","clients":3,"alpha":0.1,"min_examples":2}"#);
        assert_eq!(serde_json::from_str::<Partitioner>(&json).expect("round trip"), p);
    }
}
