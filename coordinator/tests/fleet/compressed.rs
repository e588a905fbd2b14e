//! Compressed updates (`[training] update-encoding`): the task carries the encoding, signed;
//! the intake decodes int8 / int4 payloads strictly and refuses any other encoding.

use std::sync::Arc;

use covey_coordinator::Rejection;
use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::store::MemoryStore;
use covey_tensors::compress::{UpdateEncoding, decode_update, encode_update};

use crate::soundness::{enrolled, open, pb, task_for};
use crate::support;

#[tokio::test(start_paused = true)]
async fn the_intake_takes_the_tasks_encoding_and_refuses_any_other() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.training.update_encoding = UpdateEncoding::Int8;
    let engine = open(config, Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    engine.open_round().await.expect("open").round().expect("round");

    // The task says int8, and the device verifies that under the coordinator's signature.
    let t = task_for(&engine, &devices[0]).await;
    let message = pb(&t);
    assert_eq!(message.training.as_ref().map(|t| t.update_encoding), Some(UpdateEncoding::Int8.wire()));
    let task = covey_proto::task::Task::try_from(&message).expect("task");
    assert_eq!(task.training.update_encoding, UpdateEncoding::Int8);
    let mut tampered = message.clone();
    tampered.training.as_mut().expect("training").update_encoding = 0;
    let original = covey_proto::signing::TaskBinding::of_task(devices[0].id(), &message).expect("binding");
    let downgraded = covey_proto::signing::TaskBinding::of_task(devices[0].id(), &tampered).expect("binding");
    assert_ne!(original.to_bytes().expect("bytes"), downgraded.to_bytes().expect("bytes"), "the encoding is signed");

    // An f32 payload for an int8 task is refused, nothing stored.
    let delta = support::delta(1);
    let (h, s, p) = devices[0].update(&message, &delta);
    let refused = engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await;
    let reason = format!("{:?}", refused.as_ref().map_err(|e| e.rejection()));
    assert!(
        matches!(refused.as_ref().map_err(|e| e.rejection()), Err(Some(Rejection::BadPayload(r))) if r.contains("encoded as f32, the task asked for int8")),
        "{reason}"
    );
    assert_eq!(engine.store().update_count(1).await.expect("count"), 0);

    // A code outside ±127 is refused with the reason.
    let mut hostile = encode_update(&delta, UpdateEncoding::Int8, [1; 32], 1.0).expect("encode");
    let (header_len, header) = safetensors::SafeTensors::read_metadata(&hostile).expect("header");
    let codes = header.tensors().into_iter().find(|(n, _)| !n.ends_with("::scale")).expect("codes").1;
    hostile[8 + header_len + codes.data_offsets.0] = 0x80;
    let (h, s, p) = devices[0].update_with_payload(&message, hostile);
    let refused = engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await;
    assert!(
        matches!(refused.as_ref().map_err(|e| e.rejection()), Err(Some(Rejection::BadPayload(r))) if r.contains("outside ±127")),
        "{:?}",
        refused.map_err(|e| e.to_string())
    );

    // The int8 payload of the same update is accepted.
    let int8 = encode_update(&delta, UpdateEncoding::Int8, [2; 32], 1.0).expect("encode");
    let decoded = decode_update(&int8).expect("decode").0;
    assert!(covey_tensors::global_norm(&decoded) <= covey_tensors::global_norm(&delta).max(1.0));
    let (h, s, p) = devices[0].update_with_payload(&message, int8);
    engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("int8 update accepted");
    assert_eq!(engine.store().update_count(1).await.expect("count"), 1);
}
