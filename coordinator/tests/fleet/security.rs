//! Every hostile upload is refused with a specific status and stores nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use covey_coordinator::{CoordinatorConfig, server};
use covey_proto::keys;
use covey_proto::pb::{self, admin_client::AdminClient};
use covey_proto::signing::{DeviceMethod, UpdateHeader};
use covey_tensors::HostTensor;
use tonic::Code;

use crate::support::{self, Device, connect, submit};

/// Start a coordinator, enrol 4 devices and get each a task in round 1.
async fn setup() -> (tempfile::TempDir, server::Running, Vec<Device>, Vec<pb::Task>) {
    setup_with(|_| {}).await
}

async fn setup_with(
    change: impl FnOnce(&mut CoordinatorConfig),
) -> (tempfile::TempDir, server::Running, Vec<Device>, Vec<pb::Task>) {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    change(&mut config);
    let engine = server::open_engine(config).await.expect("engine");
    let running = server::start(engine).await.expect("start");
    let mut c = connect(running.addr).await;
    let devices: Vec<Device> = (0..4).map(|_| Device::new()).collect();
    for d in &devices {
        d.enroll(&mut c).await;
    }
    let mut tasks = Vec::new();
    for d in &devices {
        tasks.push(d.task(&mut c).await);
    }
    (root, running, devices, tasks)
}

