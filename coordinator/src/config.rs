//! Coordinator configuration: serde structs with defaults (embedded defaults → TOML file),
//! validated into checked values before anything starts.
//!
//! `coordinator.example.toml` at the crate root documents every key; a test checks that it
//! parses and validates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use covey_tensors::lora::LoraTarget;
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CoordinatorConfig {
    /// gRPC listener (Fleet and Admin services). Default `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listener; `None` disables it. Default `127.0.0.1:9090`.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory holding `state.sqlite`, `artifacts/` and `coordinator.key`; created on
    /// first start. Default `covey-state`.
    pub state_dir: PathBuf,
    /// The initial model, read once, on first start: a `.gguf` file or a model directory
    /// (`config.json`, `model.safetensors` in f32, int8 or int4, and optionally
    /// `tokenizer.json` and `tokenizer_config.json`; Hugging Face Llama names), as
    /// `covey-model` reads it. Required on first start.
    pub initial_model: Option<PathBuf>,
    /// Operator authentication.
    pub admin: AdminConfig,
    /// Device enrolment.
    pub enrollment: EnrollmentConfig,
    /// TLS; plaintext when absent.
    pub tls: Option<TlsConfig>,
    /// LoRA layout devices train.
    pub lora: LoraSection,
    /// Round policy.
    pub rounds: RoundsConfig,
    /// Local training hyper-parameters sent with each task.
    pub training: TrainingSection,
    /// Clipping, noise and accounting.
    pub privacy: PrivacySection,
    /// Aggregation strategy (`kind = "fed-avg" | "fed-prox" | "fed-adam" | ...`).
    pub strategy: covey_strategy::StrategyConfig,
    /// Upload limits.
    pub limits: LimitsConfig,
    /// Base releases and adapter versions.
    pub publish: PublishSection,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            state_dir: PathBuf::from("covey-state"),
            initial_model: None,
            admin: AdminConfig::default(),
            enrollment: EnrollmentConfig::default(),
            tls: None,
            lora: LoraSection::default(),
            rounds: RoundsConfig::default(),
            training: TrainingSection::default(),
            privacy: PrivacySection::default(),
            strategy: covey_strategy::StrategyConfig::FedAvg { server_learning_rate: 1.0 },
            limits: LimitsConfig::default(),
            publish: PublishSection::default(),
        }
    }
}

/// Operator authentication.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminConfig {
    /// Bearer token of the Admin service; the environment variable `COVEY_ADMIN_TOKEN`
    /// overrides it (read by the binary, never by the library). Empty disables the Admin
    /// service. Default empty.
    pub token: String,
}

/// Device enrolment.
///
/// Production fleets enrol with tokens minted by the Admin service
/// (`covey-coordinator mint-token`): single-use or limited to N devices, expiring, kept
/// only as their SHA-256. Static `tokens` here are for labs and tests: multi-use and
/// without expiry. Either kind is burned (enrols no one any more) when a device it
/// enrolled is revoked, so a revoked holder cannot come back with a new key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct EnrollmentConfig {
    /// Static multi-use tokens (at least 8 characters each). Default none.
    pub tokens: Vec<String>,
    /// Largest accepted clock skew of signed device requests. Default `5m`.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Enrolments accepted per minute over the whole coordinator (a burst of as many is
    /// allowed); more are refused with `RESOURCE_EXHAUSTED`. Default 60.
    pub per_minute: u32,
    /// Enrolments accepted per minute with any one token. Default 10.
    pub per_token_per_minute: u32,
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        Self { tokens: Vec::new(), max_clock_skew: Duration::from_secs(300), per_minute: 60, per_token_per_minute: 10 }
    }
}

/// Server TLS (rustls).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA that client certificates must chain to (mutual TLS); absent: no client
    /// certificates asked.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// How the weights of a base release are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseQuantization {
    /// int8 per output channel (symmetric).
    Int8,
    /// int4 in groups of 32 (asymmetric); int8 for rows that do not split into groups.
    Int4,
}

impl ReleaseQuantization {
    /// The codec.
    pub fn scheme(self) -> covey_tensors::quant::Scheme {
        match self {
            Self::Int8 => covey_tensors::quant::Scheme::Int8,
            Self::Int4 => covey_tensors::quant::Scheme::Int4,
        }
    }
}

