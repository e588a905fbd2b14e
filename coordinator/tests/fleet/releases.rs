//! Base releases and adapter versions: each round publishes only the aggregated adapter
//! (cumulative since the release), every `publish.release-every` rounds a new quantized
//! release; what devices run at each version is exactly what the manifests say.

use std::sync::Arc;
use std::time::Duration;

use covey_coordinator::CoordinatorError;
use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::config::ReleaseQuantization;
use covey_coordinator::engine::Coordinator;
use covey_coordinator::store::MemoryStore;
use covey_proto::manifest::Manifest;
use covey_proto::signing::DeviceMethod;
use covey_tensors::NamedTensors;

use crate::soundness::{enrolled, open, pb, task_for};
use crate::support::{self, Device};

/// One round with every device sending `delta(seed + i)`; returns the mean step and the
/// version published.
async fn round(engine: &Arc<Coordinator>, devices: &[Device], seed: u32) -> (NamedTensors, u64) {
    let before = engine.store().versions().await.expect("versions").len();
    let mut mean: NamedTensors = support::delta(0);
    mean.values_mut().for_each(|t| t.data.iter_mut().for_each(|x| *x = 0.0));
    for (i, d) in devices.iter().enumerate() {
        let t = task_for(engine, d).await;
        let delta = support::delta(seed + i as u32);
        for (name, x) in &delta {
            let m = mean.get_mut(name).expect("name");
            m.data.iter_mut().zip(&x.data).for_each(|(m, x)| *m += x / devices.len() as f32);
        }
        let (h, s, p) = d.update(&pb(&t), &delta);
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    for _ in 0..400 {
        if engine.store().versions().await.expect("versions").len() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let current = engine.store().current_version().await.expect("current");
    assert_eq!(current as usize, before + 1, "round published");
    (mean, current)
}

fn manifest(engine: &Coordinator, bytes: &[u8], signature: &[u8]) -> Manifest {
    Manifest::verify(bytes, signature, &engine.public_key()).expect("signed manifest")
}

fn max_diff(a: &NamedTensors, b: &NamedTensors) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter().flat_map(|(n, x)| x.data.iter().zip(&b[n].data).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

#[tokio::test(start_paused = true)]
async fn rounds_publish_adapters_and_every_third_a_release() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.publish.release_every = 3;
    config.publish.quantization = ReleaseQuantization::Int4;
    config.rounds.min_updates = 4;
    let engine = open(config, Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());

    let v1 = engine.store().version(1).await.expect("v").expect("v1");
    let m1 = manifest(&engine, &v1.manifest, &v1.signature);
    assert_eq!((m1.release.version, m1.adapter.is_none()), (1, true));
    assert_eq!(m1.release.model.format, "safetensors-int4");
    assert_eq!(m1.release.tokenizer, None, "a byte-level model ships no tokenizer");
    let (w1, _) = engine.device_weights(1).await.expect("weights");

    // Rounds 1 and 2 publish adapters on release 1; B is cumulative, exactly.
    let (step1, v2) = round(&engine, &devices, 1).await;
    let (step2, v3) = round(&engine, &devices, 11).await;
    let mut cumulative = step1.clone();
    for (n, t) in cumulative.iter_mut() {
        t.data.iter_mut().zip(&step2[n].data).for_each(|(x, y)| *x += y);
    }
    let a =
        covey_tensors::decode(&engine.artifacts().get(&m1.lora.a.sha256_bytes().expect("a")).expect("A")).expect("A").0;
    for (version, expected, rounds) in [(v2, &step1, 1), (v3, &cumulative, 2)] {
        let record = engine.store().version(version).await.expect("v").expect("version");
        let m = manifest(&engine, &record.manifest, &record.signature);
        assert_eq!(m.release, m1.release, "version {version} keeps release 1");
        assert_eq!(m.master_sha256, m1.master_sha256, "no new master before the release");
        let adapter = m.adapter.expect("an adapter version");
        assert_eq!(adapter.rounds, rounds);
        let b = covey_tensors::decode(&engine.artifacts().get(&adapter.b.sha256_bytes().expect("b")).expect("B"))
            .expect("B")
            .0;
        assert!(max_diff(&b, expected) < 1e-6, "version {version}: B is the sum of the rounds' steps");
        assert!(adapter.b.size < m1.release.model.size / 4, "an adapter is small beside the release");
        // Devices run release 1's int4 weights plus alpha/r · B A.
        let (w, _) = engine.device_weights(version).await.expect("weights");
        let mut expected_w = w1.clone();
        let mut factors = a.clone();
        factors.extend(b);
        covey_tensors::lora::merge(&mut expected_w, &factors, 4.0 / 2.0).expect("merge");
        assert!(max_diff(&w, &expected_w) < 1e-6);
    }

    // Round 3 brings the adapter to 3 rounds: a new release, merged and quantized.
    let (step3, v4) = round(&engine, &devices, 21).await;
    let record = engine.store().version(v4).await.expect("v").expect("v4");
    let m4 = manifest(&engine, &record.manifest, &record.signature);
    assert_eq!((m4.release.version, m4.adapter.is_none()), (v4, true));
    assert_ne!(m4.release.model.sha256, m1.release.model.sha256);
    assert_eq!((&m4.release.config, &m4.lora), (&m1.release.config, &m1.lora));
    let master4 =
        covey_tensors::decode(&engine.artifacts().get(&record.master_sha256).expect("master")).expect("master").0;
    let master1 = covey_tensors::decode(&engine.artifacts().get(&v1.master_sha256).expect("master")).expect("m").0;
    let mut expected_master = master1;
    let mut factors = a.clone();
    for (n, t) in cumulative.iter_mut() {
        t.data.iter_mut().zip(&step3[n].data).for_each(|(x, y)| *x += y);
    }
    factors.extend(cumulative);
    covey_tensors::lora::merge(&mut expected_master, &factors, 4.0 / 2.0).expect("merge");
    assert!(max_diff(&master4, &expected_master) < 1e-5, "the release merges all three rounds");

    // Every artifact of every version is served; rolling back to an adapter version works.
    for v in 1..=v4 {
        let record = engine.store().version(v).await.expect("v").expect("version");
        for art in manifest(&engine, &record.manifest, &record.signature).artifacts() {
            let hash = art.sha256_bytes().expect("hash");
            let auth = devices[0].auth_for(DeviceMethod::FetchArtifact, engine.now_ms(), &hash);
            engine
                .authorize_fetch(&hash, &auth.device_id, auth.timestamp_ms, &auth.signature)
                .await
                .unwrap_or_else(|e| panic!("version {v}: {} is not served: {e}", art.format));
        }
    }
    assert_eq!(engine.rollback(v3).await.expect("rollback").0, v3);
    let t = task_for(&engine, &devices[0]).await;
    assert_eq!(t.binding.base_version, v3);
    driver.abort();
}

/// A task for `d`, polling as a device that trains at most `max_rank`.
async fn task_of_rank(engine: &Coordinator, d: &Device, max_rank: u32) -> covey_coordinator::engine::SignedTask {
    for _ in 0..1000 {
        let subject = if max_rank == 0 { vec![] } else { max_rank.to_be_bytes().to_vec() };
        let auth = d.auth_for(DeviceMethod::Poll, engine.now_ms(), &subject);
        match engine.poll_with_rank(&auth.device_id, auth.timestamp_ms, &auth.signature, max_rank).await.expect("poll")
        {
            covey_coordinator::engine::PollOutcome::Task(t) => return *t,
            covey_coordinator::engine::PollOutcome::Wait { retry_after, .. } => tokio::time::sleep(retry_after).await,
        }
    }
    panic!("no task");
}

/// HetLoRA: two devices train rank 4 (the first 4 rows of A, alpha scaled to keep
/// alpha / r), two train rank 8; the published adapter is exactly the coordinator's rule:
/// each B zero-padded to rank 8, then FedAvg's mean weighted by steps × batch size.
#[tokio::test(start_paused = true)]
async fn devices_of_ranks_4_and_8_aggregate_to_the_zero_padded_mean_exactly() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.lora.rank = 8;
    config.lora.alpha = 16.0;
    config.lora.device_ranks = vec![4];
    config.publish.release_every = 10;
    config.rounds.min_updates = 4;
    config.privacy.clip_norm = 10.0;
    let engine = open(config, Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());

    let names: Vec<String> = support::b_shapes().into_iter().map(|(n, _)| n).collect();
    let mut sent: Vec<NamedTensors> = Vec::new();
    for (i, (d, max_rank)) in devices.iter().zip([4u32, 6, 8, 0]).enumerate() {
        let t = task_of_rank(&engine, d, max_rank).await;
        let rank = if max_rank == 4 || max_rank == 6 { 4 } else { 8 };
        assert_eq!((t.task.lora.rank, t.task.lora.alpha), (rank, 16.0 * rank as f64 / 8.0), "max rank {max_rank}");
        let delta: NamedTensors =
            names.iter().map(|n| (n.clone(), support::tensor(&[support::HIDDEN, rank], 3 + i as u32))).collect();
        if i == 0 {
            // A B of a rank the coordinator does not allow is refused.
            let bad: NamedTensors =
                names.iter().map(|n| (n.clone(), support::tensor(&[support::HIDDEN, 3], 1))).collect();
            let (h, s, p) = d.update(&pb(&t), &bad);
            let err = engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect_err("rank 3");
            assert!(err.to_string().contains("rank 3"), "{err}");
        }
        let (h, s, p) = d.update(&pb(&t), &delta);
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
        sent.push(delta);
    }
    for _ in 0..400 {
        if engine.store().current_version().await.expect("current") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = engine.store().version(2).await.expect("v").expect("version 2");
    let m = manifest(&engine, &record.manifest, &record.signature);
    let b = covey_tensors::decode(
        &engine.artifacts().get(&m.adapter.expect("adapter").b.sha256_bytes().expect("b")).expect("B"),
    )
    .expect("B")
    .0;
    // The rule, computed independently: zero-pad to 8 columns, weigh every update alike
    // (the task's steps × batch size), mean in f64 in arrival order.
    let weight = engine.examples_per_update() as f64;
    for name in &names {
        let mut sum = vec![0f64; support::HIDDEN * 8];
        for delta in &sent {
            let t = &delta[name];
            let r = t.shape[1];
            for row in 0..support::HIDDEN {
                for col in 0..r {
                    sum[row * 8 + col] += weight * f64::from(t.data[row * r + col]);
                }
            }
        }
        let expected: Vec<f32> = sum.iter().map(|x| (x / (weight * 4.0)) as f32).collect();
        assert_eq!(b[name].shape, vec![support::HIDDEN, 8]);
        assert_eq!(b[name].data, expected, "{name}");
    }
    driver.abort();
}

/// An operator cuts a release from an adapter version; with `keep-releases = 1` the files
/// of the older release go, its versions can no longer be made current, and its
/// artifacts are no longer served.
#[tokio::test(start_paused = true)]
async fn an_operator_cuts_a_release_and_old_releases_are_collected() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.publish.release_every = 5;
    config.publish.keep_releases = 1;
    config.rounds.min_updates = 4;
    let engine = open(config, Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    let (step, v2) = round(&engine, &devices, 1).await;
    assert_eq!(v2, 2);
    let r1 = engine.store().version(1).await.expect("v").expect("v1");
    let m1 = manifest(&engine, &r1.manifest, &r1.signature);
    let r2 = engine.store().version(2).await.expect("v").expect("v2");
    let m2 = manifest(&engine, &r2.manifest, &r2.signature);
    assert!(matches!(engine.cut_release(1).await, Err(CoordinatorError::Refused(_))), "a release has no adapter");
    let master1 = covey_tensors::decode(&engine.artifacts().get(&r1.master_sha256).expect("master 1")).expect("m").0;
    let a =
        covey_tensors::decode(&engine.artifacts().get(&m1.lora.a.sha256_bytes().expect("a")).expect("A")).expect("A").0;

    let (current, _) = engine.cut_release(2).await.expect("cut");
    assert_eq!(current, 3);
    let r3 = engine.store().version(3).await.expect("v").expect("v3");
    let m3 = manifest(&engine, &r3.manifest, &r3.signature);
    assert_eq!((m3.parent, m3.release.version, m3.adapter.is_none()), (2, 3, true));
    // The release merges the adapter (the round's step) into release 1's master.
    let master3 = covey_tensors::decode(&engine.artifacts().get(&r3.master_sha256).expect("master 3")).expect("m").0;
    let mut expected = master1;
    let mut factors = a;
    factors.extend(step);
    covey_tensors::lora::merge(&mut expected, &factors, 4.0 / 2.0).expect("merge");
    assert!(max_diff(&master3, &expected) < 1e-6);
    let (w3, _) = engine.device_weights(3).await.expect("weights");
    assert!(max_diff(&w3, &master3) < 2e-3, "devices run the int8 release of that master");
    assert!(engine.artifacts().get(&r1.master_sha256).is_err(), "release 1's master is deleted");

    // Release 1's files are gone: not served, and its versions cannot be made current.
    let hash = m1.release.model.sha256_bytes().expect("hash");
    let auth = devices[0].auth_for(DeviceMethod::FetchArtifact, engine.now_ms(), &hash);
    assert!(engine.authorize_fetch(&hash, &auth.device_id, auth.timestamp_ms, &auth.signature).await.is_err());
    let b2 = m2.adapter.expect("adapter").b.sha256_bytes().expect("b");
    assert!(engine.artifacts().get(&b2).is_err(), "version 2's adapter is deleted");
    for v in [1, 2] {
        let err = engine.promote(v).await.expect_err("deleted release").to_string();
        assert!(err.contains("deleted"), "{err}");
    }
    // Rounds go on from the new release.
    let (_, v4) = round(&engine, &devices, 5).await;
    let r4 = engine.store().version(v4).await.expect("v").expect("v4");
    let m4 = manifest(&engine, &r4.manifest, &r4.signature);
    assert_eq!((m4.release.version, m4.adapter.map(|a| a.rounds)), (3, Some(1)));
    driver.abort();
}

/// With `publish.release-on-promote`, the operator's promote of an adapter version cuts
/// a release from it (the adapter merged, quantized) and makes that current; a release
/// version is promoted as it is.
#[tokio::test(start_paused = true)]
async fn promoting_an_adapter_version_cuts_a_release_when_configured() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.publish.release_every = 5;
    config.publish.release_on_promote = true;
    config.rounds.min_updates = 4;
    let engine = open(config, Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    let (_, v2) = round(&engine, &devices, 1).await;
    assert_eq!(v2, 2);
    let r2 = engine.store().version(2).await.expect("v").expect("v2");
    assert!(manifest(&engine, &r2.manifest, &r2.signature).adapter.is_some(), "version 2 is an adapter version");
    // A release version is promoted as it is.
    assert_eq!(engine.promote_by_operator(1).await.expect("promote 1").0, 1);
    // An adapter version becomes a new release, current, whose weights are version 2's merged.
    let (current, _) = engine.promote_by_operator(2).await.expect("promote 2");
    assert_eq!(current, 3);
    assert_eq!(engine.store().current_version().await.expect("current"), 3);
    let r3 = engine.store().version(3).await.expect("v").expect("v3");
    let m3 = manifest(&engine, &r3.manifest, &r3.signature);
    assert_eq!((m3.parent, m3.release.version, m3.adapter.is_none()), (2, 3, true));
    let (w2, _) = engine.device_weights(2).await.expect("weights 2");
    let (w3, _) = engine.device_weights(3).await.expect("weights 3");
    assert!(max_diff(&w3, &w2) < 2e-3, "the release holds version 2's weights, requantized");
    // rollback is never turned into a release.
    assert_eq!(engine.rollback(2).await.expect("rollback").0, 2);
    assert_eq!(engine.store().versions().await.expect("versions").len(), 3);
    driver.abort();
}

/// A device declines its task (it does not fit its memory): the reason is recorded and
/// counted, the task is not offered again, no update is taken from it, and the round
/// closes as soon as every sampled device answered, without waiting for its deadline.
#[tokio::test(start_paused = true)]
async fn a_declined_task_is_recorded_and_the_round_closes_when_everyone_answered() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.rounds.min_updates = 3;
    config.rounds.deadline = Duration::from_secs(3600);
    let engine = open(config, Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    let t = task_for(&engine, &devices[3]).await;
    let round_id = t.binding.round_id;
    let task_id = t.task.task_id;
    let decline = |reason: String, id: [u8; 16]| {
        let auth = devices[3].auth_for(DeviceMethod::DeclineTask, engine.now_ms(), &id);
        let engine = engine.clone();
        async move { engine.decline(&auth.device_id, auth.timestamp_ms, &auth.signature, &id, &reason).await }
    };
    assert!(decline("x".repeat(600), task_id).await.is_err(), "an overlong reason");
    assert!(decline("no".into(), [9; 16]).await.is_err(), "another task");
    let opened = engine.now_ms();
    decline("training needs about 1.65 GB, the device allows 1.00 GB".into(), task_id).await.expect("declined");
    let a = engine.store().assignment(round_id, &devices[3].id()).await.expect("a").expect("assignment");
    assert_eq!(a.declined.as_deref(), Some("training needs about 1.65 GB, the device allows 1.00 GB"));
    assert_eq!(engine.metrics().tasks_declined.get(), 1);
    let auth = devices[3].auth(DeviceMethod::Poll, engine.now_ms());
    let polled = engine.poll(&auth.device_id, auth.timestamp_ms, &auth.signature).await.expect("poll");
    assert!(matches!(polled, covey_coordinator::engine::PollOutcome::Wait { .. }), "not offered again");
    let (h, s, p) = devices[3].update(&pb(&t), &support::delta(1));
    assert!(engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.is_err(), "no update after a decline");
    for d in &devices[..3] {
        let t = task_for(&engine, d).await;
        let (h, s, p) = d.update(&pb(&t), &support::delta(2));
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    for _ in 0..400 {
        if engine.store().current_version().await.expect("current") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(engine.store().current_version().await.expect("current"), 2, "published with three updates");
    assert!(engine.now_ms() - opened < 600_000, "long before the hour-long deadline");
    driver.abort();
}