async fn stored(running: &server::Running) -> u64 {
    running.engine.store().update_count(1).await.expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_uploads_are_refused_with_specific_statuses_and_nothing_is_stored() {
    let (_root, running, devices, tasks) = setup().await;
    let mut c = connect(running.addr).await;
    let d = &devices[0];
    let t = &tasks[0];
    let expect = async |c: &mut _, h: &[u8], s: &[u8], p: &[u8], code: Code, what: &str| {
        let err = submit(c, h, s, p).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert_eq!(stored(&running).await, 0, "{what}: nothing may be stored");
        err
    };

    // Tampered payload: one byte changed after signing.
    let (h, s, mut p) = d.update(t, &support::delta(1));
    let last = p.len() - 1;
    p[last] ^= 0x40;
    let e = expect(&mut c, &h.to_bytes(), &s, &p, Code::InvalidArgument, "tampered payload").await;
    assert!(e.message().contains("SHA-256"), "{}", e.message());

    // Tampered header (signature no longer matches).
    let (h, s, p) = d.update(t, &support::delta(1));
    let mut hb = h.to_bytes();
    hb[40] ^= 1;
    expect(&mut c, &hb, &s, &p, Code::Unauthenticated, "tampered header").await;

    // Unsigned, and signed by another key.
    expect(&mut c, &h.to_bytes(), &[], &p, Code::Unauthenticated, "unsigned").await;
    let other = Device::new();
    let forged = other.key.sign(&h.to_bytes());
    expect(&mut c, &h.to_bytes(), &forged, &p, Code::Unauthenticated, "wrongly signed").await;

    // Unknown key: a device that never enrolled signs its own header.
    let (h2, s2, p2) = other.update(t, &support::delta(1));
    expect(&mut c, &h2.to_bytes(), &s2, &p2, Code::Unauthenticated, "unknown key").await;

    // Another round, another base version, another task (all correctly signed).
    let sign = |h: &UpdateHeader| d.key.sign(&h.to_bytes());
    let mut wrong = h.clone();
    wrong.round_id = 2;
    expect(&mut c, &wrong.to_bytes(), &sign(&wrong), &p, Code::FailedPrecondition, "other round").await;
    let mut wrong = h.clone();
    wrong.base_manifest_hash = [7; 32];
    let e = expect(&mut c, &wrong.to_bytes(), &sign(&wrong), &p, Code::FailedPrecondition, "other version").await;
    assert!(e.message().contains("base model version"), "{}", e.message());
    let mut wrong = h.clone();
    wrong.nonce = [9; 32];
    expect(&mut c, &wrong.to_bytes(), &sign(&wrong), &p, Code::AlreadyExists, "nonce not issued").await;

    // Privacy settings that differ from the task's.
    let mut wrong = h.clone();
    wrong.clip_norm = 100.0;
    expect(&mut c, &wrong.to_bytes(), &sign(&wrong), &p, Code::InvalidArgument, "other clip norm").await;

    // NaN and infinite values; wrong shapes; a missing tensor; a norm above the clip.
    for (what, value) in [("NaN", f32::NAN), ("infinity", f32::INFINITY)] {
        let mut bad = support::delta(1);
        bad.values_mut().next().expect("tensor").data[3] = value;
        let (h, s, p) = d.update(t, &bad);
        let e = expect(&mut c, &h.to_bytes(), &s, &p, Code::InvalidArgument, what).await;
        assert!(e.message().contains("NaN or infinite"), "{}", e.message());
    }
    let mut bad = support::delta(1);
    let first = bad.keys().next().expect("name").clone();
    bad.insert(first.clone(), HostTensor::zeros(&[support::HIDDEN + 1, support::RANK]));
    let (h, s, p) = d.update(t, &bad);
    let e = expect(&mut c, &h.to_bytes(), &s, &p, Code::InvalidArgument, "wrong shape").await;
    assert!(e.message().contains("shape"), "{}", e.message());
    let mut bad = support::delta(1);
    bad.remove(&first);
    let (h, s, p) = d.update(t, &bad);
    expect(&mut c, &h.to_bytes(), &s, &p, Code::InvalidArgument, "missing tensor").await;
    let mut big = support::delta(1);
    for v in big.values_mut() {
        v.data.iter_mut().for_each(|x| *x *= 100.0);
    }
    let (h, s, p) = d.update(t, &big);
    expect(&mut c, &h.to_bytes(), &s, &p, Code::InvalidArgument, "norm above the clip").await;

    // Garbage payload with a valid signature over its hash.
    let mut h = d.update(t, &support::delta(1)).0;
    let garbage = vec![0xAB; 100];
    h.payload_len = 100;
    h.payload_sha256 = keys::sha256(&garbage);
    expect(&mut c, &h.to_bytes(), &sign(&h), &garbage, Code::InvalidArgument, "garbage payload").await;

    // Oversized: beyond the configured payload limit (streamed in chunks) ...
    let mut h = d.update(t, &support::delta(1)).0;
    let huge = vec![0u8; 100 << 10];
    h.payload_len = huge.len() as u64;
    h.payload_sha256 = keys::sha256(&huge);
    expect(&mut c, &h.to_bytes(), &sign(&h), &huge, Code::ResourceExhausted, "payload over the limit").await;
    // ... and one gRPC message beyond the request limit (one chunk and its framing).
    let msg = vec![pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(vec![0u8; 2 << 20])) }];
    let err = c.submit_update(tokio_stream::iter(msg)).await.expect_err("message over the request limit");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());

    // A stream that does not start with the header.
    let msg = vec![pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(vec![1, 2, 3])) }];
    let err = c.submit_update(tokio_stream::iter(msg)).await.expect_err("no header");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(stored(&running).await, 0);

    // The genuine update is accepted; replaying it is refused.
    let (h, s, p) = d.update(t, &support::delta(1));
    submit(&mut c, &h.to_bytes(), &s, &p).await.expect("genuine update");
    assert_eq!(stored(&running).await, 1);
    let err = submit(&mut c, &h.to_bytes(), &s, &p).await.expect_err("replay");
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    assert_eq!(stored(&running).await, 1, "the replay stores nothing");

    // A revoked device is refused, and its nonce stays unused.
    let victim = &devices[1];
    assert!(running.engine.revoke(&victim.id()).await.expect("revoke").changed);
    let (h, s, p) = victim.update(&tasks[1], &support::delta(2));
    let err = submit(&mut c, &h.to_bytes(), &s, &p).await.expect_err("revoked");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(stored(&running).await, 1);

    let text = running.engine.metrics().render();
    for label in [
        "payload_hash",
        "bad_signature",
        "unknown_device",
        "wrong_round",
        "wrong_base_version",
        "replay",
        "non_finite",
        "wrong_tensors",
        "oversized",
        "revoked_device",
        "norm_too_large",
    ] {
        assert!(text.contains(&format!("reason=\"{label}\"")), "metric for {label} missing:\n{text}");
    }
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_needs_a_valid_token_and_a_32_byte_key() {
    let root = tempfile::tempdir().expect("tmp");
    let engine = server::open_engine(support::config(root.path())).await.expect("engine");
    let running = server::start(engine).await.expect("start");
    let mut c = connect(running.addr).await;
    let d = Device::new();
    let err = c
        .enroll(pb::EnrollRequest {
            public_key: d.key.public_key().to_vec(),
            enrollment_token: "wrong-token".into(),
            label: String::new(),
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .enroll(pb::EnrollRequest {
            public_key: vec![1; 31],
            enrollment_token: support::TOKEN.into(),
            label: String::new(),
        })
        .await
        .expect_err("short key");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(running.engine.store().devices().await.expect("devices").is_empty());
    // A poll signed with the wrong key is refused.
    d.enroll(&mut c).await;
    let mut auth = d.auth(covey_proto::signing::DeviceMethod::Poll, support::now_ms());
    auth.signature = Device::new().key.sign(b"x").to_vec();
    let err = c.poll_task(pb::PollTaskRequest { auth: Some(auth), max_rank: 0 }).await.expect_err("forged poll");
    assert_eq!(err.code(), Code::Unauthenticated);
    // A heartbeat signature cannot be replayed as a poll.
    let hb = d.auth(covey_proto::signing::DeviceMethod::Heartbeat, support::now_ms());
    let err = c.poll_task(pb::PollTaskRequest { auth: Some(hb), max_rank: 0 }).await.expect_err("cross-method");
    assert_eq!(err.code(), Code::Unauthenticated);
    running.abort();
}

fn header_message(signed_header: Vec<u8>, signature: Vec<u8>) -> pb::UpdateChunk {
    pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader { signed_header, signature, train_loss: 0.0 })),
    }
}

fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().is_file()).count()).unwrap_or(0)
}

/// H1: the header is verified before any payload byte is read. A stranger announcing
/// 64 MiB is refused after the header, while the client has pushed only what h2 flow
/// control let through (before, the coordinator buffered the whole 64 MiB first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_upload_is_refused_before_its_payload_is_read() {
    let (root, running, _devices, tasks) = setup_with(|c| c.limits.max_payload_bytes = 64 << 20).await;
    let mut c = connect(running.addr).await;
    let stranger = Device::new();
    let t = &tasks[0];
    let (mut h, _, _) = stranger.update(t, &support::delta(1));
    h.payload_len = 64 << 20;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let first = header_message(h.to_bytes(), stranger.key.sign(&h.to_bytes()).to_vec());
    let data = (0..64).map(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(vec![0u8; 1 << 20])) }
    });
    let err = c.submit_update(tokio_stream::iter(std::iter::once(first).chain(data))).await.expect_err("stranger");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    let sent = pulled.load(Ordering::SeqCst);
    assert!(sent < 16, "the client got {sent} MiB out before the refusal");
    assert_eq!(files_in(&root.path().join("state/artifacts/uploads")), 0, "nothing written");
    running.abort();
}

/// H1 and M2: downloads need a device signature; only published artifacts are served,
/// never a device update or the f32 master; manifests need a signature too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_published_artifacts_are_served_and_only_to_enrolled_devices() {
    let (_root, running, devices, tasks) = setup().await;
    let mut c = connect(running.addr).await;
    let d = &devices[0];
    let (h, s, p) = d.update(&tasks[0], &support::delta(1));
    submit(&mut c, &h.to_bytes(), &s, &p).await.expect("accepted");
    let a = tasks[0].lora.as_ref().expect("lora").a_factors_sha256.clone();
    assert_eq!(keys::sha256(&d.fetch(&mut c, &a).await.expect("A factors")).to_vec(), a);
    let signed = d.manifest(&mut c, 1).await.expect("manifest");
    let manifest: covey_proto::manifest::Manifest = serde_json::from_slice(&signed.manifest).expect("json");
    let model = hex::decode(&manifest.release.model.sha256).expect("hex");
    assert_eq!(keys::sha256(&d.fetch(&mut c, &model).await.expect("model")).to_vec(), model);
    for (what, hash) in [
        ("a device update", h.payload_sha256.to_vec()),
        ("the f32 master", hex::decode(&manifest.master_sha256).expect("hex")),
    ] {
        let err = d.fetch(&mut c, &hash).await.expect_err(what);
        assert_eq!(err.code(), Code::NotFound, "{what}: {}", err.message());
    }
    // No signature, a stranger, a signature over another artifact, a replay for a manifest.
    let req = |auth| pb::FetchArtifactRequest { sha256: model.clone(), offset: 0, auth };
    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).expect_err("refused").code();
    assert_eq!(code(c.fetch_artifact(req(None)).await), Code::InvalidArgument);
    let stranger = Device::new().auth_for(DeviceMethod::FetchArtifact, support::now_ms(), &model);
    assert_eq!(code(c.fetch_artifact(req(Some(stranger))).await), Code::Unauthenticated);
    let other = d.auth_for(DeviceMethod::FetchArtifact, support::now_ms(), &a);
    assert_eq!(code(c.fetch_artifact(req(Some(other))).await), Code::Unauthenticated);
    let poll = d.auth(DeviceMethod::Poll, support::now_ms());
    assert_eq!(code(c.fetch_artifact(req(Some(poll))).await), Code::Unauthenticated);
    let err = c.get_manifest(pb::GetManifestRequest { version: 1, auth: None }).await.expect_err("unsigned");
    assert_eq!(err.code(), Code::InvalidArgument);
    running.abort();
}

