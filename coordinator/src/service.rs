//! The tonic services: `covey.v1.Fleet` for devices and `covey.v1.Admin` for operators.
//! They convert protobuf messages at the edge and map errors to statuses; the behaviour
//! is in [`crate::engine`].

use std::pin::Pin;
use std::sync::Arc;

use covey_proto::pb::{self, admin_server::Admin, fleet_server::Fleet};
use covey_proto::{CHUNK_BYTES, signing};
use tokio::sync::Semaphore;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::Artifacts;
use crate::engine::{Coordinator, PollOutcome, SignedTask};
use crate::error::{CoordinatorError, Rejection};
use crate::store::RoundRecord;

/// `covey.v1.Fleet`.
#[derive(Debug, Clone)]
pub struct FleetService {
    engine: Arc<Coordinator>,
    uploads: Arc<Semaphore>,
}

impl FleetService {
    /// Over `engine`, with at most `limits.max-concurrent-uploads` uploads at once.
    pub fn new(engine: Arc<Coordinator>) -> Self {
        let uploads = Arc::new(Semaphore::new(engine.config().limits.max_concurrent_uploads));
        Self { engine, uploads }
    }
}

fn auth(a: Option<pb::DeviceAuth>) -> Result<pb::DeviceAuth, Status> {
    a.ok_or_else(|| Status::invalid_argument("auth is missing"))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;

/// The protobuf task of a signed task.
pub fn task_message(t: &SignedTask) -> pb::Task {
    t.task.to_message(&t.signature)
}

/// Stream `hash` from `artifacts` in chunks from `offset`, reading on a blocking thread a
/// chunk ahead of the network (memory stays a few chunks whatever the size). A full
/// download is re-hashed on the way; bytes that no longer match end the stream with
/// `DATA_LOSS`.
fn stream_artifact(artifacts: Artifacts, hash: [u8; 32], offset: u64, total: u64) -> ChunkStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ArtifactChunk, Status>>(2);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let send = |item| tx.blocking_send(item).is_ok();
        let mut reader = match artifacts.reader(&hash, offset) {
            Ok(r) => r,
            Err(e) => {
                send(Err(Status::from(&e)));
                return;
            }
        };
        let mut digest = (offset == 0).then(covey_proto::keys::Sha256::default);
        let mut at = offset;
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < buf.len() {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!(error = %e, "reading an artifact to stream it");
                        send(Err(Status::internal("internal error (see the coordinator's log)")));
                        return;
                    }
                }
            }
            buf.truncate(filled);
            if let Some(d) = digest.as_mut() {
                d.update(&buf);
            }
            let last = at + filled as u64 >= total || filled == 0;
            if last
                && let Some(d) = digest.take()
                && d.finish() != hash
            {
                tracing::error!(artifact = %hex::encode(hash), "artifact damaged on disk; download refused");
                send(Err(Status::data_loss("the artifact is damaged on the coordinator")));
                return;
            }
            if !send(Ok(pb::ArtifactChunk { offset: at, data: buf, total_size: total })) || last {
                return;
            }
            at += filled as u64;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = request.into_inner();
        let id = self.engine.enroll(&r.public_key, &r.enrollment_token, &r.label).await.map_err(status)?;
        Ok(Response::new(pb::EnrollResponse {
            device_id: id.to_vec(),
            coordinator_public_key: self.engine.public_key().to_vec(),
        }))
    }

    async fn poll_task(&self, request: Request<pb::PollTaskRequest>) -> Result<Response<pb::PollTaskResponse>, Status> {
        let r = request.into_inner();
        let a = auth(r.auth)?;
        let polled = self.engine.poll_with_rank(&a.device_id, a.timestamp_ms, &a.signature, r.max_rank).await;
        let outcome = match polled.map_err(status)? {
            PollOutcome::Wait { retry_after, reason } => pb::poll_task_response::Outcome::Wait(pb::Wait {
                retry_after_ms: retry_after.as_millis() as u64,
                reason,
            }),
            PollOutcome::Task(t) => pb::poll_task_response::Outcome::Task(task_message(&t)),
        };
        Ok(Response::new(pb::PollTaskResponse { outcome: Some(outcome) }))
    }

    async fn decline_task(
        &self,
        request: Request<pb::DeclineTaskRequest>,
    ) -> Result<Response<pb::DeclineTaskResponse>, Status> {
        let r = request.into_inner();
        let task_id: [u8; 16] =
            signing::fixed("task_id", &r.task_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let a = auth(r.auth)?;
        self.engine.decline(&a.device_id, a.timestamp_ms, &a.signature, &task_id, &r.reason).await.map_err(status)?;
        Ok(Response::new(pb::DeclineTaskResponse {}))
    }

    async fn get_manifest(
        &self,
        request: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::SignedManifest>, Status> {
        let r = request.into_inner();
        let a = auth(r.auth)?;
        let v = r.version;
        let record = self.engine.manifest(v, &a.device_id, a.timestamp_ms, &a.signature).await.map_err(status)?;
        let record = record.ok_or_else(|| Status::not_found(format!("version {v} does not exist")))?;
        Ok(Response::new(pb::SignedManifest { manifest: record.manifest, signature: record.signature }))
    }

    type FetchArtifactStream = ChunkStream;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let r = request.into_inner();
        let hash: [u8; 32] =
            signing::fixed("sha256", &r.sha256).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let a = auth(r.auth)?;
        self.engine.authorize_fetch(&hash, &a.device_id, a.timestamp_ms, &a.signature).await.map_err(status)?;
        let artifacts = self.engine.artifacts().clone();
        let total = artifacts.size(&hash).map_err(|e| Status::from(&e))?;
        if r.offset > total {
            return Err(Status::out_of_range(format!("offset {} is past the artifact's {total} bytes", r.offset)));
        }
        self.engine.metrics().bytes_sent.inc_by(total - r.offset);
        if r.offset > 0 {
            self.engine.metrics().downloads_resumed.inc();
        }
        Ok(Response::new(stream_artifact(artifacts, hash, r.offset, total)))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let refuse = |r: Rejection| Err(status(self.engine.reject(r)));
        // Before a byte of the stream is read.
        let Ok(_slot) = self.uploads.clone().try_acquire_owned() else { return refuse(Rejection::Busy) };
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UpdateChunk { part: Some(pb::update_chunk::Part::Header(h)) })) => h,
            Some(Ok(_)) | None => return refuse(Rejection::MalformedStream("the first message must be the header")),
            Some(Err(status)) => return Err(status),
        };
        // The signed header is verified before any payload byte is read.
        let permit = self.engine.begin_upload(&header.signed_header, &header.signature).await.map_err(status)?;
        let declared = permit.payload_len();
        let mut pending = self.engine.uploads().pending().map_err(|e| Status::from(&e))?;
        while let Some(chunk) = stream.next().await {
            match chunk?.part {
                Some(pb::update_chunk::Part::Data(d)) => {
                    if pending.len() + d.len() as u64 > declared {
                        return refuse(Rejection::LengthMismatch {
                            expected: declared,
                            found: pending.len() + d.len() as u64,
                        });
                    }
                    pending.write(&d).map_err(|e| Status::from(&e))?;
                }
                Some(pb::update_chunk::Part::Header(_)) => {
                    return refuse(Rejection::MalformedStream("a second header"));
                }
                None => return refuse(Rejection::MalformedStream("an empty chunk")),
            }
        }
        let (update_id, round_id) =
            self.engine.finish_upload(permit, pending, header.train_loss).await.map_err(status)?;
        Ok(Response::new(pb::SubmitUpdateResponse { update_id, round_id }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let a = auth(request.into_inner().auth)?;
        let current_version =
            self.engine.heartbeat(&a.device_id, a.timestamp_ms, &a.signature).await.map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse { server_time_ms: self.engine.now_ms(), current_version }))
    }
}

