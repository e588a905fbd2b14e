//! The gRPC client of the coordinator's `Fleet` service: channel set-up (optionally TLS
//! or mutual TLS through rustls), message-size limits, time limits, and one method per
//! RPC that retries transient failures with backoff.

use std::path::Path;
use std::time::Duration;

use covey_proto::manifest::ArtifactRef;
use covey_proto::pb::fleet_client::FleetClient;
use covey_proto::pb::{self, poll_task_response, update_chunk};
use covey_proto::signing::DeviceMethod;
use covey_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::backoff::{Backoff, retry};
use crate::config::{AgentConfig, BackoffConfig};
use crate::download::PieceWriter;
use crate::error::{AgentError, Result};
use crate::identity::{CA_FILE, Identity};
use crate::update::SignedUpdate;

/// Where downloaded bytes go, in order.
trait Sink: Send {
    /// Offset of the next byte.
    fn offset(&self) -> u64;
    /// Take the next bytes.
    fn accept(&mut self, data: &[u8]) -> Result<()>;
}

impl Sink for Vec<u8> {
    fn offset(&self) -> u64 {
        self.len() as u64
    }

    fn accept(&mut self, data: &[u8]) -> Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }
}

impl Sink for PieceWriter<'_> {
    fn offset(&self) -> u64 {
        PieceWriter::offset(self)
    }

    fn accept(&mut self, data: &[u8]) -> Result<()> {
        PieceWriter::accept(self, data)
    }
}

/// A connection to the coordinator. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    client: FleetClient<Channel>,
    url: String,
    backoff: BackoffConfig,
    request_timeout: Duration,
}

/// What a poll answered.
#[derive(Debug, Clone, PartialEq)]
pub enum PollReply {
    /// Work to do (not yet validated: see [`crate::task::Task`]).
    Task(Box<pb::Task>),
    /// Nothing now; ask again after `retry_after`.
    Wait {
        /// How long the coordinator asks the device to wait.
        retry_after: Duration,
        /// Why.
        reason: String,
    },
}

/// What an upload achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Stored now.
    Stored {
        /// The coordinator's id of the update.
        update_id: u64,
        /// The round it was stored for.
        round_id: u64,
    },
    /// An earlier attempt whose answer was lost had stored it.
    AlreadyStored,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| AgentError::io(path, e))
}

