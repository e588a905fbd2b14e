//! The bodies of Covey's fuzz targets: every decoder that sees bytes from outside the
//! process. Each function must return (never panic, never abort, never allocate beyond
//! what its input justifies) on any input; `fuzz_targets/*.rs` hand them to libFuzzer, and
//! `tests/tests/fuzz_corpora.rs` replays the committed corpora through them on the stable toolchain.

use prost::Message;

use covey_proto::pb;

/// Every protobuf message of the `Fleet` and `Admin` services, as the coordinator (requests)
/// and the agent (responses) decode them, then the checks each side runs next. The first
/// byte picks the message.
pub fn fleet_messages(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 12 {
        0 => drop(pb::EnrollRequest::decode(bytes)),
        1 => drop(pb::PollTaskRequest::decode(bytes)),
        2 => drop(pb::GetManifestRequest::decode(bytes)),
        3 => drop(pb::FetchArtifactRequest::decode(bytes)),
        4 => {
            if let Ok(pb::UpdateChunk { part: Some(pb::update_chunk::Part::Header(h)) }) =
                pb::UpdateChunk::decode(bytes)
            {
                let _ = covey_proto::signing::UpdateHeader::parse(&h.signed_header);
            }
        }
        5 => drop(pb::HeartbeatRequest::decode(bytes)),
        6 => drop(pb::DeclineTaskRequest::decode(bytes)),
        7 => {
            // The agent's side of a poll: the task it would train.
            if let Ok(pb::PollTaskResponse { outcome: Some(pb::poll_task_response::Outcome::Task(t)) }) =
                pb::PollTaskResponse::decode(bytes)
            {
                let _ = covey_proto::task::Task::try_from(&t);
                if let Ok(binding) = covey_proto::signing::TaskBinding::of_task([7; 32], &t) {
                    let _ = binding.to_bytes();
                }
            }
        }
        8 => {
            if let Ok(m) = pb::SignedManifest::decode(bytes) {
                let _ = covey_proto::manifest::Manifest::parse(&m.manifest);
            }
        }
        9 => drop(pb::ArtifactChunk::decode(bytes)),
        10 => drop(pb::EnrollResponse::decode(bytes)),
        _ => drop(pb::StatusResponse::decode(bytes)),
    }
}

/// The fixed-layout signed update header.
pub fn update_header(data: &[u8]) {
    let _ = covey_proto::signing::UpdateHeader::parse(data);
}

/// An update payload (safetensors of the `B` factors: f32, or int8 / int4 codes with
/// scales), decoded as the coordinator's intake does, then its norm and finiteness.
pub fn update_payload(data: &[u8]) {
    if let Ok((tensors, _)) = covey_tensors::compress::decode_update(data) {
        let _ = covey_tensors::global_norm(&tensors);
        let _ = tensors.values().all(|t| t.is_finite());
    }
    if let Ok((tensors, _)) = covey_tensors::decode(data) {
        let _ = covey_tensors::global_norm(&tensors);
    }
}

/// Release weights as the agent reads them: f32, int8 or int4 safetensors, kept quantized
/// and then dequantized.
pub fn stored_weights(data: &[u8]) {
    if let Ok((stored, _)) = covey_tensors::quant::decode_stored(data) {
        for t in stored.values() {
            let _ = t.to_f32();
        }
    }
}

/// A manifest document (its signature is checked before the parse, so an attacker who can
/// reach the parse holds the coordinator's key; fuzzed all the same).
pub fn manifest(data: &[u8]) {
    let _ = covey_proto::manifest::Manifest::parse(data);
}

/// A GGUF file: the header, metadata and tensor table, then what `covey-model import`
/// reads from them (the Llama config, the tokenizer) and every tensor dequantized.
pub fn gguf(data: &[u8]) {
    let Ok(file) = covey_gguf::GgufFile::from_bytes(data.to_vec()) else { return };
    let path = std::path::Path::new("fuzz.gguf");
    let _ = covey_artifact::gguf_import::config_from_gguf(&file, path);
    let _ = covey_artifact::gguf_import::tokenizer_from_gguf(&file, path);
    for info in &file.tensors {
        // Tensors are bounded by the file's length, so this allocates in proportion to it.
        let _ = file.tensor_f32(&info.name);
    }
}

/// A Hugging Face `tokenizer.json`, then an encode and decode with it.
pub fn tokenizer(data: &[u8]) {
    if let Ok(t) = covey_artifact::tokenizer::Tokenizer::from_json_bytes(data, "fuzz")
        && let Ok(ids) = t.encode("To be, or not to be: that is the question.")
    {
        let _ = t.decode(&ids);
    }
}

/// The coordinator's TOML configuration, parsed and validated.
pub fn coordinator_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = covey_coordinator::config::CoordinatorConfig::from_toml(text);
    }
}

/// The device agent's TOML configuration (`agent.toml`), parsed and validated.
pub fn agent_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = covey_settings::AgentConfig::from_toml_str(text);
    }
}

/// `covey-sim`'s experiment files, parsed and validated: the simulation's (with the
/// coordinator's checks of the sections the two share) and the fleet's (which embeds a
/// coordinator's and an agent's configuration, both checked).
pub fn experiment(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let origin = std::path::Path::new("fuzz.toml");
        let _ = covey_experiment::Experiment::from_toml(text, origin);
        if let Ok(fleet) = covey_experiment::FleetExperiment::from_toml(text, origin) {
            let _ = fleet.coordinator_config(std::path::Path::new("work"), 7443, "token");
        }
    }
}