/// Base releases and adapter versions. Each round publishes only the aggregated adapter
/// (cumulative since the release); every `release-every` rounds the coordinator merges it
/// into its f32 master and publishes a new quantized base release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PublishSection {
    /// Quantization of base releases: `int8` or `int4`. Default `int8`.
    pub quantization: ReleaseQuantization,
    /// Rounds per base release: the round that brings an adapter to this many rounds cuts
    /// a new release instead (1: every round republishes the whole model). Default 10.
    pub release_every: u64,
    /// Base releases kept on disk: when a new one is cut, the weights, master and
    /// adapters of older releases beyond this many (the current version's release is
    /// always kept) are deleted; their versions stay listed but cannot be made current
    /// again. 0 keeps every release. Default 0.
    pub keep_releases: usize,
    /// When the operator promotes an adapter version (`covey-coordinator promote`), cut a
    /// base release from it (its adapter merged into the master, quantized) and make that
    /// current, so devices receive the promoted weights merged rather than release plus
    /// adapter. `rollback` is never turned into a release. Default false.
    pub release_on_promote: bool,
}

impl Default for PublishSection {
    fn default() -> Self {
        Self { quantization: ReleaseQuantization::Int8, release_every: 10, keep_releases: 0, release_on_promote: false }
    }
}

/// LoRA layout (FFA-LoRA: the coordinator issues the frozen `A`, devices train `B`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LoraSection {
    /// Rank r: the rank of the `A` factors and of the published adapter, and the largest
    /// a device trains. Default 8.
    pub rank: usize,
    /// Smaller ranks devices of lesser means may train (HetLoRA): a device that can train
    /// at most r' gets the largest of `rank` and these that is at most r', the first r'
    /// rows of `A`, and `alpha · r' / rank` (the same scale `alpha / rank`); its `B` is
    /// zero-padded to `rank` columns before aggregation. Default none.
    pub device_ranks: Vec<usize>,
    /// alpha; the adapter adds (alpha / r)·B·A. Default 16.
    pub alpha: f32,
    /// Projections that carry adapters. Default all seven.
    pub targets: Vec<String>,
    /// Seed of the `A` factors (public: every device gets the same `A`). Default 0.
    pub seed: u64,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 8,
            device_ranks: Vec::new(),
            alpha: 16.0,
            targets: LoraTarget::ALL.iter().map(|t| t.hf_name().to_owned()).collect(),
            seed: 0,
        }
    }
}

impl LoraSection {
    /// The targets, in the configured order (a name that is not a projection, which
    /// validation refuses, is skipped).
    pub fn lora_targets(&self) -> Vec<LoraTarget> {
        self.targets.iter().filter_map(|t| LoraTarget::from_hf_name(t)).collect()
    }

    /// Every rank a device may train, ascending: `device-ranks` and `rank`.
    pub fn allowed_ranks(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.device_ranks.iter().copied().chain([self.rank]).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// The rank of a device that can train at most `max_rank` (0: any): the largest
    /// allowed rank not above it, or the smallest allowed rank.
    pub fn rank_for(&self, max_rank: u32) -> usize {
        let allowed = self.allowed_ranks();
        if max_rank == 0 {
            return self.rank;
        }
        allowed.iter().rev().find(|&&r| r <= max_rank as usize).copied().unwrap_or(allowed[0])
    }
}

/// Round policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RoundsConfig {
    /// Updates wanted per round; the round closes early when they are in. Default 10.
    pub target_updates: usize,
    /// Extra fraction of devices sampled to tolerate drop-outs (0.3 = 30 % more).
    /// Default 0.3.
    pub over_selection: f64,
    /// Updates needed to publish at the deadline; fewer fail the round. Default 2.
    pub min_updates: usize,
    /// Devices online (enrolled, not revoked, seen within the eligibility window) needed
    /// before a round opens (Flower's `min_available_clients`); devices resting under
    /// their participation limits count here, though they are not sampled. Default 2.
    pub min_available: usize,
    /// How long a round collects. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Devices count as eligible when seen (poll or heartbeat) this recently. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub eligibility_window: Duration,
    /// Pause between rounds. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub pause: Duration,
    /// Stop opening rounds after this many published; 0 runs forever. Default 0.
    pub max_rounds: u64,
    /// Seed of cohort sampling, **for simulations only**: with a seed, anyone who knows it
    /// can tell who was sampled, which voids the amplification by sampling that the
    /// accountant assumes. Absent (the default), cohorts are drawn from the OS CSPRNG.
    pub seed: Option<u64>,
    /// Devices are told to poll again after this long (at least). Default `2s`.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Pace steering ([`crate::pace`]): the check-ins per second the coordinator spreads
    /// waiting devices' next polls over, so that a crowd arriving at once comes back
    /// evenly; 0 turns it off (every device is told `poll-interval`). Below this rate
    /// nothing changes. Default 500.
    pub pace_polls_per_second: f64,
    /// The longest wait pace steering gives; keep it at or below the agents'
    /// `max-poll-wait`. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub pace_max_wait: Duration,
}

