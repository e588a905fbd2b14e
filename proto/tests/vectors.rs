//! Golden vectors of every signed byte string, published beside `covey.proto` so a client
//! written in another language can test its framing and signatures against them.
//!
//! The file is checked here field by field; `COVEY_WRITE_VECTORS=1 cargo test -p covey-proto
//! --test vectors` rewrites it after a deliberate change of the wire format.

use covey_proto::keys::{self, KeyPair};
use covey_proto::manifest::{
    Adapter, ArtifactRef, LoraLayout, MANIFEST_SCHEMA, Manifest, PrivacySpent, Release, SpecialTokens,
};
use covey_proto::signing::{self, DeviceMethod, TaskBinding, UpdateHeader};
use serde_json::{Value, json};

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/covey/v1/signing-vectors.json");

/// Published test seeds (RFC 8032 raw seeds): never used for anything but these vectors.
const DEVICE_SEED: [u8; 32] = [0x11; 32];
const COORDINATOR_SEED: [u8; 32] = [0x22; 32];

fn key_json(seed: &[u8; 32]) -> (KeyPair, Value) {
    let k = KeyPair::from_seed(seed).expect("seed");
    let v = json!({
        "seed": hex::encode(seed),
        "public_key": hex::encode(k.public_key()),
        "device_id": hex::encode(k.device_id()),
    });
    (k, v)
}

fn signed(key: &KeyPair, bytes: &[u8]) -> Value {
    json!({ "bytes": hex::encode(bytes), "signature": hex::encode(key.sign(bytes)) })
}

fn vectors() -> Value {
    let (device, device_json) = key_json(&DEVICE_SEED);
    let (coordinator, coordinator_json) = key_json(&COORDINATOR_SEED);
    let id = device.device_id();
    let ts = 1_765_000_000_000u64;
    let artifact = keys::sha256(b"covey artifact");
    let requests = [
        ("poll", DeviceMethod::Poll, Vec::new()),
        ("heartbeat", DeviceMethod::Heartbeat, Vec::new()),
        ("get_manifest", DeviceMethod::GetManifest, 7u64.to_be_bytes().to_vec()),
        ("fetch_artifact", DeviceMethod::FetchArtifact, artifact.to_vec()),
        ("decline_task", DeviceMethod::DeclineTask, vec![0xA1; 16]),
        ("poll_with_max_rank", DeviceMethod::Poll, 4u32.to_be_bytes().to_vec()),
    ]
    .into_iter()
    .map(|(name, method, subject)| {
        let bytes = signing::device_request_bytes_for(method, &id, ts, &subject);
        let mut v = signed(&device, &bytes);
        v["fields"] = json!({
            "method": method as u8, "device_id": hex::encode(id), "timestamp_ms": ts,
            "subject": hex::encode(&subject),
        });
        (name.to_owned(), v)
    })
    .collect::<serde_json::Map<_, _>>();

    let payload = b"example payload".to_vec();
    let header = UpdateHeader {
        device_id: id,
        round_id: 3,
        task_id: [0xA1; 16],
        base_manifest_hash: keys::sha256(b"manifest"),
        nonce: [0xB2; 32],
        payload_len: payload.len() as u64,
        payload_sha256: keys::sha256(&payload),
        clip_norm: 1.0,
        noise_multiplier: 0.0,
        num_examples: 160,
        within_clip: Some(true),
    };
    let mut update = signed(&device, &header.to_bytes());
    update["fields"] = json!({
        "device_id": hex::encode(header.device_id), "round_id": header.round_id,
        "task_id": hex::encode(header.task_id), "base_manifest_hash": hex::encode(header.base_manifest_hash),
        "nonce": hex::encode(header.nonce), "payload_len": header.payload_len,
        "payload_sha256": hex::encode(header.payload_sha256), "clip_norm": header.clip_norm,
        "noise_multiplier": header.noise_multiplier, "num_examples": header.num_examples, "within_clip": 1,
    });

    let task = TaskBinding {
        device_id: id,
        round_id: 3,
        task_id: [0xA1; 16],
        nonce: [0xB2; 32],
        base_version: 2,
        base_manifest_hash: keys::sha256(b"manifest"),
        a_factors_sha256: keys::sha256(b"a factors"),
        rank: 8,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        steps: 20,
        batch_size: 8,
        seq_len: 128,
        learning_rate: 0.003,
        proximal_mu: 0.0,
        seed: 3,
        update_encoding: 0,
        clip_norm: 1.0,
        noise_multiplier: 0.5,
        deadline_ms: ts + 600_000,
        max_payload_bytes: 64 << 20,
    };
    let mut task_json = signed(&coordinator, &task.to_bytes().expect("task"));
    task_json["fields"] = json!({
        "device_id": hex::encode(task.device_id), "round_id": task.round_id, "task_id": hex::encode(task.task_id),
        "nonce": hex::encode(task.nonce), "base_version": task.base_version,
        "base_manifest_hash": hex::encode(task.base_manifest_hash),
        "a_factors_sha256": hex::encode(task.a_factors_sha256), "rank": task.rank, "alpha": f64::from(task.alpha),
        "targets": task.targets, "steps": task.steps, "batch_size": task.batch_size, "seq_len": task.seq_len,
        "learning_rate": f64::from(task.learning_rate), "proximal_mu": f64::from(task.proximal_mu), "seed": task.seed,
        "clip_norm": task.clip_norm, "noise_multiplier": task.noise_multiplier, "deadline_unix_ms": task.deadline_ms,
        "max_payload_bytes": task.max_payload_bytes,
    });

    let art = |hash: &str, size, format: &str| ArtifactRef {
        sha256: hash.into(),
        size,
        format: format.into(),
        chunks: vec![],
    };
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        version: 2,
        parent: 1,
        round_id: 1,
        release: Release {
            version: 1,
            architecture: "llama".into(),
            model: art(&hex::encode(keys::sha256(b"int8")), 1000, "safetensors-int8"),
            quantization: "int8-per-channel-symmetric".into(),
            config: art(&hex::encode(keys::sha256(b"config")), 100, "llama-config-json"),
            tokenizer: Some(art(&hex::encode(keys::sha256(b"tokenizer")), 500, "tokenizer-json")),
            chat_template: None,
            special_tokens: SpecialTokens { bos: Some(1), eos: Some(2), add_bos: false },
        },
        lora: LoraLayout {
            rank: 4,
            alpha: 8.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            a: art(&hex::encode(keys::sha256(b"a")), 200, "safetensors-f32"),
        },
        adapter: Some(Adapter { rounds: 1, b: art(&hex::encode(keys::sha256(b"b")), 300, "safetensors-f32") }),
        master_sha256: hex::encode(keys::sha256(b"master")),
        privacy: PrivacySpent {
            epsilon: 1.5,
            delta: 1e-5,
            accountant: "pld-subsampled-gaussian".into(),
            rounds: 1,
            mechanism: "dp-fedavg".into(),
            assumption: "poisson-sampling".into(),
            ..PrivacySpent::nothing()
        },
        created_unix_ms: ts,
    };
    let (manifest_bytes, manifest_signature) = manifest.sign(&coordinator).expect("manifest");
    let mut signed_manifest = signing::MANIFEST_SIGNING_DOMAIN.to_vec();
    signed_manifest.extend_from_slice(&manifest_bytes);
    let manifest_json = json!({
        "manifest": String::from_utf8(manifest_bytes).expect("utf-8"),
        "bytes": hex::encode(&signed_manifest),
        "signature": hex::encode(manifest_signature),
    });

    json!({
        "about": "Golden vectors of covey.v1's signed byte strings (see the framing notes at the top of \
                  covey.proto). Ed25519 signatures are deterministic: sign `bytes` with the seed and you must \
                  get `signature`. The seeds are published test keys.",
        "device_key": device_json,
        "coordinator_key": coordinator_json,
        "device_request": requests,
        "update_header": update,
        "task": task_json,
        "manifest": manifest_json,
    })
}

