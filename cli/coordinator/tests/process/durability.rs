//! Kill the coordinator process with SIGKILL after some updates were acknowledged; a new
//! process on the same state completes the round with every acknowledged update.

use std::time::Duration;

use covey_proto::manifest::Manifest;
use covey_proto::pb::{self, admin_client::AdminClient, fleet_client::FleetClient};
use covey_tensors::NamedTensors;
use tonic::transport::Channel;

use crate::binary::spawn;
use crate::support::{self, Device, connect, submit};

async fn fetch(c: &mut FleetClient<Channel>, device: &Device, hash: &[u8]) -> Vec<u8> {
    let out = device.fetch(c, hash).await.expect("fetch");
    assert_eq!(covey_proto::keys::sha256(&out).to_vec(), hash.to_vec(), "artifact hash");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_updates_survive_sigkill() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.rounds.min_updates = 4;
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let config_path = root.path().join("coordinator.toml");
    std::fs::write(&config_path, toml::to_string(&config).expect("toml")).expect("write config");

    let (mut first, addr) = spawn(&config_path);
    let mut c = connect(addr).await;
    let devices: Vec<Device> = (0..4).map(|_| Device::new()).collect();
    let mut coordinator_key = Vec::new();
    for d in &devices {
        coordinator_key = d.enroll(&mut c).await;
    }
    let mut tasks = Vec::new();
    for d in &devices {
        tasks.push(d.task(&mut c).await);
    }
    let deltas: Vec<NamedTensors> = (0..4).map(|i| support::delta(i + 1)).collect();
    let mut uploads = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        uploads.push(d.update(&tasks[i], &deltas[i]));
    }
    for (h, s, p) in &uploads[..2] {
        submit(&mut c, &h.to_bytes(), s, p).await.expect("acknowledged");
    }
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    drop(c);

    let (mut second, addr) = spawn(&config_path);
    let mut c = connect(addr).await;
    // The acknowledged nonce stayed consumed.
    let (h, s, p) = &uploads[0];
    let err = submit(&mut c, &h.to_bytes(), s, p).await.expect_err("replay after restart");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    // The other two devices get the same task back and finish the round.
    for i in 2..4 {
        let again = devices[i].task(&mut c).await;
        assert_eq!(again.task_id, tasks[i].task_id);
        let (h, s, p) = &uploads[i];
        submit(&mut c, &h.to_bytes(), s, p).await.expect("acknowledged after restart");
    }

    let channel = Channel::from_shared(format!("http://{addr}")).expect("url").connect().await.expect("connect");
    let mut admin = AdminClient::new(channel);
    let mut published = None;
    for _ in 0..300 {
        let mut req = tonic::Request::new(pb::ListRoundsRequest { limit: 10 });
        req.metadata_mut().insert("authorization", format!("Bearer {}", support::ADMIN).parse().expect("meta"));
        let rounds = admin.list_rounds(req).await.expect("rounds").into_inner().rounds;
        if let Some(r) = rounds.iter().find(|r| r.round_id == 1 && r.state == "published") {
            published = Some(r.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let round = published.expect("round 1 published after the restart");
    assert_eq!(round.updates, 4, "every acknowledged update is in the round");
    assert_eq!((round.published_version, round.declined), (2, 0));
    let mut req = tonic::Request::new(pb::ListVersionsRequest {});
    req.metadata_mut().insert("authorization", format!("Bearer {}", support::ADMIN).parse().expect("meta"));
    let versions = admin.list_versions(req).await.expect("versions").into_inner().versions;
    let kinds: Vec<(u64, u64, u64, bool)> =
        versions.iter().map(|v| (v.version, v.release_version, v.adapter_rounds, v.download_bytes > 0)).collect();
    assert_eq!(kinds, vec![(2, 2, 0, true), (1, 1, 0, true)], "every round cuts a release in this configuration");

    // The published master weights are exactly initial + (alpha/r)·mean(B)·A.
    let signed = devices[0].manifest(&mut c, 2).await.expect("manifest");
    let manifest = Manifest::verify(&signed.manifest, &signed.signature, &coordinator_key).expect("signed manifest");
    assert_eq!((manifest.version, manifest.parent, manifest.round_id), (2, 1, 1));
    // The f32 master is never served: read it from the coordinator's artifact directory.
    let master_path = root.path().join("state/artifacts").join(&manifest.master_sha256);
    let master = covey_tensors::decode(&std::fs::read(master_path).expect("master blob")).expect("master").0;
    let master_hash = hex::decode(&manifest.master_sha256).expect("hex");
    let err = devices[0].fetch(&mut c, &master_hash).await.expect_err("the master is not served");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let a = covey_tensors::decode(
        &fetch(&mut c, &devices[0], &tasks[0].lora.as_ref().expect("lora").a_factors_sha256).await,
    )
    .expect("A")
    .0;
    let initial = covey_tensors::decode(&std::fs::read(root.path().join("model/model.safetensors")).expect("read"))
        .expect("init")
        .0;
    let mut mean = deltas[0].clone();
    for t in mean.values_mut() {
        t.data.iter_mut().for_each(|x| *x = 0.0);
    }
    for d in &deltas {
        for (name, t) in d {
            let m = mean.get_mut(name).expect("name");
            for (x, y) in m.data.iter_mut().zip(&t.data) {
                *x += y / 4.0;
            }
        }
    }
    let mut expected = initial.clone();
    let mut factors = a.clone();
    factors.extend(mean);
    covey_tensors::lora::merge(&mut expected, &factors, 4.0 / 2.0).expect("merge");
    for (name, t) in &expected {
        let got = &master[name];
        let err = t.data.iter().zip(&got.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-5, "{name}: max error {err}");
    }
    assert_ne!(master, initial, "the round changed the weights");
    // The devices' artifact is int8 and decodes close to the master.
    let model = covey_tensors::quant::decode_model(
        &fetch(&mut c, &devices[0], &hex::decode(&manifest.release.model.sha256).expect("hex")).await,
    )
    .expect("int8 model")
    .0;
    let q = &model["model.layers.0.self_attn.q_proj.weight"];
    let m = &master["model.layers.0.self_attn.q_proj.weight"];
    let err = q.data.iter().zip(&m.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(err > 0.0 && err < 2e-3, "int8 error {err}");
    second.kill().expect("kill");
    second.wait().expect("reap");
}