impl Default for RoundsConfig {
    fn default() -> Self {
        Self {
            target_updates: 10,
            over_selection: 0.3,
            min_updates: 2,
            min_available: 2,
            deadline: Duration::from_secs(600),
            eligibility_window: Duration::from_secs(600),
            pause: Duration::from_secs(1),
            max_rounds: 0,
            seed: None,
            poll_interval: Duration::from_secs(2),
            pace_polls_per_second: 500.0,
            pace_max_wait: Duration::from_secs(60),
        }
    }
}

/// Local training hyper-parameters sent with each task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainingSection {
    /// Optimizer steps per round. Default 20.
    pub steps: u32,
    /// Sequences per step. Default 8.
    pub batch_size: u32,
    /// Tokens per sequence. Default 128.
    pub seq_len: u32,
    /// Peak learning rate. Default 3e-3.
    pub learning_rate: f32,
    /// Seed of local batch sampling. Default 0.
    pub seed: u64,
    /// How devices encode their updates: `f32` (default), `int8` or `int4` (stochastic
    /// rounding, unbiased; about 3.8× and 7× fewer bytes up).
    pub update_encoding: covey_tensors::compress::UpdateEncoding,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            steps: 20,
            batch_size: 8,
            seq_len: 128,
            learning_rate: 3e-3,
            seed: 0,
            update_encoding: covey_tensors::compress::UpdateEncoding::F32,
        }
    }
}

/// Clipping, noise and accounting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrivacySection {
    /// L2 bound devices clip their update to; 0 disables clipping. Default 1.0.
    pub clip_norm: f64,
    /// Local-DP noise multiplier applied on devices; 0 for none. Default 0.
    pub local_noise_multiplier: f64,
    /// Central DP-FedAvg around the strategy (server-side clipping and noise).
    pub central: Option<covey_strategy::DpConfig>,
    /// δ at which ε is reported. Default 1e-5.
    pub delta: f64,
    /// The accountant that turns the rounds' releases into ε: `rdp` (Rényi DP, the
    /// default) or `pld` (privacy loss distributions: tighter, ≈ 0.1 s a query).
    pub accountant: covey_privacy::Accountant,
    /// Devices each round samples from, N: every eligible device joins the cohort
    /// independently with probability q = cohort / N (Poisson sampling), the q the
    /// accountant uses. 0 (the default) takes N = the eligible devices at the round's
    /// opening; a value below them is refused (the round does not open), since q would
    /// then understate each device's chance of being sampled.
    pub population: usize,
    /// Stop opening rounds before the run's ε (at `delta`) would pass this. Default none.
    pub target_epsilon: Option<f64>,
    /// Keep the raw update payloads of finished rounds (audits, debugging). They are
    /// personal data (clipped but not noised under central DP): by default each round's
    /// payloads are deleted once it is published or failed. Default false.
    pub retain_updates: bool,
    /// Limits on how often one enrolled device contributes (`[privacy.participation]`).
    pub participation: ParticipationLimits,
}

/// How often one enrolled device may contribute, enforced by the coordinator: a device
/// over a limit is given no task and its upload is refused. Counted per enrolled device
/// identity (its key): a device that is revoked and enrols again with a new key starts
/// afresh, so an operator who needs a person-level bound issues one-time enrolment
/// tokens per person and does not re-enrol (see ARCHITECTURE.md, "Participation limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ParticipationLimits {
    /// At least this many rounds between two contributions of a device (round ids: a
    /// device that contributed to round r is next eligible for round r + min-separation).
    /// 0 or 1: no limit. DP-FTRL needs it: its noise tree spans this many rounds.
    pub min_separation: u64,
    /// At most this many contributions per device over the accounting period (this state
    /// directory). 0: no limit. DP-FTRL's ε is computed from it.
    pub max_participations: u64,
}

impl ParticipationLimits {
    /// Whether a device with `count` contributions, the last in round `last`, may
    /// contribute to round `round`.
    pub fn allows(&self, count: u64, last: Option<u64>, round: u64) -> bool {
        let under_max = self.max_participations == 0 || count < self.max_participations;
        let separated = match last {
            Some(last) if self.min_separation > 1 => round >= last.saturating_add(self.min_separation),
            _ => true,
        };
        under_max && separated
    }
}

