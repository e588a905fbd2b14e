//! Test support: a tiny model on disk, a configuration, and a raw device client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use covey_coordinator::CoordinatorConfig;
use covey_proto::keys::{self, KeyPair};
use covey_proto::pb::{self, fleet_client::FleetClient};
use covey_proto::signing::{self, DeviceMethod, UpdateHeader};
use covey_tensors::{HostTensor, NamedTensors};
use tonic::transport::Channel;

pub const TOKEN: &str = "test-enrolment-token";
pub const ADMIN: &str = "test-admin-token";
pub const HIDDEN: usize = 8;
pub const RANK: usize = 2;

pub fn tensor(shape: &[usize], seed: u32) -> HostTensor {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|i| ((i as f32 + seed as f32 * 7.0) * 0.618).sin() * 0.1).collect();
    HostTensor::new(shape.to_vec(), data).expect("shape")
}

/// A two-layer model directory with Hugging Face names.
pub fn write_tiny_model(dir: &Path) -> PathBuf {
    let mut m = NamedTensors::new();
    m.insert("model.embed_tokens.weight".into(), tensor(&[256, HIDDEN], 1));
    m.insert("model.norm.weight".into(), HostTensor::new(vec![HIDDEN], vec![1.0; HIDDEN]).expect("norm"));
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        m.insert(format!("{p}.input_layernorm.weight"), HostTensor::new(vec![HIDDEN], vec![1.0; HIDDEN]).expect("n"));
        m.insert(
            format!("{p}.post_attention_layernorm.weight"),
            HostTensor::new(vec![HIDDEN], vec![1.0; HIDDEN]).expect("n"),
        );
        for (i, t) in ["q_proj", "k_proj", "v_proj", "o_proj"].iter().enumerate() {
            m.insert(format!("{p}.self_attn.{t}.weight"), tensor(&[HIDDEN, HIDDEN], 10 + i as u32));
        }
        m.insert(format!("{p}.mlp.gate_proj.weight"), tensor(&[16, HIDDEN], 20));
        m.insert(format!("{p}.mlp.up_proj.weight"), tensor(&[16, HIDDEN], 21));
        m.insert(format!("{p}.mlp.down_proj.weight"), tensor(&[HIDDEN, 16], 22));
    }
    let dir = dir.join("model");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("model.safetensors"), covey_tensors::encode(&m, None).expect("encode")).expect("write");
    let config = br#"{"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 16, "vocab_size": 256, "max_position_embeddings": 64}"#;
    std::fs::write(dir.join("config.json"), config).expect("write");
    dir
}

/// A configuration for tests: 4 devices per round, 3 needed, rank 2 on q and v.
pub fn config(root: &Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        state_dir: root.join("state"),
        initial_model: Some(write_tiny_model(root)),
        ..CoordinatorConfig::default()
    };
    c.admin.token = ADMIN.into();
    c.enrollment.tokens = vec![TOKEN.into()];
    c.lora.rank = RANK;
    c.lora.alpha = 4.0;
    c.lora.targets = vec!["q_proj".into(), "v_proj".into()];
    c.rounds.target_updates = 4;
    c.rounds.over_selection = 0.0;
    c.rounds.min_updates = 3;
    c.rounds.min_available = 4;
    c.rounds.deadline = Duration::from_secs(120);
    c.rounds.pause = Duration::from_millis(50);
    c.rounds.poll_interval = Duration::from_millis(100);
    c.privacy.clip_norm = 1.0;
    c.limits.max_payload_bytes = 64 << 10;
    // Tests poll in tight loops (paused clocks make sleeps instant).
    c.limits.device_requests_per_minute = 100_000;
    c.enrollment.per_minute = 10_000;
    c.enrollment.per_token_per_minute = 10_000;
    // Every round cuts a base release (the merged master, int8), unless a test says otherwise.
    c.publish.release_every = 1;
    c
}

/// Names and shapes of the `B` tensors the test config expects.
pub fn b_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for l in 0..2 {
        for t in ["q_proj", "v_proj"] {
            out.push((format!("base_model.model.model.layers.{l}.self_attn.{t}.lora_B.weight"), vec![HIDDEN, RANK]));
        }
    }
    out
}

/// A valid `B` delta (norm below 1), different per `seed`.
pub fn delta(seed: u32) -> NamedTensors {
    b_shapes().into_iter().map(|(n, s)| (n, tensor(&s, seed))).collect()
}

pub async fn connect(addr: std::net::SocketAddr) -> FleetClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}")).expect("url").connect().await.expect("connect");
    FleetClient::new(channel).max_decoding_message_size(covey_proto::MAX_MESSAGE_BYTES)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// A device with its own key.