/// `covey.v1.Admin`; install it behind [`admin_interceptor`].
#[derive(Debug, Clone)]
pub struct AdminService {
    engine: Arc<Coordinator>,
}

impl AdminService {
    /// Over `engine`.
    pub fn new(engine: Arc<Coordinator>) -> Self {
        Self { engine }
    }
}

/// Checks `authorization: Bearer <token>`; an empty token disables the service. Wrong
/// tokens are rate-limited: after 10 in a minute, every admin request is refused with
/// `RESOURCE_EXHAUSTED` until the minute has passed.
pub fn admin_interceptor(token: String) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    let failures = Arc::new(governor::RateLimiter::direct(governor::Quota::per_minute(
        std::num::NonZeroU32::new(10).unwrap_or(std::num::NonZeroU32::MIN),
    )));
    move |req: Request<()>| {
        if token.is_empty() {
            return Err(Status::permission_denied("the admin service is disabled (no admin token configured)"));
        }
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let expected = format!("Bearer {token}");
        let same = covey_proto::keys::constant_time_eq(given.as_bytes(), expected.as_bytes());
        if same {
            return Ok(req);
        }
        if failures.check().is_err() {
            return Err(Status::resource_exhausted("too many wrong admin tokens; retry in a minute"));
        }
        Err(Status::unauthenticated("missing or wrong admin token"))
    }
}