impl PrivacySection {
    /// `[privacy.central]` as the strategy is built from it: DP-FTRL's tree period is
    /// `participation.min-separation` unless set.
    pub fn effective_central(&self) -> Option<covey_strategy::DpConfig> {
        self.central.clone().map(|mut c| {
            if c.mechanism == covey_strategy::Mechanism::DpFtrl && c.tree_period.is_none() {
                c.tree_period = Some(self.participation.min_separation);
            }
            c
        })
    }

    /// The central mechanism, if any.
    pub fn mechanism(&self) -> Option<covey_strategy::Mechanism> {
        self.central.as_ref().map(|c| c.mechanism)
    }
}

impl Default for PrivacySection {
    fn default() -> Self {
        Self {
            clip_norm: 1.0,
            local_noise_multiplier: 0.0,
            central: None,
            delta: 1e-5,
            accountant: covey_privacy::Accountant::Rdp,
            population: 0,
            target_epsilon: None,
            retain_updates: false,
            participation: ParticipationLimits::default(),
        }
    }
}

/// Upload and request limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsConfig {
    /// Largest update payload in bytes (the coordinator also refuses anything larger than
    /// the `B` factors it expects plus 64 KiB of header). Default 64 MiB.
    pub max_payload_bytes: u64,
    /// Largest L2 norm of an accepted update, as a multiple of the clip norm (noise makes
    /// locally-noised updates longer than C). Default 1.0 plus the noise allowance.
    pub norm_slack: f64,
    /// Uploads in progress at once over all devices; more are answered `UNAVAILABLE`.
    /// Default 64.
    pub max_concurrent_uploads: usize,
    /// Concurrent HTTP/2 streams one connection may open. Default 16.
    pub max_streams_per_connection: u32,
    /// Longest any request may take, uploads and downloads included. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Signed requests (polls, heartbeats, manifests, artifact downloads) one device may
    /// make per minute (a burst of as many is allowed); more are answered
    /// `RESOURCE_EXHAUSTED`. Never less than twice the polling rate `rounds.poll-interval`
    /// asks for, plus 30. Default 120.
    pub device_requests_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 << 20,
            norm_slack: 1.0,
            max_concurrent_uploads: 64,
            max_streams_per_connection: 16,
            request_timeout: Duration::from_secs(600),
            device_requests_per_minute: 120,
        }
    }
}

