//! The agent against an in-process mock coordinator over loopback gRPC: enrolment, tasks,
//! verified downloads (with an interrupted one), training, clipping, signed uploads (with a
//! lost acknowledgement), refusal of untrusted models, permanent rejections, and resuming
//! after a shutdown in the middle of training.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covey_agent::{AgentConfig, AgentError, BackoffConfig, RunUntil};
use covey_model::{LlamaConfig, LoraConfig, LoraTarget, NamedTensors};
use covey_proto::keys::{self, KeyPair};
use covey_proto::manifest::{ArtifactRef, LoraLayout, MANIFEST_SCHEMA, Manifest, PrivacySpent, Release, SpecialTokens};
use covey_proto::pb::fleet_server::{Fleet, FleetServer};
use covey_proto::pb::{self, poll_task_response, update_chunk};
use covey_proto::signing::{DeviceMethod, TaskBinding, UpdateHeader, device_request_bytes, device_request_bytes_for};
use tonic::{Request, Response, Status};

const TOKEN: &str = "let-me-in";
/// Small chunks, so that artifacts arrive in many pieces.
const CHUNK: usize = 16 * 1024;

/// One update the mock accepted.
#[derive(Debug, Clone)]
struct Received {
    device: [u8; 32],
    header: UpdateHeader,
    b: NamedTensors,
    /// The payload as it arrived.
    payload: Vec<u8>,
}

#[derive(Default)]
struct Faults {
    /// FetchArtifact calls that break after their first chunk.
    broken_fetches: u32,
    /// Uploads stored whose answer is replaced by `Unavailable`.
    lost_acks: u32,
    /// Uploads refused with `InvalidArgument`.
    rejected_submits: u32,
    /// Serve the model artifact with one byte flipped.
    tamper_model: bool,
    /// Sign tasks with another key than the one given at enrolment.
    forge_task: bool,
    /// GetManifest calls answered `Unavailable` (a transient failure of the task).
    unavailable_manifests: u32,
}

struct State {
    devices: HashMap<[u8; 32], [u8; 32]>,
    tasks: HashMap<[u8; 32], pb::Task>,
    next_round: HashMap<[u8; 32], u64>,
    submitted: HashSet<([u8; 32], u64)>,
    received: Vec<Received>,
    faults: Faults,
    fetches: u32,
    submit_calls: u32,
    /// Tasks declined: (device, task id, reason).
    declines: Vec<([u8; 32], Vec<u8>, String)>,
}

struct Mock {
    key: KeyPair,
    manifest: pb::SignedManifest,
    manifest_hash: [u8; 32],
    artifacts: HashMap<[u8; 32], Vec<u8>>,
    model_sha: [u8; 32],
    a_sha: [u8; 32],
    training: pb::TrainingSpec,
    privacy: pb::PrivacySpec,
    state: Mutex<State>,
}

fn lora() -> LoraConfig {
    LoraConfig { rank: 4, alpha: 8.0, targets: vec![LoraTarget::Q, LoraTarget::V], ffa: true, seed: 3, dropout: 0.0 }
}

fn art(bytes: &[u8], format: &str) -> ArtifactRef {
    ArtifactRef::describe(bytes, format)
}

