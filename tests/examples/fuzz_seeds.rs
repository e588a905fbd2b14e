//! Writes the seed inputs of the fuzz targets (`fuzz/corpus/<target>/seed-*`): one or a few
//! well-formed inputs per decoder, made with Covey's own encoders, from which libFuzzer
//! mutates. Run from the repository root: `cargo run -p covey-tests --example fuzz_seeds`.

use std::collections::HashMap;
use std::path::Path;

use covey_gguf::{GgmlType, GgufWriter, Value};
use covey_proto::pb;
use covey_proto::signing::UpdateHeader;
use covey_tensors::compress::{UpdateEncoding, encode_update};
use covey_tensors::quant::{Scheme, encode_quantized};
use covey_tensors::{HostTensor, NamedTensors};
use prost::Message;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
}

fn tensor(shape: &[usize], seed: f32) -> HostTensor {
    let n = shape.iter().product::<usize>();
    HostTensor::new(shape.to_vec(), (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()).expect("tensor")
}

fn header() -> UpdateHeader {
    UpdateHeader {
        device_id: [1; 32],
        round_id: 3,
        task_id: [2; 16],
        base_manifest_hash: [3; 32],
        nonce: [4; 32],
        payload_len: 1234,
        payload_sha256: [5; 32],
        clip_norm: 1.0,
        noise_multiplier: 0.0,
        num_examples: 32,
        within_clip: Some(true),
    }
}

fn main() {
    // Update header and payload.
    write("update_header", "header", &header().to_bytes());
    let mut b = NamedTensors::new();
    b.insert("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(), tensor(&[8, 4], 1.0));
    b.insert("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight".into(), tensor(&[8, 4], 2.0));
    let payload = covey_tensors::encode(&b, None).expect("payload");
    write("update_payload", "b-factors", &payload);
    let meta = HashMap::from([("round".to_string(), "3".to_string())]);
    write("update_payload", "with-metadata", &covey_tensors::encode(&b, Some(meta)).expect("payload"));
    for encoding in [UpdateEncoding::Int8, UpdateEncoding::Int4] {
        let bytes = encode_update(&b, encoding, [9; 32], 1.0).expect("compressed payload");
        write("update_payload", encoding.name(), &bytes);
    }

    // Release weights: f32, int8 and int4.
    let mut w = NamedTensors::new();
    w.insert("model.layers.0.mlp.up_proj.weight".into(), tensor(&[4, 64], 3.0));
    w.insert("model.norm.weight".into(), tensor(&[64], 4.0));
    write("stored_weights", "f32", &covey_tensors::encode(&w, None).expect("f32"));
    write("stored_weights", "int8", &encode_quantized(&w, Scheme::Int8, HashMap::new()).expect("int8"));
    write("stored_weights", "int4", &encode_quantized(&w, Scheme::Int4, HashMap::new()).expect("int4"));

    // Protobuf messages, prefixed by the selector byte of `covey_fuzz::fleet_messages`.
    let auth = pb::DeviceAuth { device_id: vec![1; 32], timestamp_ms: 1_700_000_000_000, signature: vec![9; 64] };
    let messages: Vec<(u8, &str, Vec<u8>)> = vec![
        (
            0,
            "enroll",
            pb::EnrollRequest { public_key: vec![7; 32], enrollment_token: "token-123".into(), label: "pixel".into() }
                .encode_to_vec(),
        ),
        (1, "poll", pb::PollTaskRequest { auth: Some(auth.clone()), max_rank: 8 }.encode_to_vec()),
        (2, "get-manifest", pb::GetManifestRequest { version: 4, auth: Some(auth.clone()) }.encode_to_vec()),
        (
            3,
            "fetch",
            pb::FetchArtifactRequest { sha256: vec![3; 32], offset: 4096, auth: Some(auth.clone()) }.encode_to_vec(),
        ),
        (
            4,
            "update-header",
            pb::UpdateChunk {
                part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
                    signed_header: header().to_bytes(),
                    signature: vec![8; 64],
                    train_loss: 2.5,
                })),
            }
            .encode_to_vec(),
        ),
        (
            4,
            "update-data",
            pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(payload.clone())) }.encode_to_vec(),
        ),
        (5, "heartbeat", pb::HeartbeatRequest { auth: Some(auth.clone()) }.encode_to_vec()),
        (
            7,
            "task",
            pb::PollTaskResponse {
                outcome: Some(pb::poll_task_response::Outcome::Task(pb::Task {
                    round_id: 3,
                    task_id: vec![2; 16],
                    nonce: vec![4; 32],
                    base_version: 2,
                    base_manifest_hash: vec![3; 32],
                    lora: Some(pb::LoraSpec {
                        rank: 4,
                        alpha: 8.0,
                        targets: vec!["q_proj".into(), "v_proj".into()],
                        a_factors_sha256: vec![6; 32],
                    }),
                    training: Some(pb::TrainingSpec {
                        steps: 4,
                        batch_size: 8,
                        seq_len: 64,
                        learning_rate: 0.01,
                        proximal_mu: 0.0,
                        seed: 11,
                        update_encoding: 1,
                    }),
                    privacy: Some(pb::PrivacySpec { clip_norm: 1.0, noise_multiplier: 0.0 }),
                    deadline_unix_ms: 1_700_000_600_000,
                    max_payload_bytes: 1 << 20,
                    signature: vec![8; 64],
                })),
            }
            .encode_to_vec(),
        ),
        (
            8,
            "signed-manifest",
            pb::SignedManifest {
                manifest: include_bytes!("../../fuzz/corpus/manifest/seed-version").to_vec(),
                signature: vec![8; 64],
            }
            .encode_to_vec(),
        ),
        (9, "chunk", pb::ArtifactChunk { offset: 0, data: vec![1, 2, 3], total_size: 3 }.encode_to_vec()),
        (
            10,
            "enrolled",
            pb::EnrollResponse { device_id: vec![1; 32], coordinator_public_key: vec![2; 32] }.encode_to_vec(),
        ),
    ];
    for (which, name, bytes) in messages {
        write("fleet_messages", name, &[&[which][..], &bytes].concat());
    }

    // A small Llama GGUF with a BPE vocabulary, as `covey-model import` reads one.
    let mut g = GgufWriter::new();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", "llama".into()),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.block_count", Value::U32(1)),
        ("llama.feed_forward_length", Value::U32(16)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", "gpt2".into()),
        ("tokenizer.ggml.pre", "smollm".into()),
        (
            "tokenizer.ggml.tokens",
            Value::Array(["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġa"].iter().map(|&t| t.into()).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(["a b", "Ġ a"].iter().map(|&t| t.into()).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ];
    for (k, v) in meta {
        g.add_metadata(k, v).expect("metadata");
    }
    let embd = tensor(&[6, 32], 5.0);
    g.add_tensor_f32("token_embd.weight", &embd.shape, &embd.data, GgmlType::Q8_0).expect("tensor");
    let norm = tensor(&[8], 6.0);
    g.add_tensor_f32("output_norm.weight", &norm.shape, &norm.data, GgmlType::F32).expect("tensor");
    write("gguf", "llama", &g.to_bytes().expect("gguf"));
}
