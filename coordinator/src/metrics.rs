//! Prometheus metrics, served as text on `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a refused update.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// [`crate::error::Rejection::label`].
    pub reason: String,
}

/// Label of a closed round.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `published` or `failed`.
    pub outcome: String,
}

/// Every metric the coordinator exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Rounds closed, by outcome.
    pub rounds: Family<OutcomeLabel, Counter>,
    /// Updates stored.
    pub updates_accepted: Counter,
    /// Updates refused, by reason.
    pub updates_rejected: Family<ReasonLabel, Counter>,
    /// Device requests refused (authentication, enrolment tokens, rate and concurrency
    /// limits), by reason: the label of the [`crate::Rejection`].
    pub requests_refused: Family<ReasonLabel, Counter>,
    /// Payload bytes received in accepted updates.
    pub bytes_received: Counter,
    /// Artifact bytes sent.
    pub bytes_sent: Counter,
    /// Downloads resumed from an offset (after a dropped connection).
    pub downloads_resumed: Counter,
    /// Seconds from opening to closing a round.
    pub round_seconds: Histogram,
    /// Seconds spent aggregating and publishing.
    pub aggregate_seconds: Histogram,
    /// Devices enrolled and not revoked.
    pub active_devices: Gauge,
    /// Current model version.
    pub current_version: Gauge,
    /// Tasks devices declined (their memory budget does not fit the task).
    pub tasks_declined: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("covey");
        let rounds = Family::<OutcomeLabel, Counter>::default();
        registry.register("rounds", "Rounds closed, by outcome", rounds.clone());
        let updates_accepted = Counter::default();
        registry.register("updates_accepted", "Updates verified and stored", updates_accepted.clone());
        let updates_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register("updates_rejected", "Updates refused, by reason", updates_rejected.clone());
        let requests_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "requests_refused",
            "Device requests refused (authentication, tokens, limits), by reason",
            requests_refused.clone(),
        );
        let bytes_received = Counter::default();
        registry.register("update_bytes_received", "Payload bytes of accepted updates", bytes_received.clone());
        let bytes_sent = Counter::default();
        registry.register("artifact_bytes_sent", "Artifact bytes streamed to devices", bytes_sent.clone());
        let downloads_resumed = Counter::default();
        registry.register(
            "artifact_downloads_resumed",
            "Artifact downloads resumed from an offset after an interruption",
            downloads_resumed.clone(),
        );
        let round_seconds = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        registry.register("round_duration_seconds", "Seconds from opening to closing a round", round_seconds.clone());
        let aggregate_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register("aggregate_duration_seconds", "Seconds to aggregate and publish", aggregate_seconds.clone());
        let active_devices = Gauge::default();
        registry.register("active_devices", "Enrolled devices that are not revoked", active_devices.clone());
        let current_version = Gauge::default();
        registry.register("current_version", "Model version devices run", current_version.clone());
        let tasks_declined = Counter::default();
        registry.register(
            "tasks_declined",
            "Tasks devices declined, with a reason the round records",
            tasks_declined.clone(),
        );
        Self {
            registry,
            rounds,
            updates_accepted,
            updates_rejected,
            requests_refused,
            bytes_received,
            bytes_sent,
            downloads_resumed,
            round_seconds,
            aggregate_seconds,
            active_devices,
            current_version,
            tasks_declined,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Count a refused update.
    pub fn reject(&self, reason: &str) {
        self.updates_rejected.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// Count a refused device request.
    pub fn refuse(&self, reason: &str) {
        self.requests_refused.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }
}

/// Serve `/metrics` on `addr` until the task is dropped.
pub async fn serve(metrics: Arc<Metrics>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    m.render(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Bind the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_counted_by_reason() {
        let m = Metrics::default();
        m.reject("replay");
        m.reject("replay");
        m.updates_accepted.inc();
        let text = m.render();
        assert!(text.contains("covey_updates_rejected_total{reason=\"replay\"} 2"), "{text}");
        assert!(text.contains("covey_updates_accepted_total 1"), "{text}");
    }
}
