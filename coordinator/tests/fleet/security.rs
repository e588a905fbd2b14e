//! Every hostile upload is refused with a specific status and stores nothing.

use covey_coordinator::server;
use covey_proto::keys;
use covey_proto::pb;
use covey_proto::signing::UpdateHeader;
use covey_tensors::HostTensor;
use tonic::Code;

use crate::support::{self, Device, connect, submit};

/// Start a coordinator, enrol 4 devices and get each a task in round 1.
async fn setup() -> (tempfile::TempDir, server::Running, Vec<Device>, Vec<pb::Task>) {
    let root = tempfile::tempdir().expect("tmp");
    let engine = server::open_engine(support::config(root.path())).await.expect("engine");
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
    // ... and one gRPC message beyond the 4 MiB message limit.
    let msg = vec![pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(vec![0u8; 5 << 20])) }];
    let err = c.submit_update(tokio_stream::iter(msg)).await.expect_err("message over 4 MiB");
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
    assert!(running.engine.revoke(&victim.id()).await.expect("revoke"));
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
    let err = c.poll_task(pb::PollTaskRequest { auth: Some(auth) }).await.expect_err("forged poll");
    assert_eq!(err.code(), Code::Unauthenticated);
    // A heartbeat signature cannot be replayed as a poll.
    let hb = d.auth(covey_proto::signing::DeviceMethod::Heartbeat, support::now_ms());
    let err = c.poll_task(pb::PollTaskRequest { auth: Some(hb) }).await.expect_err("cross-method");
    assert_eq!(err.code(), Code::Unauthenticated);
    running.abort();
}