fn round_info(r: &RoundRecord, updates: u64, declined: u64) -> pb::RoundInfo {
    pb::RoundInfo {
        round_id: r.id,
        state: r.state.as_str().into(),
        base_version: r.base_version,
        published_version: r.published_version,
        cohort_size: r.cohort_size,
        updates,
        min_updates: r.min_updates,
        deadline_unix_ms: r.deadline_ms,
        failure: r.failure.clone(),
        declined,
    }
}

/// The status of an engine error: a refusal's own code, an operator error's, or
/// `INTERNAL` (details stay in the coordinator's log).
fn status(e: CoordinatorError) -> Status {
    Status::from(&e)
}

fn internal(e: CoordinatorError) -> Status {
    status(e)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let store = self.engine.store();
        let devices = store.devices().await.map_err(internal)?;
        let rounds = store.rounds(usize::MAX >> 1).await.map_err(internal)?;
        let open_round = match store.active_round().await.map_err(internal)? {
            Some(r) => Some(round_info(
                &r,
                store.update_count(r.id).await.map_err(internal)?,
                store.declined_count(r.id).await.map_err(internal)?,
            )),
            None => None,
        };
        let privacy = self.engine.privacy().await.map_err(internal)?;
        Ok(Response::new(pb::StatusResponse {
            current_version: store.current_version().await.map_err(internal)?,
            latest_version: store.versions().await.map_err(internal)?.first().map_or(0, |v| v.version),
            active_devices: devices.iter().filter(|d| !d.revoked).count() as u64,
            revoked_devices: devices.iter().filter(|d| d.revoked).count() as u64,
            open_round,
            published_rounds: rounds.iter().filter(|r| r.state == crate::store::RoundState::Published).count() as u64,
            epsilon: privacy.epsilon,
            delta: privacy.delta,
            coordinator_public_key: hex::encode(self.engine.public_key()),
            privacy: Some(pb::PrivacyReport {
                accountant: privacy.accountant,
                mechanism: privacy.mechanism,
                assumption: privacy.assumption,
                max_participations: privacy.max_participations,
                min_separation: privacy.min_separation,
                epsilon_bound: privacy.epsilon_bound,
                max_contributions: self.engine.max_contributions().await.map_err(internal)?,
            }),
        }))
    }

    async fn list_rounds(
        &self,
        request: Request<pb::ListRoundsRequest>,
    ) -> Result<Response<pb::ListRoundsResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 100,
            n => n as usize,
        };
        let store = self.engine.store();
        let mut rounds = Vec::new();
        for r in store.rounds(limit).await.map_err(internal)? {
            let n = store.update_count(r.id).await.map_err(internal)?;
            let declined = store.declined_count(r.id).await.map_err(internal)?;
            rounds.push(round_info(&r, n, declined));
        }
        Ok(Response::new(pb::ListRoundsResponse { rounds }))
    }

    async fn list_versions(
        &self,
        _: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let store = self.engine.store();
        let current = store.current_version().await.map_err(internal)?;
        let mut versions = Vec::new();
        for v in store.versions().await.map_err(internal)? {
            let m: covey_proto::manifest::Manifest = serde_json::from_slice(&v.manifest)
                .map_err(|e| internal(CoordinatorError::Corrupt(format!("manifest of version {}: {e}", v.version))))?;
            let (adapter_rounds, download_bytes) = match &m.adapter {
                Some(a) => (a.rounds, a.b.size),
                None => (0, m.release.model.size),
            };
            versions.push(pb::VersionInfo {
                version: v.version,
                parent: v.parent,
                round_id: v.round_id,
                manifest_sha256: hex::encode(v.manifest_sha256),
                current: v.version == current,
                epsilon: v.epsilon,
                created_unix_ms: v.created_ms,
                release_version: m.release.version,
                adapter_rounds,
                download_bytes,
            });
        }
        Ok(Response::new(pb::ListVersionsResponse { versions }))
    }

    async fn list_devices(
        &self,
        _: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let store = self.engine.store();
        let mut devices = Vec::new();
        for d in store.devices().await.map_err(internal)? {
            devices.push(pb::DeviceInfo {
                device_id: hex::encode(d.id),
                label: d.label.clone(),
                enrolled_unix_ms: d.enrolled_ms,
                last_seen_unix_ms: d.last_seen_ms,
                revoked: d.revoked,
                updates: store.device_update_count(&d.id).await.map_err(internal)?,
            });
        }
        Ok(Response::new(pb::ListDevicesResponse { devices }))
    }

    async fn revoke_device(
        &self,
        request: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::RevokeDeviceResponse>, Status> {
        let hex_id = request.into_inner().device_id;
        let bytes = hex::decode(&hex_id).map_err(|_| Status::invalid_argument("device_id is not hex"))?;
        let id: [u8; 32] = signing::fixed("device_id", &bytes).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.engine.store().device(&id).await.map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("no device {hex_id}")));
        }
        let outcome = self.engine.revoke(&id).await.map_err(internal)?;
        Ok(Response::new(pb::RevokeDeviceResponse { changed: outcome.changed, token_burned: outcome.token_burned }))
    }

    async fn promote(&self, request: Request<pb::PromoteRequest>) -> Result<Response<pb::PromoteResponse>, Status> {
        let (current_version, failed) =
            self.engine.promote_by_operator(request.into_inner().version).await.map_err(status)?;
        Ok(Response::new(pb::PromoteResponse { current_version, failed_round: failed.unwrap_or(0) }))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::PromoteResponse>, Status> {
        let (current_version, failed) = self.engine.rollback(request.into_inner().version).await.map_err(status)?;
        Ok(Response::new(pb::PromoteResponse { current_version, failed_round: failed.unwrap_or(0) }))
    }

    async fn cut_release(
        &self,
        request: Request<pb::CutReleaseRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let version = match request.into_inner().version {
            0 => self.engine.store().current_version().await.map_err(status)?,
            v => v,
        };
        let (current_version, failed) = self.engine.cut_release(version).await.map_err(status)?;
        Ok(Response::new(pb::PromoteResponse { current_version, failed_round: failed.unwrap_or(0) }))
    }

    async fn fail_round(
        &self,
        request: Request<pb::FailRoundRequest>,
    ) -> Result<Response<pb::FailRoundResponse>, Status> {
        let r = request.into_inner();
        let previous = self.engine.fail_round(r.round_id, &r.reason).await.map_err(internal)?;
        Ok(Response::new(pb::FailRoundResponse { previous_state: previous.as_str().into() }))
    }

    async fn mint_enrollment_token(
        &self,
        request: Request<pb::MintEnrollmentTokenRequest>,
    ) -> Result<Response<pb::MintEnrollmentTokenResponse>, Status> {
        let r = request.into_inner();
        let ttl = match r.ttl_seconds {
            0 => std::time::Duration::from_secs(24 * 3600),
            s => std::time::Duration::from_secs(s),
        };
        let (token, expires_unix_ms) = self.engine.mint_token(r.uses, ttl, &r.label).await.map_err(internal)?;
        Ok(Response::new(pb::MintEnrollmentTokenResponse { token, expires_unix_ms }))
    }
}