/// Per-device request rate, and the limits on uploads in progress (one per device; the
/// configured number over the coordinator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_and_concurrent_uploads_are_limited_with_clear_codes() {
    let (_root, running, devices, tasks) = setup_with(|c| {
        c.limits.device_requests_per_minute = 30;
        // The limit never goes below twice the polling rate asked for: 2 a minute here.
        c.rounds.poll_interval = Duration::from_secs(60);
        c.limits.max_concurrent_uploads = 2;
    })
    .await;
    let mut c = connect(running.addr).await;
    // Device 0 opens an upload and holds it (header sent, payload pending).
    let (h0, s0, _) = devices[0].update(&tasks[0], &support::delta(1));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header_message(h0.to_bytes(), s0.to_vec())).await.expect("send");
    let mut held = c.clone();
    let held = tokio::spawn(async move { held.submit_update(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A second upload of the same device while the first is in progress: ABORTED.
    let (h, s, p) = devices[0].update(&tasks[0], &support::delta(1));
    let err = submit(&mut c, &h.to_bytes(), &s, &p).await.expect_err("same device");
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    // Device 1 opens a second upload, also held: the coordinator-wide limit (2) is reached.
    let (h1, s1, _) = devices[1].update(&tasks[1], &support::delta(2));
    let (tx1, rx1) = tokio::sync::mpsc::channel(4);
    tx1.send(header_message(h1.to_bytes(), s1.to_vec())).await.expect("send");
    let mut held1 = c.clone();
    let held1 =
        tokio::spawn(async move { held1.submit_update(tokio_stream::wrappers::ReceiverStream::new(rx1)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (h, s, p) = devices[2].update(&tasks[2], &support::delta(3));
    let err = submit(&mut c, &h.to_bytes(), &s, &p).await.expect_err("too many uploads");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    drop((tx, tx1));
    let _ = held.await;
    let _ = held1.await;
    // Once they are closed, device 2 uploads.
    submit(&mut c, &h.to_bytes(), &s, &p).await.expect("accepted after the others closed");

    // Device 3 polls until its rate limit answers RESOURCE_EXHAUSTED.
    let mut refused = None;
    for i in 0..100 {
        let r = c
            .poll_task(pb::PollTaskRequest {
                auth: Some(devices[3].auth(DeviceMethod::Poll, support::now_ms())),
                max_rank: 0,
            })
            .await;
        if let Err(e) = r {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("the device was rate-limited");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(i <= 32, "refused after {i} polls (32 a minute, the setup's included)");
    assert!(running.engine.metrics().render().contains("reason=\"device_rate\""));
    running.abort();
}

/// H4: minted tokens are single-use (or N uses) and expire; revoking a device burns the
/// token that enrolled it, so its holder cannot come back with a new key; enrolment is
/// rate-limited per token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_tokens_cannot_be_farmed() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.enrollment.per_token_per_minute = 4;
    let engine = server::open_engine(config).await.expect("engine");
    let running = server::start(engine).await.expect("start");
    let mut c = connect(running.addr).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", running.addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut admin = AdminClient::new(channel);
    let mint = async |admin: &mut AdminClient<tonic::transport::Channel>, uses: u32, ttl_seconds: u64| {
        let mut req = tonic::Request::new(pb::MintEnrollmentTokenRequest { uses, ttl_seconds, label: "test".into() });
        req.metadata_mut().insert("authorization", format!("Bearer {}", support::ADMIN).parse().expect("meta"));
        admin.mint_enrollment_token(req).await.expect("mint").into_inner().token
    };
    let enroll = async |c: &mut pb::fleet_client::FleetClient<tonic::transport::Channel>, d: &Device, token: &str| {
        c.enroll(pb::EnrollRequest {
            public_key: d.key.public_key().to_vec(),
            enrollment_token: token.into(),
            label: String::new(),
        })
        .await
        .map(|_| ())
    };
    // Single use.
    let single = mint(&mut admin, 1, 3600).await;
    assert_eq!(single.len(), 64);
    enroll(&mut c, &Device::new(), &single).await.expect("first use");
    let err = enroll(&mut c, &Device::new(), &single).await.expect_err("second use");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("no uses left"), "{}", err.message());
    // Expiring.
    let short = mint(&mut admin, 5, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = enroll(&mut c, &Device::new(), &short).await.expect_err("expired");
    assert!(err.message().contains("expired"), "{}", err.message());
    // Revocation burns the token: a new key under it is refused; others stay enrolled.
    let shared = mint(&mut admin, 3, 3600).await;
    let (first, second) = (Device::new(), Device::new());
    enroll(&mut c, &first, &shared).await.expect("enrol");
    enroll(&mut c, &second, &shared).await.expect("enrol");
    let outcome = running.engine.revoke(&first.id()).await.expect("revoke");
    assert!(outcome.changed && outcome.token_burned);
    let err = enroll(&mut c, &Device::new(), &shared).await.expect_err("burned");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("withdrawn"), "{}", err.message());
    let err = enroll(&mut c, &first, &shared).await.expect_err("revoked key");
    assert!(err.message().contains("revoked"), "{}", err.message());
    assert!(!running.engine.store().device(&second.id()).await.expect("d").expect("second").revoked);
    // Rate limit per token: 4 a minute, refused attempts included.
    let many = mint(&mut admin, 10, 3600).await;
    for _ in 0..4 {
        enroll(&mut c, &Device::new(), &many).await.expect("within the rate");
    }
    let err = enroll(&mut c, &Device::new(), &many).await.expect_err("rate");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    running.abort();
}