#[test]
fn published_vectors_match_the_framing_and_the_signatures() {
    let want = vectors();
    if std::env::var_os("COVEY_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&want).expect("json") + "\n";
        std::fs::write(FILE, text).expect("write vectors");
    }
    let text = std::fs::read_to_string(FILE).expect("signing-vectors.json beside covey.proto");
    let file: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(file, want, "signing-vectors.json differs from the framing this crate produces");

    // Every signature in the file verifies with the key the file names, over the file's bytes.
    let device_pk = hex::decode(file["device_key"]["public_key"].as_str().expect("pk")).expect("hex");
    let coordinator_pk = hex::decode(file["coordinator_key"]["public_key"].as_str().expect("pk")).expect("hex");
    let check = |v: &Value, pk: &[u8]| {
        let bytes = hex::decode(v["bytes"].as_str().expect("bytes")).expect("hex");
        let sig = hex::decode(v["signature"].as_str().expect("sig")).expect("hex");
        keys::verify(pk, &bytes, &sig).expect("signature verifies");
        bytes
    };
    for (name, v) in file["device_request"].as_object().expect("requests") {
        let bytes = check(v, &device_pk);
        let subject = v["fields"]["subject"].as_str().expect("subject").len() / 2;
        assert_eq!(bytes.len(), signing::DEVICE_REQUEST_LEN + subject, "{name}");
        assert_eq!(&bytes[65..73], &[0u8; 8], "{name}: the 8 reserved zero bytes");
    }
    let header = check(&file["update_header"], &device_pk);
    assert_eq!(header.len(), signing::UPDATE_HEADER_LEN);
    UpdateHeader::parse(&header).expect("header parses");
    check(&file["task"], &coordinator_pk);
    let manifest = check(&file["manifest"], &coordinator_pk);
    let json_part = &manifest[signing::MANIFEST_SIGNING_DOMAIN.len()..];
    let sig = hex::decode(file["manifest"]["signature"].as_str().expect("sig")).expect("hex");
    Manifest::verify(json_part, &sig, &coordinator_pk).expect("manifest verifies");
}