impl Mock {
    /// A coordinator holding version 1 of a tiny model; with `forge_manifest`, the manifest
    /// is signed by some other key than the one given to devices at enrolment.
    fn new(steps: u32, privacy: pb::PrivacySpec, faults: Faults, forge_manifest: bool) -> Self {
        let key = KeyPair::generate().expect("key");
        let config = LlamaConfig::tiny();
        let base = covey_model::checkpoint::base_tensors(
            &covey_model::Llama::init(&config, 7, &covey_model::cpu_device()).expect("init"),
        );
        let model = covey_tensors::quant::encode_int8(&base, HashMap::new()).expect("int8");
        let config_bytes = serde_json::to_vec(&config).expect("config");
        // The coordinator's generator of the frozen `A` factors.
        let a = covey_tensors::lora::frozen_a(&base, lora().rank, &lora().targets, lora().seed);
        let a = covey_tensors::encode(&a, None).expect("a");
        let manifest = Manifest {
            schema: MANIFEST_SCHEMA,
            version: 1,
            parent: 0,
            round_id: 0,
            release: Release {
                version: 1,
                architecture: "llama".into(),
                model: art(&model, "safetensors-int8"),
                quantization: "int8-per-channel-symmetric".into(),
                config: art(&config_bytes, "llama-config-json"),
                tokenizer: None,
                chat_template: None,
                special_tokens: SpecialTokens::default(),
            },
            lora: LoraLayout {
                rank: lora().rank,
                alpha: lora().alpha as f32,
                targets: vec!["q_proj".into(), "v_proj".into()],
                a: art(&a, "safetensors-f32"),
            },
            adapter: None,
            master_sha256: "00".repeat(32),
            privacy: PrivacySpent::nothing(),
            created_unix_ms: 1,
        };
        let signer = if forge_manifest {
            KeyPair::generate().expect("key")
        } else {
            KeyPair::from_pkcs8(key.pkcs8()).expect("key")
        };
        let (bytes, signature) = manifest.sign(&signer).expect("sign");
        let model_sha = keys::sha256(&model);
        let a_sha = keys::sha256(&a);
        let artifacts = HashMap::from([(model_sha, model), (keys::sha256(&config_bytes), config_bytes), (a_sha, a)]);
        Self {
            key,
            manifest_hash: keys::sha256(&bytes),
            manifest: pb::SignedManifest { manifest: bytes, signature: signature.to_vec() },
            artifacts,
            model_sha,
            a_sha,
            training: pb::TrainingSpec {
                steps,
                batch_size: 2,
                seq_len: 32,
                learning_rate: 0.01,
                proximal_mu: 0.0,
                seed: 1,
                update_encoding: 0,
            },
            privacy,
            state: Mutex::new(State {
                devices: HashMap::new(),
                tasks: HashMap::new(),
                next_round: HashMap::new(),
                submitted: HashSet::new(),
                received: Vec::new(),
                faults,
                fetches: 0,
                submit_calls: 0,
                declines: Vec::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lock")
    }

    fn task_for(&self, device: [u8; 32], st: &mut State) -> pb::Task {
        if let Some(t) = st.tasks.get(&device) {
            return t.clone();
        }
        let round = *st.next_round.entry(device).or_insert(1);
        let t = pb::Task {
            round_id: round,
            task_id: keys::random_bytes::<16>().expect("rng").to_vec(),
            nonce: keys::random_bytes::<32>().expect("rng").to_vec(),
            base_version: 1,
            base_manifest_hash: self.manifest_hash.to_vec(),
            lora: Some(pb::LoraSpec {
                rank: 4,
                alpha: 8.0,
                targets: vec!["q_proj".into(), "v_proj".into()],
                a_factors_sha256: self.a_sha.to_vec(),
            }),
            training: Some(self.training),
            privacy: Some(self.privacy),
            deadline_unix_ms: covey_agent::now_ms() + 600_000,
            max_payload_bytes: 1 << 20,
            signature: Vec::new(),
        };
        let mut t = t;
        let bytes = TaskBinding::of_task(device, &t).and_then(|b| b.to_bytes()).expect("binding");
        let signer = if st.faults.forge_task { KeyPair::generate().expect("key") } else { self.signer() };
        t.signature = signer.sign(&bytes).to_vec();
        st.tasks.insert(device, t.clone());
        t
    }

    fn signer(&self) -> KeyPair {
        KeyPair::from_pkcs8(self.key.pkcs8()).expect("key")
    }
}

impl Mock {
    /// Downloads need a signed request of an enrolled device, as the coordinator's do.
    fn check_auth(&self, auth: Option<&pb::DeviceAuth>, method: DeviceMethod, subject: &[u8]) -> Result<(), Status> {
        let auth = auth.ok_or_else(|| Status::invalid_argument("auth"))?;
        let id: [u8; 32] = auth.device_id.as_slice().try_into().map_err(|_| Status::invalid_argument("id"))?;
        let pk = *self.state().devices.get(&id).ok_or_else(|| Status::unauthenticated("unknown device"))?;
        keys::verify(&pk, &device_request_bytes_for(method, &id, auth.timestamp_ms, subject), &auth.signature)
            .map_err(|_| Status::unauthenticated("bad signature"))
    }
}

/// The gRPC face of a shared [`Mock`].
struct Svc(Arc<Mock>);

impl std::ops::Deref for Svc {
    type Target = Mock;
    fn deref(&self) -> &Mock {
        &self.0
    }
}

#[tonic::async_trait]
impl Fleet for Svc {
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = request.into_inner();
        if r.enrollment_token != TOKEN {
            return Err(Status::permission_denied("bad token"));
        }
        let pk: [u8; 32] = r.public_key.as_slice().try_into().map_err(|_| Status::invalid_argument("key"))?;
        let id = keys::device_id(&pk);
        self.state().devices.insert(id, pk);
        Ok(Response::new(pb::EnrollResponse {
            device_id: id.to_vec(),
            coordinator_public_key: self.key.public_key().to_vec(),
        }))
    }

    async fn poll_task(&self, request: Request<pb::PollTaskRequest>) -> Result<Response<pb::PollTaskResponse>, Status> {
        let auth = request.into_inner().auth.ok_or_else(|| Status::invalid_argument("auth"))?;
        let id: [u8; 32] = auth.device_id.as_slice().try_into().map_err(|_| Status::invalid_argument("id"))?;
        let mut st = self.state();
        let pk = *st.devices.get(&id).ok_or_else(|| Status::unauthenticated("unknown device"))?;
        keys::verify(&pk, &device_request_bytes(DeviceMethod::Poll, &id, auth.timestamp_ms), &auth.signature)
            .map_err(|_| Status::unauthenticated("bad signature"))?;
        if st.declines.iter().any(|(d, _, _)| d == &id) {
            let wait = pb::Wait { retry_after_ms: 50, reason: "declined".into() };
            return Ok(Response::new(pb::PollTaskResponse { outcome: Some(poll_task_response::Outcome::Wait(wait)) }));
        }
        let task = self.task_for(id, &mut st);
        Ok(Response::new(pb::PollTaskResponse { outcome: Some(poll_task_response::Outcome::Task(task)) }))
    }

    async fn get_manifest(
        &self,
        request: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::SignedManifest>, Status> {
        let r = request.into_inner();
        self.check_auth(r.auth.as_ref(), DeviceMethod::GetManifest, &r.version.to_be_bytes())?;
        {
            let mut st = self.state();
            if st.faults.unavailable_manifests > 0 {
                st.faults.unavailable_manifests -= 1;
                return Err(Status::unavailable("coordinator restarting"));
            }
        }
        match r.version {
            0 | 1 => Ok(Response::new(self.manifest.clone())),
            v => Err(Status::not_found(format!("no version {v}"))),
        }
    }

    type FetchArtifactStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::ArtifactChunk, Status>>>;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let r = request.into_inner();
        let sha: [u8; 32] = r.sha256.as_slice().try_into().map_err(|_| Status::invalid_argument("sha"))?;
        self.check_auth(r.auth.as_ref(), DeviceMethod::FetchArtifact, &sha)?;
        let mut bytes = self.artifacts.get(&sha).ok_or_else(|| Status::not_found("artifact"))?.clone();
        let mut st = self.state();
        st.fetches += 1;
        if st.faults.tamper_model && sha == self.model_sha {
            bytes[200] ^= 0x40;
        }
        let total = bytes.len() as u64;
        let mut out = Vec::new();
        let mut offset = usize::try_from(r.offset).map_err(|_| Status::out_of_range("offset"))?;
        while offset < bytes.len() {
            let end = (offset + CHUNK).min(bytes.len());
            out.push(Ok(pb::ArtifactChunk {
                offset: offset as u64,
                data: bytes[offset..end].to_vec(),
                total_size: total,
            }));
            offset = end;
        }
        if st.faults.broken_fetches > 0 && out.len() > 1 {
            st.faults.broken_fetches -= 1;
            out.truncate(1);
            out.push(Err(Status::unavailable("connection reset")));
        }
        Ok(Response::new(tokio_stream::iter(out)))
    }

    async fn submit_update(
        &self,
        request: Request<tonic::Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let mut stream = request.into_inner();
        let Some(pb::UpdateChunk { part: Some(update_chunk::Part::Header(h)) }) = stream.message().await? else {
            return Err(Status::invalid_argument("the first message must be the header"));
        };
        let mut payload = Vec::new();
        while let Some(chunk) = stream.message().await? {
            match chunk.part {
                Some(update_chunk::Part::Data(d)) => payload.extend_from_slice(&d),
                _ => return Err(Status::invalid_argument("a second header")),
            }
        }
        let header = UpdateHeader::parse(&h.signed_header).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut st = self.state();
        st.submit_calls += 1;
        if st.faults.rejected_submits > 0 {
            st.faults.rejected_submits -= 1;
            return Err(Status::invalid_argument("rejected by the test"));
        }
        let pk = *st.devices.get(&header.device_id).ok_or_else(|| Status::unauthenticated("unknown device"))?;
        keys::verify(&pk, &h.signed_header, &h.signature).map_err(|_| Status::unauthenticated("bad signature"))?;
        if st.submitted.contains(&(header.device_id, header.round_id)) {
            return Err(Status::already_exists("already submitted"));
        }
        let task = st.tasks.get(&header.device_id).cloned().ok_or_else(|| Status::failed_precondition("no task"))?;
        let bound = header.task_id[..] == task.task_id[..]
            && header.nonce[..] == task.nonce[..]
            && header.round_id == task.round_id
            && header.base_manifest_hash == self.manifest_hash
            && header.payload_len == payload.len() as u64
            && header.payload_sha256 == keys::sha256(&payload)
            && header.clip_norm == self.privacy.clip_norm
            && header.noise_multiplier == self.privacy.noise_multiplier;
        if !bound {
            return Err(Status::invalid_argument("header does not match the task"));
        }
        let (b, _) = covey_tensors::decode(&payload).map_err(|e| Status::invalid_argument(e.to_string()))?;
        st.submitted.insert((header.device_id, header.round_id));
        st.tasks.remove(&header.device_id);
        *st.next_round.entry(header.device_id).or_insert(1) += 1;
        let round_id = header.round_id;
        st.received.push(Received { device: header.device_id, header, b, payload });
        let update_id = st.received.len() as u64;
        if st.faults.lost_acks > 0 {
            st.faults.lost_acks -= 1;
            return Err(Status::unavailable("the answer got lost"));
        }
        Ok(Response::new(pb::SubmitUpdateResponse { update_id, round_id }))
    }

    async fn decline_task(
        &self,
        request: Request<pb::DeclineTaskRequest>,
    ) -> Result<Response<pb::DeclineTaskResponse>, Status> {
        let r = request.into_inner();
        self.check_auth(r.auth.as_ref(), DeviceMethod::DeclineTask, &r.task_id)?;
        let id: [u8; 32] = r
            .auth
            .as_ref()
            .map(|a| a.device_id.clone())
            .unwrap_or_default()
            .try_into()
            .map_err(|_| Status::invalid_argument("id"))?;
        self.state().declines.push((id, r.task_id, r.reason));
        Ok(Response::new(pb::DeclineTaskResponse {}))
    }

    async fn heartbeat(&self, _: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(pb::HeartbeatResponse { server_time_ms: covey_agent::now_ms(), current_version: 1 }))
    }
}

async fn serve(mock: Arc<Mock>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(FleetServer::new(Svc(mock)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("serve");
    });
    addr
}

fn corpus(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let text = "Now is the winter of our discontent made glorious summer by this sun of York; \
                and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.\n";
    std::fs::write(data.join("notes.txt"), text.repeat(8)).expect("corpus");
    data
}

fn config(dir: &Path, addr: SocketAddr) -> AgentConfig {
    AgentConfig {
        coordinator: Some(format!("http://{addr}")),
        backoff: BackoffConfig { base: Duration::from_millis(5), cap: Duration::from_millis(50), max_attempts: 6 },
        checkpoint_every: 2,
        ..AgentConfig::new(dir.join("state"), corpus(dir))
    }
}

fn clip(c: f64, z: f64) -> pb::PrivacySpec {
    pb::PrivacySpec { clip_norm: c, noise_multiplier: z }
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(300), f).await.expect("the test took too long")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_trains_and_uploads_clipped_signed_updates_through_faults() {
    let faults = Faults { broken_fetches: 2, lost_acks: 1, ..Faults::default() };
    let mock = Arc::new(Mock::new(4, clip(0.05, 0.0), faults, false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), addr);

    let mut bad = cfg.clone();
    bad.state_dir = dir.path().join("other");
    let err = covey_agent::enroll(&bad, "wrong", "x").await.expect_err("bad token");
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    assert!(!bad.state_dir.join("identity.json").exists());

    let identity = covey_agent::enroll(&cfg, TOKEN, "phone").await.expect("enrol");
    assert_eq!(identity.coordinator_public_key, mock.key.public_key());
    let err = covey_agent::enroll(&cfg, TOKEN, "phone").await.expect_err("enrolled twice");
    assert!(matches!(err, AgentError::AlreadyEnrolled { .. }), "{err}");

    let summary = within(covey_agent::run(cfg.clone(), RunUntil::Updates(2))).await.expect("run");
    assert_eq!(summary.submitted, 2);
    assert_eq!(summary.rounds, vec![1, 2]);
    assert_eq!(summary.last_version, Some(1));

    let st = mock.state();
    assert_eq!(st.faults.broken_fetches, 0, "interrupted downloads were resumed");
    assert_eq!(st.faults.lost_acks, 0);
    assert_eq!(st.received.len(), 2, "the upload whose answer was lost is not sent twice as a new update");
    let config = LlamaConfig::tiny();
    for r in &st.received {
        assert_eq!(r.device, identity.device_id);
        assert_eq!(r.header.within_clip, Some(false), "trained B is larger than C = 0.05");
        assert_eq!(r.header.num_examples, 4 * 2);
        let norm = covey_tensors::global_norm(&r.b);
        assert!(norm <= 0.05 && norm > 0.04, "clipped norm {norm}");
        assert_eq!(r.b.len(), 2 * config.num_hidden_layers);
        for (name, t) in &r.b {
            assert!(name.ends_with("lora_B.weight"), "{name}");
            assert_eq!(t.shape[1], 4, "{name}: [out, r]");
        }
    }
    drop(st);

    let status = covey_agent::status(&cfg.state_dir).expect("status");
    assert_eq!(status.submitted, 2);
    assert_eq!(status.cached_versions, vec![1]);
    assert!(status.pending_tasks.is_empty(), "{:?}", status.pending_tasks);
    let sampling = covey_model::SamplingConfig { max_new_tokens: 5, temperature: 0.0, ..Default::default() };
    let out = covey_agent::generate(&cfg.state_dir, "Now is", &sampling, None).expect("generate");
    assert_eq!(out.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_noise_is_added_and_declared() {
    let mock = Arc::new(Mock::new(2, clip(0.5, 1.0), Faults::default(), false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), addr);
    covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    within(covey_agent::run(cfg, RunUntil::Updates(1))).await.expect("run");
    let st = mock.state();
    let r = &st.received[0];
    assert_eq!((r.header.clip_norm, r.header.noise_multiplier), (0.5, 1.0));
    // Noise of std 0.5 on every coordinate makes the norm far larger than C.
    let n = covey_tensors::num_values(&r.b) as f64;
    let norm = covey_tensors::global_norm(&r.b);
    assert!(norm > 0.5 * n.sqrt() * 0.8, "norm {norm} for {n} values");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_manifest_is_refused_and_nothing_is_cached() {
    let mock = Arc::new(Mock::new(2, clip(1.0, 0.0), Faults::default(), true));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = AgentConfig { max_task_failures: Some(2), ..config(dir.path(), addr) };
    covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    let err = within(covey_agent::run(cfg.clone(), RunUntil::Updates(1))).await.expect_err("refused");
    let AgentError::TooManyFailures { last, .. } = err else { panic!("{err}") };
    assert!(matches!(*last, AgentError::UntrustedModel { version: 1, .. }), "{last}");
    assert!(last.to_string().contains("signature"), "{last}");
    let st = mock.state();
    assert!(st.received.is_empty());
    assert_eq!(st.fetches, 0, "no artifact of an unverified manifest is downloaded");
    assert!(covey_agent::status(&cfg.state_dir).expect("status").cached_versions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_model_is_refused_and_nothing_is_cached() {
    let faults = Faults { tamper_model: true, ..Faults::default() };
    let mock = Arc::new(Mock::new(2, clip(1.0, 0.0), faults, false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = AgentConfig { max_task_failures: Some(2), ..config(dir.path(), addr) };
    covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    let err = within(covey_agent::run(cfg.clone(), RunUntil::Updates(1))).await.expect_err("refused");
    let AgentError::TooManyFailures { last, .. } = err else { panic!("{err}") };
    assert!(matches!(*last, AgentError::ArtifactMismatch { .. }), "{last}");
    assert!(mock.state().received.is_empty());
    assert!(covey_agent::status(&cfg.state_dir).expect("status").cached_versions.is_empty());
    assert!(!cfg.state_dir.join("models").join("v1").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_update_drops_the_task_and_the_agent_polls_again() {
    let faults = Faults { rejected_submits: 1, ..Faults::default() };
    let mock = Arc::new(Mock::new(2, clip(1.0, 0.0), faults, false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), addr);
    covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    let summary = within(covey_agent::run(cfg.clone(), RunUntil::Updates(1))).await.expect("run");
    assert_eq!((summary.submitted, summary.failed_tasks), (1, 1));
    assert_eq!(mock.state().received.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_noised_update_is_not_replaced_by_a_freshly_noised_one() {
    let faults = Faults { rejected_submits: 1, ..Faults::default() };
    let mock = Arc::new(Mock::new(2, clip(1.0, 0.5), faults, false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = AgentConfig { max_task_failures: Some(3), ..config(dir.path(), addr) };
    covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    let err = within(covey_agent::run(cfg, RunUntil::Updates(1))).await.expect_err("the task is offered again");
    let AgentError::TooManyFailures { last, .. } = err else { panic!("{err}") };
    assert!(last.to_string().contains("already left the device"), "{last}");
    let st = mock.state();
    assert_eq!(st.submit_calls, 1, "one noised update of the task was sent, not two");
    assert!(st.received.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_in_the_middle_of_training_resumes_from_the_checkpoint() {
    let mock = Arc::new(Mock::new(60, clip(1.0, 0.0), Faults::default(), false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), addr);
    covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");

    // Stop the agent as soon as a checkpoint exists.
    let checkpoints = cfg.state_dir.join("checkpoint");
    let has_checkpoint = {
        let checkpoints = checkpoints.clone();
        async move {
            loop {
                let found = std::fs::read_dir(&checkpoints)
                    .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.path().join("b.safetensors").exists()))
                    .unwrap_or(false);
                if found {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let first = within(covey_agent::run_with_shutdown(cfg.clone(), RunUntil::Updates(1), has_checkpoint))
        .await
        .expect("first run");
    assert_eq!(first.submitted, 0, "stopped before uploading");
    let task_id = mock.state().tasks.values().next().expect("task").task_id.clone();

    let second = within(covey_agent::run(cfg.clone(), RunUntil::Updates(1))).await.expect("second run");
    assert_eq!(second.submitted, 1);
    let st = mock.state();
    assert_eq!(st.received.len(), 1);
    assert_eq!(st.received[0].header.task_id[..], task_id[..], "the same task was finished");
    drop(st);
    let history = covey_agent::run::read_history(&cfg.state_dir);
    let resumed = history[0].resumed_from_step.expect("training resumed from a checkpoint");
    assert!(resumed >= 2 && resumed.is_multiple_of(2), "resumed at step {resumed}");
}

/// A CA, a server certificate for `localhost` and a client certificate, all PEM.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair as CertKey};
    let ca_key = CertKey::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = CertKey::generate().expect("key");
        let cert =
            CertificateParams::new(vec![name.to_string()]).expect("params").signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    Pki { ca: ca.pem(), server: leaf("localhost"), client: leaf("device-1") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_pinned_ca() {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let pki = pki();
    let mock = Arc::new(Mock::new(2, clip(1.0, 0.0), Faults::default(), false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server.0, &pki.server.1))
        .client_ca_root(Certificate::from_pem(&pki.ca));
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .expect("tls")
        .add_service(FleetServer::new(Svc(mock.clone())));
    tokio::spawn(async move {
        server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)).await.expect("serve");
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let pem = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("pem");
        p
    };
    let mut cfg = config(dir.path(), addr);
    cfg.coordinator = Some(format!("https://127.0.0.1:{}", addr.port()));
    cfg.tls.domain_name = Some("localhost".into());
    cfg.tls.ca_cert = Some(pem("ca.pem", &pki.ca));

    // Without a client certificate the server refuses the handshake.
    let mut anonymous = cfg.clone();
    anonymous.state_dir = dir.path().join("anonymous");
    anonymous.backoff.max_attempts = 2;
    assert!(covey_agent::enroll(&anonymous, TOKEN, "").await.is_err());

    cfg.tls.client_cert = Some(pem("client.pem", &pki.client.0));
    cfg.tls.client_key = Some(pem("client.key", &pki.client.1));
    covey_agent::enroll(&cfg, TOKEN, "tls").await.expect("enrol over mutual TLS");
    assert_eq!(std::fs::read_to_string(cfg.state_dir.join("ca.pem")).expect("pinned"), pki.ca);

    // Later runs find the CA pinned at enrolment.
    let run_cfg =
        AgentConfig { coordinator: None, tls: covey_agent::TlsConfig { ca_cert: None, ..cfg.tls.clone() }, ..cfg };
    let summary = within(covey_agent::run(run_cfg, RunUntil::Updates(1))).await.expect("run over TLS");
    assert_eq!(summary.submitted, 1);
    assert_eq!(mock.state().received.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_not_signed_by_the_coordinator_is_refused_before_any_work() {
    let faults = Faults { forge_task: true, ..Faults::default() };
    let mock = Arc::new(Mock::new(2, clip(1.0, 0.0), faults, false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = AgentConfig { max_task_failures: Some(2), ..config(dir.path(), addr) };
    covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    let err = within(covey_agent::run(cfg, RunUntil::Updates(1))).await.expect_err("refused");
    let AgentError::TooManyFailures { last, .. } = err else { panic!("{err}") };
    assert!(matches!(*last, AgentError::InvalidTask { field: "signature", .. }), "{last}");
    let st = mock.state();
    assert_eq!(st.fetches, 0, "nothing is downloaded for an unsigned task");
    assert!(st.received.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_directory_is_refused() {
    let mock = Arc::new(Mock::new(2, clip(1.0, 0.0), Faults::default(), false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), addr);
    covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    let held = covey_agent::run::StateLock::acquire(&cfg.state_dir).expect("first agent's lock");
    let err = within(covey_agent::run(cfg.clone(), RunUntil::Updates(1))).await.expect_err("locked");
    assert!(matches!(err, AgentError::StateLocked { .. }), "{err}");
    assert!(err.to_string().contains("another agent"), "{err}");
    assert!(mock.state().received.is_empty());
    drop(held);
    within(covey_agent::run(cfg, RunUntil::Updates(1))).await.expect("runs once the lock is free");
}

/// With a budget, a task whose first attempt fails before the update is signed (here the
/// manifest download, beyond its retries) is charged once, when its update is signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_before_signing_charges_nothing() {
    let faults = Faults { unavailable_manifests: 6, ..Faults::default() };
    let mock = Arc::new(Mock::new(2, clip(1.0, 2.0), faults, false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = covey_privacy::Budget { epsilon: 50.0, delta: 1e-5 };
    let cfg = AgentConfig { privacy_budget: Some(budget), ..config(dir.path(), addr) };
    let identity = covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    let summary = within(covey_agent::run(cfg.clone(), RunUntil::Updates(1))).await.expect("run");
    assert_eq!(summary.submitted, 1);
    assert!(summary.polls >= 2, "the first attempt failed and the task was polled again");
    let ledger =
        covey_privacy::BudgetLedger::open(&cfg.state_dir.join(covey_agent::run::LEDGER_FILE), budget).expect("ledger");
    assert_eq!(ledger.participations(&identity.device_id_hex()), 1, "one update left the device: one charge");
    // Under local noise the loss and the within-clip bit are not sent.
    let st = mock.state();
    assert_eq!(st.received[0].header.within_clip, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refuses_tasks_without_clipping_or_noise() {
    for privacy in [clip(0.0, 0.0), clip(1.0, 0.0)] {
        let mock = Arc::new(Mock::new(2, privacy, Faults::default(), false));
        let addr = serve(mock.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = covey_privacy::Budget { epsilon: 50.0, delta: 1e-5 };
        let cfg = AgentConfig { privacy_budget: Some(budget), max_task_failures: Some(1), ..config(dir.path(), addr) };
        covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
        let err = within(covey_agent::run(cfg, RunUntil::Updates(1))).await.expect_err("refused");
        let AgentError::TooManyFailures { last, .. } = err else { panic!("{err}") };
        assert!(matches!(*last, AgentError::InvalidTask { .. }), "{last}");
        assert_eq!(mock.state().fetches, 0, "{privacy:?}: refused before any download");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_beyond_the_memory_budget_is_declined_before_the_weights_download() {
    let mock = Arc::new(Mock::new(2, clip(1.0, 0.0), Faults::default(), false));
    let addr = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = AgentConfig { max_memory_bytes: Some(32 << 20), ..config(dir.path(), addr) };
    let identity = covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
    let shutdown = tokio::time::sleep(Duration::from_secs(3));
    let summary = within(covey_agent::run_with_shutdown(cfg.clone(), RunUntil::Updates(1), shutdown))
        .await
        .expect("a decline is not a failure");
    assert_eq!((summary.submitted, summary.declined, summary.failed_tasks), (0, 1, 0));
    let st = mock.state();
    assert_eq!(st.declines.len(), 1);
    let (device, task_id, reason) = &st.declines[0];
    assert_eq!(device, &identity.device_id);
    assert_eq!(task_id, &st.tasks[&identity.device_id].task_id);
    assert!(reason.contains("GB") && reason.contains("allows 0.03 GB"), "{reason}");
    assert_eq!(st.fetches, 1, "only the config was downloaded, not the weights");
    assert!(st.received.is_empty());
}

/// Personalisation: over three rounds the device fits its own adapter after each update
/// and seals it; every upload, recorded as it arrived, holds only the task's `B` (none of
/// the local adapter's tensors, names or values) and is the size a device that does not
/// personalise sends. Generation and suggestions use the personal model; a corrupted or
/// foreign local adapter falls back to the global one; `forget` wipes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_adapter_personalises_and_never_leaves_the_device() {
    use covey_agent::personal::{PersonalKey, PersonalStore};
    use covey_model::personal::{LOCAL_PREFIX, PersonalConfig, PersonalMethod};

    async fn three_rounds(dir: &Path, personal: bool) -> (AgentConfig, Vec<(NamedTensors, Vec<u8>)>) {
        let mock = Arc::new(Mock::new(2, clip(1.0, 0.0), Faults::default(), false));
        let addr = serve(mock.clone()).await;
        let mut cfg = config(dir, addr);
        if personal {
            cfg.personalisation = Some(PersonalConfig {
                method: PersonalMethod::Ditto,
                steps: 4,
                batch_size: 2,
                seq_len: 16,
                learning_rate: 5e-2,
                ..PersonalConfig::default()
            });
            cfg.personal_key_file = Some(dir.join("keys/personal.key"));
        }
        covey_agent::enroll(&cfg, TOKEN, "").await.expect("enrol");
        within(covey_agent::run(cfg.clone(), RunUntil::Updates(3))).await.expect("run");
        let st = mock.state();
        (cfg, st.received.iter().map(|r| (r.b.clone(), r.payload.clone())).collect())
    }
    let (plain_dir, personal_dir) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (_, plain) = three_rounds(plain_dir.path(), false).await;
    let (cfg, uploads) = three_rounds(personal_dir.path(), true).await;
    assert!(!plain_dir.path().join("state").join(covey_agent::personal::SEALED_FILE).exists());

    let store = covey_agent::personal::open_store(&cfg).expect("store").expect("personalises");
    let (meta, local) = store.load().expect("readable").expect("a local adapter was fitted");
    assert_eq!(meta.version, 1);
    assert_eq!(meta.train_tokens, 3 * 4 * 2 * 16, "Ditto continued the adapter over three fits");
    let local_tensors = local.to_tensors();
    assert_eq!(uploads.len(), 3);
    for ((b, payload), (_, plain_payload)) in uploads.iter().zip(&plain) {
        assert_eq!(payload.len(), plain_payload.len(), "personalisation changed the upload's size");
        for (name, t) in b {
            assert!(name.ends_with("lora_B.weight") && !name.starts_with(LOCAL_PREFIX), "{name} uploaded");
            for (local_name, l) in local_tensors.iter().chain(&local.b) {
                assert!(t.data != l.data, "upload tensor {name} equals the local adapter's {local_name}");
            }
        }
        assert!(
            !payload.windows(LOCAL_PREFIX.len()).any(|w| w == LOCAL_PREFIX.as_bytes()),
            "a local name in a payload"
        );
    }

    let sampling = covey_model::SamplingConfig { max_new_tokens: 5, temperature: 0.0, ..Default::default() };
    let state = &cfg.state_dir;
    let personal = covey_agent::generate(state, "Now is", &sampling, Some(&store)).expect("generate");
    assert!(personal.personal.used, "{:?}", personal.personal);
    let global = covey_agent::generate(state, "Now is", &sampling, None).expect("generate");
    assert!(!global.personal.used);
    let s = covey_agent::suggest(state, "Now is the", 3, Some(&store)).expect("suggest");
    assert!(s.personal.used && s.tokens.len() == 3 && s.words.len() == 3, "{s:?}");
    assert!(s.tokens.windows(2).all(|w| w[0].probability >= w[1].probability), "{s:?}");
    assert!(s.words.iter().zip(&s.tokens).all(|(w, t)| w.text.starts_with(&t.text) && w.probability <= t.probability));

    // Another device's key: the sealed file does not open; the global model answers.
    let foreign = PersonalStore::new(state, PersonalKey::from_bytes(&[7; 32]).expect("key"));
    let fallback = covey_agent::generate(state, "Now is", &sampling, Some(&foreign)).expect("falls back");
    assert!(
        !fallback.personal.used && fallback.personal.note.as_deref().is_some_and(|n| n.contains("does not decrypt"))
    );
    assert_eq!(fallback.text, global.text);
    // A flipped byte: the same.
    let mut bytes = std::fs::read(store.path()).expect("sealed");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(store.path(), &bytes).expect("write");
    let fallback = covey_agent::generate(state, "Now is", &sampling, Some(&store)).expect("falls back");
    assert!(!fallback.personal.used, "{:?}", fallback.personal);
    assert!(store.forget().expect("forget"));
    let after = covey_agent::generate(state, "Now is", &sampling, Some(&store)).expect("generate");
    assert_eq!(after.personal.note.as_deref(), Some("no local adapter fitted yet"));
}