impl CoordinatorClient {
    /// A lazily connected channel to `url` with the TLS, time limits and backoff of `cfg`.
    ///
    /// TLS applies to `https://` URLs: the CA is `cfg.tls.ca_cert`, else the one pinned at
    /// enrolment in `state_dir/ca.pem`; `client_cert` / `client_key` add mutual TLS.
    /// Nothing is connected until the first call, so an unreachable coordinator shows up
    /// as a transient `Unavailable` that the run loop retries. Call it inside a Tokio
    /// runtime (the channel's worker task is spawned on it).
    pub fn connect(url: &str, cfg: &AgentConfig) -> Result<Self> {
        let transport = |source| AgentError::Transport { url: url.to_owned(), source: Box::new(source) };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(transport)?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            // Pings while a call is in flight find a dead (half-open) connection within
            // about two request timeouts (at most 50 s), and the channel reconnects; idle
            // connections are not pinged (a phone's radio stays asleep).
            .http2_keep_alive_interval(cfg.request_timeout.min(Duration::from_secs(30)))
            .keep_alive_timeout(cfg.request_timeout.min(Duration::from_secs(20)))
            .keep_alive_while_idle(false);
        let tls = &cfg.tls;
        if url.starts_with("https://") {
            let pinned = cfg.state_dir.join(CA_FILE);
            let ca = tls.ca_cert.clone().or_else(|| pinned.exists().then_some(pinned));
            let Some(ca) = ca else {
                return Err(AgentError::config(
                    "tls.ca-cert",
                    format!("{url} needs the CA certificate of the coordinator (no system roots are built in)"),
                ));
            };
            let mut tls_config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&ca)?));
            if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
                tls_config = tls_config.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &tls.domain_name {
                tls_config = tls_config.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls_config).map_err(transport)?;
        } else if tls.is_configured() {
            return Err(AgentError::config("tls", format!("TLS settings are given but {url} is not https://")));
        }
        let client = FleetClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { client, url: url.to_owned(), backoff: cfg.backoff.clone(), request_timeout: cfg.request_timeout })
    }

    /// The URL this client talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The retry settings.
    pub fn backoff(&self) -> &BackoffConfig {
        &self.backoff
    }

    /// One unary call with the time limit, mapping failures to [`AgentError::Rpc`].
    async fn unary<T>(
        &self,
        method: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(AgentError::rpc(method, &status)),
            Err(_) => Err(AgentError::Rpc {
                method,
                code: tonic::Code::DeadlineExceeded,
                message: format!("no answer within {:?}", self.request_timeout),
            }),
        }
    }

    /// `Enroll`: register `public_key` with an enrolment token. Returns the device id and
    /// the coordinator's public key, both checked for length.
    pub async fn enroll(&self, public_key: [u8; 32], token: &str, label: &str) -> Result<([u8; 32], [u8; 32])> {
        let resp = retry("Enroll", &self.backoff, |_| {
            let mut c = self.client.clone();
            let req = pb::EnrollRequest {
                public_key: public_key.to_vec(),
                enrollment_token: token.to_owned(),
                label: label.to_owned(),
            };
            async move { self.unary("Enroll", c.enroll(req)).await }
        })
        .await?;
        let malformed = |field, reason: String| AgentError::Malformed { method: "Enroll", field, reason };
        let device_id: [u8; 32] = covey_proto::signing::fixed("device_id", &resp.device_id)
            .map_err(|e| malformed("device_id", e.to_string()))?;
        let coordinator_key: [u8; 32] =
            covey_proto::signing::fixed("coordinator_public_key", &resp.coordinator_public_key)
                .map_err(|e| malformed("coordinator_public_key", e.to_string()))?;
        if device_id != covey_proto::keys::device_id(&public_key) {
            return Err(malformed("device_id", "is not the SHA-256 of this device's public key".into()));
        }
        Ok((device_id, coordinator_key))
    }

    /// `PollTask`, signed with the device key (a fresh timestamp on every attempt), saying
    /// the largest LoRA rank this device trains (`max_rank`, 0: any; signed).
    pub async fn poll(&self, identity: &Identity, max_rank: u32) -> Result<PollReply> {
        let resp = retry("PollTask", &self.backoff, |_| {
            let mut c = self.client.clone();
            let subject = if max_rank == 0 { Vec::new() } else { max_rank.to_be_bytes().to_vec() };
            let auth = identity.auth(DeviceMethod::Poll, &subject);
            async move { self.unary("PollTask", c.poll_task(pb::PollTaskRequest { auth: Some(auth), max_rank })).await }
        })
        .await?;
        match resp.outcome {
            Some(poll_task_response::Outcome::Task(t)) => Ok(PollReply::Task(Box::new(t))),
            Some(poll_task_response::Outcome::Wait(w)) => {
                Ok(PollReply::Wait { retry_after: Duration::from_millis(w.retry_after_ms), reason: w.reason })
            }
            None => Err(AgentError::Malformed {
                method: "PollTask",
                field: "outcome",
                reason: "neither a task nor a wait".into(),
            }),
        }
    }

    /// `DeclineTask`, signed by the device (subject: the task id): the device will not
    /// train this task, for `reason`.
    pub async fn decline(&self, identity: &Identity, task_id: &[u8; 16], reason: &str) -> Result<()> {
        retry("DeclineTask", &self.backoff, |_| {
            let mut c = self.client.clone();
            let auth = identity.auth(DeviceMethod::DeclineTask, task_id);
            let req = pb::DeclineTaskRequest { auth: Some(auth), task_id: task_id.to_vec(), reason: reason.into() };
            async move { self.unary("DeclineTask", c.decline_task(req)).await }
        })
        .await
        .map(|_| ())
    }

    /// `GetManifest`, signed by the device: the signed manifest bytes and signature of
    /// `version` (unverified).
    pub async fn get_manifest(&self, identity: &Identity, version: u64) -> Result<pb::SignedManifest> {
        retry("GetManifest", &self.backoff, |_| {
            let mut c = self.client.clone();
            let auth = identity.auth(DeviceMethod::GetManifest, &version.to_be_bytes());
            let req = pb::GetManifestRequest { version, auth: Some(auth) };
            async move { self.unary("GetManifest", c.get_manifest(req)).await }
        })
        .await
    }

    /// `FetchArtifact`, signed by the device: the whole artifact named by `sha256`,
    /// reassembled from its chunks in memory.
    /// An interrupted download resumes at the offset reached. The result is checked: every
    /// chunk at the expected offset, the announced size constant, at most `max_bytes`,
    /// equal to `expected_size` when given, and the SHA-256 equal to the one requested.
    pub async fn fetch_artifact(
        &self,
        identity: &Identity,
        sha256: &[u8; 32],
        expected_size: Option<u64>,
        max_bytes: u64,
    ) -> Result<Vec<u8>> {
        let name = hex::encode(sha256);
        let mismatch = |reason: String| AgentError::ArtifactMismatch { sha256: name.clone(), reason };
        let mut buf: Vec<u8> = Vec::new();
        let total = self.fetch_into(identity, sha256, &mut buf, expected_size, max_bytes).await?;
        if buf.len() as u64 != total {
            return Err(mismatch(format!("stream ended at {} of {total} bytes", buf.len())));
        }
        let got = covey_proto::keys::sha256(&buf);
        if &got != sha256 {
            return Err(mismatch(format!("downloaded bytes hash to {}", hex::encode(got))));
        }
        Ok(buf)
    }

    /// `FetchArtifact` of a manifest's artifact into the partial file `partial`, piece by
    /// piece ([`PieceWriter`]): resumes after the pieces a previous attempt (or process)
    /// verified, checks every piece against the manifest, then the whole file. Returns the
    /// completed file's path and the bytes received from the network.
    pub async fn download(
        &self,
        identity: &Identity,
        artifact: &ArtifactRef,
        partial: &Path,
        max_bytes: u64,
    ) -> Result<(std::path::PathBuf, u64)> {
        let sha256 = artifact
            .sha256_bytes()
            .map_err(|e| AgentError::ArtifactMismatch { sha256: artifact.sha256.clone(), reason: e.to_string() })?;
        if artifact.size > max_bytes {
            return Err(AgentError::ArtifactMismatch {
                sha256: artifact.sha256.clone(),
                reason: format!("{} bytes exceed the limit of {max_bytes}", artifact.size),
            });
        }
        let mut writer = PieceWriter::resume(artifact, partial)?;
        if writer.verified() < artifact.size {
            self.fetch_into(identity, &sha256, &mut writer, Some(artifact.size), max_bytes).await?;
        }
        let received = writer.received();
        Ok((writer.finish()?, received))
    }

    /// Stream `sha256` into `sink` from the offset it has reached, resuming there after
    /// transient failures; returns the artifact's announced size.
    async fn fetch_into(
        &self,
        identity: &Identity,
        sha256: &[u8; 32],
        sink: &mut dyn Sink,
        expected_size: Option<u64>,
        max_bytes: u64,
    ) -> Result<u64> {
        let name = hex::encode(sha256);
        let mismatch = |reason: String| AgentError::ArtifactMismatch { sha256: name.clone(), reason };
        let backoff = Backoff::from(&self.backoff);
        let mut total: Option<u64> = None;
        let mut attempt = 0u32;
        loop {
            let result = self.fetch_from(identity, sha256, sink, &mut total, expected_size, max_bytes, &mismatch).await;
            match result {
                Ok(()) => break,
                Err(e)
                    if e.is_transient()
                        && (self.backoff.max_attempts == 0 || attempt + 1 < self.backoff.max_attempts) =>
                {
                    let delay = backoff.delay(attempt);
                    tracing::warn!(artifact = %name, offset = sink.offset(), attempt, error = %e, "download interrupted, resuming");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        let total = total.unwrap_or(0);
        if let Some(size) = expected_size
            && size != total
        {
            return Err(mismatch(format!("{total} bytes, the manifest says {size}")));
        }
        Ok(total)
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_from(
        &self,
        identity: &Identity,
        sha256: &[u8; 32],
        sink: &mut dyn Sink,
        total: &mut Option<u64>,
        expected_size: Option<u64>,
        max_bytes: u64,
        mismatch: &impl Fn(String) -> AgentError,
    ) -> Result<()> {
        let mut c = self.client.clone();
        let auth = identity.auth(DeviceMethod::FetchArtifact, sha256);
        let req = pb::FetchArtifactRequest { sha256: sha256.to_vec(), offset: sink.offset(), auth: Some(auth) };
        let mut stream = self.unary("FetchArtifact", c.fetch_artifact(req)).await?;
        loop {
            let next = tokio::time::timeout(self.request_timeout, stream.message()).await;
            let chunk = match next {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(status)) => return Err(AgentError::rpc("FetchArtifact", &status)),
                Err(_) => {
                    return Err(AgentError::Rpc {
                        method: "FetchArtifact",
                        code: tonic::Code::DeadlineExceeded,
                        message: format!("no chunk within {:?}", self.request_timeout),
                    });
                }
            };
            match *total {
                None => {
                    if chunk.total_size > max_bytes {
                        return Err(mismatch(format!("{} bytes exceed the limit of {max_bytes}", chunk.total_size)));
                    }
                    if let Some(size) = expected_size
                        && size != chunk.total_size
                    {
                        return Err(mismatch(format!(
                            "{} bytes announced, the manifest says {size}",
                            chunk.total_size
                        )));
                    }
                    *total = Some(chunk.total_size);
                }
                Some(t) if t != chunk.total_size => {
                    return Err(mismatch(format!("announced size changed from {t} to {}", chunk.total_size)));
                }
                Some(_) => {}
            }
            if chunk.offset != sink.offset() {
                return Err(mismatch(format!("chunk at offset {}, expected {}", chunk.offset, sink.offset())));
            }
            if chunk.data.len() > CHUNK_BYTES || sink.offset() + chunk.data.len() as u64 > chunk.total_size {
                return Err(mismatch(format!(
                    "chunk of {} bytes at {} overruns the artifact",
                    chunk.data.len(),
                    chunk.offset
                )));
            }
            sink.accept(&chunk.data)?;
        }
    }

    /// `SubmitUpdate`: stream the signed header, then the payload in chunks of at most
    /// [`CHUNK_BYTES`]. The same bytes are sent on every retry.
    ///
    /// `AlreadyExists` after an attempt that failed in transit means that attempt was
    /// stored (its acknowledgement was lost): [`SubmitOutcome::AlreadyStored`].
    pub async fn submit(&self, update: &SignedUpdate) -> Result<SubmitOutcome> {
        let chunks = 1 + update.payload().len().div_ceil(CHUNK_BYTES);
        let limit = self.request_timeout.saturating_mul(chunks as u32);
        retry("SubmitUpdate", &self.backoff, |attempt| {
            let mut c = self.client.clone();
            let mut messages = Vec::with_capacity(chunks);
            messages.push(pb::UpdateChunk {
                part: Some(update_chunk::Part::Header(pb::UpdateHeader {
                    signed_header: update.header_bytes().to_vec(),
                    signature: update.signature().to_vec(),
                    train_loss: update.train_loss(),
                })),
            });
            messages.extend(
                update
                    .payload()
                    .chunks(CHUNK_BYTES)
                    .map(|d| pb::UpdateChunk { part: Some(update_chunk::Part::Data(d.to_vec())) }),
            );
            async move {
                match tokio::time::timeout(limit, c.submit_update(tokio_stream::iter(messages))).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        Ok(SubmitOutcome::Stored { update_id: r.update_id, round_id: r.round_id })
                    }
                    Ok(Err(status)) if attempt > 0 && status.code() == tonic::Code::AlreadyExists => {
                        tracing::warn!(message = status.message(), "an earlier attempt of this upload was stored");
                        Ok(SubmitOutcome::AlreadyStored)
                    }
                    Ok(Err(status)) => Err(AgentError::rpc("SubmitUpdate", &status)),
                    Err(_) => Err(AgentError::Rpc {
                        method: "SubmitUpdate",
                        code: tonic::Code::DeadlineExceeded,
                        message: format!("no answer within {limit:?}"),
                    }),
                }
            }
        })
        .await
    }
}