pub struct Device {
    pub key: KeyPair,
}

impl Device {
    pub fn new() -> Self {
        Self { key: KeyPair::generate().expect("key") }
    }

    pub fn id(&self) -> [u8; 32] {
        self.key.device_id()
    }

    pub fn auth(&self, method: DeviceMethod, ts: u64) -> pb::DeviceAuth {
        self.auth_for(method, ts, &[])
    }

    pub fn auth_for(&self, method: DeviceMethod, ts: u64, subject: &[u8]) -> pb::DeviceAuth {
        let sig = self.key.sign(&signing::device_request_bytes_for(method, &self.id(), ts, subject));
        pb::DeviceAuth { device_id: self.id().to_vec(), timestamp_ms: ts, signature: sig.to_vec() }
    }

    /// `FetchArtifact`, signed by this device.
    pub async fn fetch(&self, c: &mut FleetClient<Channel>, hash: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        let auth = self.auth_for(DeviceMethod::FetchArtifact, now_ms(), hash);
        let mut stream = c
            .fetch_artifact(pb::FetchArtifactRequest { sha256: hash.to_vec(), offset: 0, auth: Some(auth) })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            assert_eq!(chunk.offset as usize, out.len());
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    /// `GetManifest`, signed by this device.
    pub async fn manifest(
        &self,
        c: &mut FleetClient<Channel>,
        version: u64,
    ) -> Result<pb::SignedManifest, tonic::Status> {
        let auth = self.auth_for(DeviceMethod::GetManifest, now_ms(), &version.to_be_bytes());
        Ok(c.get_manifest(pb::GetManifestRequest { version, auth: Some(auth) }).await?.into_inner())
    }

    pub async fn enroll(&self, c: &mut FleetClient<Channel>) -> Vec<u8> {
        let r = c
            .enroll(pb::EnrollRequest {
                public_key: self.key.public_key().to_vec(),
                enrollment_token: TOKEN.into(),
                label: "test".into(),
            })
            .await
            .expect("enroll")
            .into_inner();
        assert_eq!(r.device_id, self.id().to_vec());
        r.coordinator_public_key
    }

    /// Poll until a task arrives.
    pub async fn task(&self, c: &mut FleetClient<Channel>) -> pb::Task {
        for _ in 0..200 {
            let r = c
                .poll_task(pb::PollTaskRequest { auth: Some(self.auth(DeviceMethod::Poll, now_ms())), max_rank: 0 })
                .await
                .expect("poll")
                .into_inner();
            match r.outcome {
                Some(pb::poll_task_response::Outcome::Task(t)) => return t,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("no task after 10 s");
    }

    /// Header, signature and payload of an update for `task`.
    pub fn update(&self, task: &pb::Task, delta: &NamedTensors) -> (UpdateHeader, [u8; 64], Vec<u8>) {
        self.update_with_payload(task, covey_tensors::encode(delta, None).expect("encode"))
    }

    /// Header and signature for `task` over a payload given as bytes.
    pub fn update_with_payload(&self, task: &pb::Task, payload: Vec<u8>) -> (UpdateHeader, [u8; 64], Vec<u8>) {
        let privacy = task.privacy.expect("privacy");
        let header = UpdateHeader {
            device_id: self.id(),
            round_id: task.round_id,
            task_id: signing::fixed("task_id", &task.task_id).expect("task id"),
            base_manifest_hash: signing::fixed("hash", &task.base_manifest_hash).expect("hash"),
            nonce: signing::fixed("nonce", &task.nonce).expect("nonce"),
            payload_len: payload.len() as u64,
            payload_sha256: keys::sha256(&payload),
            clip_norm: privacy.clip_norm,
            noise_multiplier: privacy.noise_multiplier,
            // What the task prescribes: steps × batch size.
            num_examples: task.training.map_or(16, |t| u64::from(t.steps) * u64::from(t.batch_size)),
            within_clip: Some(true),
        };
        let sig = self.key.sign(&header.to_bytes());
        (header, sig, payload)
    }
}

/// Upload `header`/`signature`/`payload` (split in 16 KiB chunks).
pub async fn submit(
    c: &mut FleetClient<Channel>,
    header: &[u8],
    signature: &[u8],
    payload: &[u8],
) -> Result<pb::SubmitUpdateResponse, tonic::Status> {
    let mut msgs = vec![pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            signed_header: header.to_vec(),
            signature: signature.to_vec(),
            train_loss: 1.0,
        })),
    }];
    for chunk in payload.chunks(16 << 10) {
        msgs.push(pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(chunk.to_vec())) });
    }
    c.submit_update(tokio_stream::iter(msgs)).await.map(tonic::Response::into_inner)
}
