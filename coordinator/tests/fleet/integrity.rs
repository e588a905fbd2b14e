//! The start-up check against torn writes: debris a crash can leave is deleted, state that
//! lost what it acknowledged is refused with the file to restore.

use std::sync::Arc;

use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::store::{SqliteStore, Store};
use covey_coordinator::{CoordinatorError, engine::integrity};

use crate::soundness::{enrolled, open, pb, task_for};
use crate::support;

#[tokio::test]
async fn debris_is_repaired_and_lost_acknowledged_files_are_refused() {
    let root = tempfile::tempdir().expect("tmp");
    let config = support::config(root.path());
    let dir = root.path().join("state");
    std::fs::create_dir_all(&dir).expect("dir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("state.sqlite")).await.expect("store"));
    let artifacts = Artifacts::dir(&dir.join("artifacts")).expect("artifacts");
    let engine = open(config.clone(), store.clone(), artifacts.clone()).await;
    let devices = enrolled(&engine, 4).await;
    engine.open_round().await.expect("open").round().expect("round");
    let t = task_for(&engine, &devices[0]).await;
    let (h, s, p) = devices[0].update(&pb(&t), &support::delta(1));
    engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("acknowledged");
    drop(engine);

    // What a crash can leave: a half-written blob in each directory, an upload stored but
    // never recorded, the file of a version whose publish never committed.
    let uploads = artifacts.namespace("uploads").expect("uploads");
    std::fs::write(dir.join("artifacts/.pending-00.tmp"), b"half").expect("tmp");
    std::fs::write(dir.join("artifacts/uploads/.pending-01.tmp"), b"half").expect("tmp");
    let stray_upload = uploads.put(b"an upload the database never recorded").expect("put");
    let stray_artifact = artifacts.put(b"a model of a publish that never committed").expect("put");
    // The `A` factors' hash, as the engine stored it on first start.
    let a_hash: [u8; 32] =
        store.get_state("a_factors").await.expect("state").expect("A hash").try_into().expect("32 bytes");
    let repairs = integrity::check_and_repair(&config, &*store, &artifacts, &uploads, a_hash).await.expect("check");
    assert_eq!(
        repairs,
        integrity::Repairs { pending_files: 2, orphan_uploads: 1, orphan_artifacts: 1 },
        "exactly the debris is deleted"
    );
    assert!(uploads.size(&stray_upload).is_err() && artifacts.size(&stray_artifact).is_err());
    assert!(uploads.size(&h.payload_sha256).is_ok(), "the acknowledged payload stays");
    // A second pass finds nothing, and the engine opens on the repaired state.
    let again = integrity::check_and_repair(&config, &*store, &artifacts, &uploads, a_hash).await.expect("check");
    assert_eq!(again, integrity::Repairs::default());

    // An acknowledged payload that vanished cannot come from a crash: refused, named.
    uploads.remove(&h.payload_sha256).expect("remove");
    let key = covey_proto::keys::KeyPair::generate().expect("key");
    let metrics = Arc::new(covey_coordinator::metrics::Metrics::default());
    let refused =
        covey_coordinator::engine::Coordinator::open(config.clone(), store.clone(), artifacts.clone(), key, metrics)
            .await
            .map(|_| ())
            .expect_err("refused");
    let text = refused.to_string();
    assert!(matches!(refused, CoordinatorError::Corrupt(_)), "{text}");
    assert!(text.contains(&hex::encode(h.payload_sha256)) && text.contains("acknowledged"), "{text}");
}

#[tokio::test]
async fn a_second_coordinator_on_the_same_state_directory_is_refused() {
    let root = tempfile::tempdir().expect("tmp");
    let config = support::config(root.path());
    let first = covey_coordinator::server::open_engine(config.clone()).await.expect("first");
    let err = covey_coordinator::server::open_engine(config.clone()).await.expect_err("second");
    assert!(matches!(err, CoordinatorError::StateLocked { .. }), "{err}");
    assert!(err.to_string().contains("another coordinator"), "{err}");
    // The first keeps working; once it is gone, the directory opens again.
    assert!(first.now_ms() > 0);
    drop(first);
    covey_coordinator::server::open_engine(config).await.expect("reopened after the first stopped");
}