impl CoordinatorConfig {
    /// Defaults overridden by a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CoordinatorError::io(path, e))?;
        Self::from_toml(&text).map_err(|e| match e {
            CoordinatorError::Config { field, reason } => {
                CoordinatorError::Config { field, reason: format!("{}: {reason}", path.display()) }
            }
            other => other,
        })
    }

    /// Parse TOML text (keys absent take their defaults) and validate.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text)
            .map_err(|e| CoordinatorError::Config { field: "toml".into(), reason: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Check that every value is possible.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(CoordinatorError::Config { field: field.into(), reason });
        if self.enrollment.tokens.iter().any(|t| t.len() < 8) {
            return bad("enrollment.tokens", "static tokens need 8 or more characters".into());
        }
        if self.enrollment.tokens.is_empty() && self.admin.token.is_empty() {
            return bad(
                "enrollment.tokens",
                "no way to enrol a device: give a static token, or an admin token to mint tokens with".into(),
            );
        }
        if !self.admin.token.is_empty() && self.admin.token.len() < 16 {
            return bad("admin.token", "must be empty (Admin service off) or at least 16 characters".into());
        }
        if self.enrollment.per_minute == 0 || self.enrollment.per_token_per_minute == 0 {
            return bad("enrollment", "per-minute and per-token-per-minute must be at least 1".into());
        }
        if self.lora.rank == 0 {
            return bad("lora.rank", "must be at least 1".into());
        }
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            return bad("lora.alpha", format!("{} is not a positive number", self.lora.alpha));
        }
        if let Some(r) = self.lora.device_ranks.iter().find(|&&r| r == 0 || r > self.lora.rank) {
            return bad("lora.device-ranks", format!("{r} is not in 1..={}", self.lora.rank));
        }
        if self.lora.targets.is_empty() {
            return bad("lora.targets", "at least one target is required".into());
        }
        for t in &self.lora.targets {
            if LoraTarget::from_hf_name(t).is_none() {
                let known: Vec<&str> = LoraTarget::ALL.iter().map(|t| t.hf_name()).collect();
                return bad("lora.targets", format!("unknown target `{t}` (known: {})", known.join(", ")));
            }
        }
        if self.publish.release_every == 0 {
            return bad("publish.release-every", "must be at least 1".into());
        }
        let r = &self.rounds;
        if r.min_updates == 0 {
            return bad("rounds.min-updates", "must be at least 1".into());
        }
        if r.target_updates < r.min_updates {
            return bad(
                "rounds.target-updates",
                format!("{} is below min-updates {}", r.target_updates, r.min_updates),
            );
        }
        if r.min_available < r.min_updates {
            return bad("rounds.min-available", format!("{} is below min-updates {}", r.min_available, r.min_updates));
        }
        if !(r.over_selection.is_finite() && (0.0..=10.0).contains(&r.over_selection)) {
            return bad("rounds.over-selection", format!("{} is not in [0, 10]", r.over_selection));
        }
        if r.deadline.is_zero() {
            return bad("rounds.deadline", "must be positive".into());
        }
        if !(r.pace_polls_per_second.is_finite() && r.pace_polls_per_second >= 0.0) {
            return bad("rounds.pace-polls-per-second", format!("{} is not a number >= 0", r.pace_polls_per_second));
        }
        if r.pace_max_wait < r.poll_interval {
            return bad("rounds.pace-max-wait", "must be at least rounds.poll-interval".into());
        }
        let t = &self.training;
        if t.steps == 0 || t.batch_size == 0 || t.seq_len == 0 {
            return bad("training", "steps, batch-size and seq-len must be at least 1".into());
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad("training.learning-rate", format!("{} is not a positive number", t.learning_rate));
        }
        let p = &self.privacy;
        if !(p.clip_norm.is_finite() && p.clip_norm >= 0.0) {
            return bad("privacy.clip-norm", format!("{} is not a finite non-negative number", p.clip_norm));
        }
        if !(p.local_noise_multiplier.is_finite() && p.local_noise_multiplier >= 0.0) {
            return bad("privacy.local-noise-multiplier", format!("{} is negative", p.local_noise_multiplier));
        }
        if p.local_noise_multiplier > 0.0 && p.clip_norm == 0.0 {
            return bad("privacy.local-noise-multiplier", "local noise needs a clip-norm".into());
        }
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return bad("privacy.delta", format!("{} is not in (0, 1)", p.delta));
        }
        if self.limits.max_payload_bytes == 0 {
            return bad("limits.max-payload-bytes", "must be positive".into());
        }
        if !(self.limits.norm_slack.is_finite() && self.limits.norm_slack >= 1.0) {
            return bad("limits.norm-slack", format!("{} is below 1", self.limits.norm_slack));
        }
        let l = &self.limits;
        if l.max_concurrent_uploads == 0 || l.max_streams_per_connection == 0 || l.device_requests_per_minute == 0 {
            return bad(
                "limits",
                "max-concurrent-uploads, max-streams-per-connection and device-requests-per-minute must be at least 1"
                    .into(),
            );
        }
        if l.request_timeout.is_zero() {
            return bad("limits.request-timeout", "must be positive".into());
        }
        if let Some(t) = p.target_epsilon {
            if !(t.is_finite() && t > 0.0) {
                return bad("privacy.target-epsilon", format!("{t} is not a positive number"));
            }
            if p.central.is_none() && p.local_noise_multiplier == 0.0 {
                return bad(
                    "privacy.target-epsilon",
                    "needs noise: [privacy.central] or local-noise-multiplier".into(),
                );
            }
        }
        if p.mechanism() == Some(covey_strategy::Mechanism::DpFtrl) {
            let limits = p.participation;
            if limits.min_separation == 0 {
                return bad(
                    "privacy.participation.min-separation",
                    "DP-FTRL needs it (at least 1): a device contributes at most once per noise tree".into(),
                );
            }
            let period = p.effective_central().and_then(|c| c.tree_period).unwrap_or(0);
            if period > limits.min_separation {
                return bad(
                    "privacy.central.tree_period",
                    format!(
                        "{period} rounds per tree exceeds min-separation {}: a device could contribute twice to \
                         one tree, which the accountant cannot honour",
                        limits.min_separation
                    ),
                );
            }
            if limits.max_participations == 0 && self.rounds.max_rounds == 0 {
                return bad(
                    "privacy.participation.max-participations",
                    "DP-FTRL's ε grows with every contribution: bound it (max-participations, or rounds.max-rounds)"
                        .into(),
                );
            }
            if p.local_noise_multiplier > 0.0 {
                return bad("privacy.local-noise-multiplier", "DP-FTRL adds the noise at the server: set 0".into());
            }
        }
        covey_strategy::build(
            &self.strategy,
            self.privacy.effective_central().as_ref(),
            covey_strategy::Randomness::Seeded([0; 32]),
        )
        .map_err(|e| CoordinatorError::Config { field: "strategy".into(), reason: e.to_string() })?;
        Ok(())
    }

    /// Cohort size for `eligible` devices: target × (1 + over-selection), at most `eligible`.
    pub fn cohort_size(&self, eligible: usize) -> usize {
        let wanted = (self.rounds.target_updates as f64 * (1.0 + self.rounds.over_selection)).ceil() as usize;
        wanted.min(eligible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../coordinator.example.toml");
        let c = CoordinatorConfig::from_toml(text).expect("example config");
        assert_eq!(c.rounds.min_updates, 2);
        assert!(c.tls.is_none());
        assert_eq!(c.rounds, RoundsConfig::default(), "the example shows the rounds' defaults");
    }

    #[test]
    fn pace_steering_settings_are_checked() {
        let base = "[enrollment]\ntokens = [\"0123456789\"]\n[rounds]\n";
        let c = CoordinatorConfig::from_toml(&format!("{base}pace-polls-per-second = 0.0\n")).expect("off");
        assert_eq!(c.rounds.pace_polls_per_second, 0.0);
        let err = CoordinatorConfig::from_toml(&format!("{base}pace-polls-per-second = -1.0\n")).expect_err("negative");
        assert!(err.to_string().contains("rounds.pace-polls-per-second"), "{err}");
        let err = CoordinatorConfig::from_toml(&format!("{base}poll-interval = \"5s\"\npace-max-wait = \"2s\"\n"))
            .expect_err("max wait below the interval");
        assert!(err.to_string().contains("rounds.pace-max-wait"), "{err}");
    }

    #[test]
    fn defaults_need_a_token() {
        let err = CoordinatorConfig::from_toml("").expect_err("no token");
        assert!(err.to_string().contains("enrollment.tokens"), "{err}");
        // An admin token alone suffices (tokens are minted), but it must be long.
        CoordinatorConfig::from_toml("[admin]\ntoken = \"0123456789abcdef\"\n").expect("minted tokens only");
        let err = CoordinatorConfig::from_toml("[admin]\ntoken = \"short\"\n").expect_err("short admin token");
        assert!(err.to_string().contains("admin.token"), "{err}");
        let err =
            CoordinatorConfig::from_toml("[enrollment]\ntokens = [\"0123456789\"]\n[privacy]\ntarget-epsilon = 8.0\n")
                .expect_err("target without noise");
        assert!(err.to_string().contains("target-epsilon"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let base = "[enrollment]\ntokens = [\"0123456789\"]\n";
        let err = CoordinatorConfig::from_toml(&format!("{base}[rounds]\nmin-updatez = 3\n")).expect_err("typo");
        assert!(err.to_string().contains("min-updatez"), "{err}");
        let err = CoordinatorConfig::from_toml(&format!("{base}[rounds]\nmin-updates = 5\ntarget-updates = 2\n"))
            .expect_err("target below min");
        assert!(err.to_string().contains("rounds.target-updates"), "{err}");
        let err =
            CoordinatorConfig::from_toml(&format!("{base}[lora]\ntargets = [\"qq_proj\"]\n")).expect_err("target");
        assert!(err.to_string().contains("qq_proj"), "{err}");
        let err =
            CoordinatorConfig::from_toml(&format!("{base}[rounds]\ndeadline = \"soon\"\n")).expect_err("duration");
        assert!(err.to_string().contains("deadline"), "{err}");
        let err = CoordinatorConfig::from_toml(&format!("{base}[privacy]\naccountant = \"moments\"\n"))
            .expect_err("accountant");
        let err = err.to_string();
        assert!(err.contains("accountant") && err.contains("moments") && err.contains("pld"), "{err}");
        let c = CoordinatorConfig::from_toml(&format!("{base}[privacy]\naccountant = \"pld\"\n")).expect("pld");
        assert_eq!(c.privacy.accountant, covey_privacy::Accountant::Pld);
    }

    #[test]
    fn cohort_over_selects_within_the_eligible() {
        let c = CoordinatorConfig::default();
        assert_eq!(c.cohort_size(100), 13);
        assert_eq!(c.cohort_size(5), 5);
    }
}
