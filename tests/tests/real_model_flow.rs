//! One model artifact through the whole system, as a product team's would flow: a small
//! random Llama carrying a real byte-level BPE `tokenizer.json` (trained here, at test
//! time) and a ChatML chat template, stored int8, is the coordinator's initial model;
//! four real agents train on it over loopback gRPC for three rounds with the model's own
//! tokenizer (one also on chat transcripts, through the template, learning the
//! assistant's turns), two of them at rank 4 and two at rank 8 (HetLoRA); rounds publish adapters
//! and every second one a new int4 base release; each device downloads the release once
//! and then only what changed; the agent chats with the adapted model. Corrupted artifacts are refused and nothing is cached.

use std::path::{Path, PathBuf};
use std::time::Duration;

use covey_agent::{AgentConfig, RunUntil};
use covey_coordinator::config::ReleaseQuantization;
use covey_coordinator::{CoordinatorConfig, server};
use covey_model::chat::Message;
use covey_model::{LlamaConfig, LoadedModel, Tokenizer};
use covey_proto::manifest::Manifest;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

mod common;
use common::{TOKEN, corpus};
const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) trained on `texts`, with ChatML's
/// special tokens.
fn train_bpe(texts: &[String], vocab: usize) -> HfTokenizer {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(|t| AddedToken::from(t, true)).to_vec();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = HfTokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, texts.iter()).expect("train the BPE tokenizer");
    tok
}

/// The initial model directory: random weights stored int8, `tokenizer.json`,
/// `tokenizer_config.json` with the chat template and special tokens.
fn initial_model(root: &Path, texts: &[String]) -> (PathBuf, LlamaConfig) {
    let hf = train_bpe(texts, 512);
    let vocab = hf.get_vocab_size(true);
    assert!(vocab > 300, "a real merge table, not bytes alone: {vocab} tokens");
    let config = LlamaConfig {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 128,
        vocab_size: vocab,
        max_position_embeddings: 128,
        ..LlamaConfig::default()
    };
    let raw = root.join("raw");
    let model = covey_model::Llama::init(&config, 5, &covey_model::cpu_device()).expect("init");
    covey_model::checkpoint::save_model(&model, &Tokenizer::HuggingFace(Box::new(hf)), &raw).expect("save");
    let tc = serde_json::json!({
        "chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
    });
    std::fs::write(raw.join("tokenizer_config.json"), tc.to_string()).expect("tokenizer_config.json");
    // What `covey-model quantize` writes: the same directory, weights int8.
    let mut loaded = LoadedModel::open(&raw).expect("open the model directory");
    loaded.quantize(covey_tensors::quant::Scheme::Int8).expect("quantize");
    let dir = root.join("model-int8");
    loaded.save_dir(&dir).expect("save int8");
    (dir, config)
}

/// The common test coordinator with HetLoRA ranks (devices of lesser means train rank
/// 4, the others 8), four rounds, an int4 release every second round.
fn coordinator_config(root: &Path, model: &Path) -> CoordinatorConfig {
    let mut c = common::coordinator_config(root, model);
    c.lora.rank = 8;
    c.lora.device_ranks = vec![4];
    c.lora.alpha = 16.0;
    c.rounds.max_rounds = 4;
    c.training.seq_len = 48;
    c.publish.release_every = 2;
    c.publish.quantization = ReleaseQuantization::Int4;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bpe_chat_model_federates_with_adapter_rounds_and_releases() {
    let root = tempfile::tempdir().expect("tmp");
    let parts = corpus();
    let (model_dir, config) = initial_model(root.path(), &parts);
    let tokenizer = Tokenizer::for_model_dir(&model_dir).expect("tokenizer");
    let held_out = vec![parts[4].clone()];

    let engine = server::open_engine(coordinator_config(root.path(), &model_dir)).await.expect("engine");
    let running = server::start(engine.clone()).await.expect("start");
    let url = format!("http://{}", running.addr);
    let v1 = engine.store().version(1).await.expect("v").expect("v1");
    let m1 = Manifest::verify(&v1.manifest, &v1.signature, &engine.public_key()).expect("v1");
    let tok_ref = m1.release.tokenizer.clone().expect("the release carries the tokenizer");
    assert_eq!(tok_ref.format, "tokenizer-json");
    assert_eq!(m1.release.chat_template.as_deref(), Some(CHATML));
    assert!(m1.release.special_tokens.eos.is_some());
    assert_eq!(m1.release.model.format, "safetensors-int4");

    let mut agents = Vec::new();
    let mut states = Vec::new();
    for (i, part) in parts.iter().take(4).enumerate() {
        let mut cfg = common::device_config(root.path(), i, &url, part);
        if i == 3 {
            // Assistant personalisation: chat transcripts, learned on the assistant's turns.
            let turns: Vec<String> = part
                .lines()
                .filter(|l| l.trim().len() > 20)
                .take(40)
                .collect::<Vec<_>>()
                .chunks(2)
                .filter(|c| c.len() == 2)
                .map(|c| {
                    serde_json::json!({ "messages": [
                        { "role": "user", "content": c[0].trim() },
                        { "role": "assistant", "content": c[1].trim() },
                    ]})
                    .to_string()
                })
                .collect();
            std::fs::write(cfg.data_dir.join("chat.jsonl"), turns.join("\n")).expect("write transcripts");
        }
        let state = cfg.state_dir.clone();
        if i < 2 {
            cfg.max_lora_rank = 4;
        }
        covey_agent::enroll(&cfg, TOKEN, &format!("agent-{i}")).await.expect("enrol");
        agents.push(tokio::spawn(covey_agent::run(cfg, RunUntil::Updates(4))));
        states.push(state);
    }
    for summary in common::finished(agents).await {
        assert_eq!(summary.rounds, vec![1, 2, 3, 4]);
    }
    let store = engine.store().clone();
    for _ in 0..600 {
        if store.versions().await.expect("versions").len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Versions: 1 the initial release, 2 an adapter, 3 a release (two rounds), 4 an
    // adapter, 5 a release.
    let mut manifests = Vec::new();
    for v in 1..=5 {
        let r = store.version(v).await.expect("v").expect("version");
        manifests.push(Manifest::verify(&r.manifest, &r.signature, &engine.public_key()).expect("signed"));
    }
    let kinds: Vec<(u64, bool)> = manifests.iter().map(|m| (m.release.version, m.adapter.is_some())).collect();
    assert_eq!(kinds, vec![(1, false), (1, true), (3, false), (3, true), (5, false)]);
    assert_eq!(manifests[2].release.tokenizer, m1.release.tokenizer, "a release keeps the tokenizer");

    // The held-out loss, with the model's tokenizer, on the weights devices run, falls.
    let device = covey_model::cpu_device();
    let mut losses = Vec::new();
    for v in 1..=5 {
        let (w, _) = engine.device_weights(v).await.expect("weights");
        losses
            .push(covey_model::evaluate_texts(&config, &w, &tokenizer, &held_out, 48, &device).expect("eval").mean_nll);
    }
    eprintln!("held-out NLL by version: {losses:?}");
    assert!(losses[4] < losses[0] - 0.05, "held-out loss did not fall: {losses:?}");

    // Each device downloaded version 1 whole, then only the adapter, then only the new
    // release's weights (config, tokenizer and A are cached by content), then only the
    // adapter again, as it trained on versions 1 to 4.
    let size = |m: &Manifest| m.artifacts().iter().map(|a| a.size).sum::<u64>();
    let b_size = |m: &Manifest| m.adapter.as_ref().expect("adapter").b.size;
    let expected = [size(&manifests[0]), b_size(&manifests[1]), manifests[2].release.model.size, b_size(&manifests[3])];
    let mut payloads = Vec::new();
    for state in &states {
        let history = covey_agent::run::read_history(state);
        let got: Vec<(u64, u64)> = history.iter().map(|h| (h.base_version, h.downloaded_bytes)).collect();
        let want: Vec<(u64, u64)> = (1..=4).zip(expected).collect();
        assert_eq!(got, want, "{}", state.display());
        payloads.push(history[0].payload_bytes);
    }
    // Rank-4 devices sent B of half the columns.
    assert!(payloads[0] < payloads[2] * 6 / 10 && payloads[1] == payloads[0], "{payloads:?}");
    eprintln!("bytes down per device, rounds 1-4 (whole, adapter, new release, adapter): {expected:?}");

    // The agent chats with the newest version it holds (4: release 3 and its adapter),
    // through the chat template, on the int4 engine.
    let sampling = covey_model::SamplingConfig { max_new_tokens: 12, temperature: 0.0, ..Default::default() };
    let reply =
        covey_agent::chat(&states[0], &[Message::new("user", "Who is Macbeth?")], &sampling, None).expect("chat");
    assert_eq!((reply.version, reply.release), (4, 3));
    assert!(reply.new_tokens > 0 && reply.prompt_tokens > 5, "{reply:?}");
    let generated = covey_agent::generate(&states[0], "MACBETH.", &sampling, None).expect("generate");
    assert!(generated.new_tokens > 0, "{generated:?}");

    // The adapter exports as a llama.cpp LoRA GGUF, and its release as the base GGUF.
    let (adapter_gguf, base_gguf) = (root.path().join("adapter.gguf"), root.path().join("base.gguf"));
    let e = covey_agent::export_adapter(&states[0], &adapter_gguf, Some(&base_gguf)).expect("export");
    assert_eq!((e.version, e.release, e.rounds, e.rank), (4, 3, 1, 8));
    let base = LoadedModel::open(&base_gguf).expect("the base GGUF loads");
    assert_eq!(base.tokenizer.encode("MACBETH.").expect("encode"), tokenizer.encode("MACBETH.").expect("encode"));

    // A tokenizer whose bytes do not match the manifest is refused, and nothing is cached.
    let blob = root.path().join("coordinator/artifacts").join(&tok_ref.sha256);
    let mut bytes = std::fs::read(&blob).expect("blob");
    bytes[10] ^= 1;
    std::fs::write(&blob, &bytes).expect("corrupt the tokenizer");
    let state = root.path().join("agent-late");
    let mut cfg = AgentConfig::new(state.clone(), root.path().join("data-0"));
    cfg.coordinator = Some(url.clone());
    cfg.backoff.max_attempts = 2;
    cfg.max_task_failures = Some(1);
    cfg.max_poll_wait = Duration::from_millis(200);
    covey_agent::enroll(&cfg, TOKEN, "late").await.expect("enrol");
    let client = covey_agent::CoordinatorClient::connect(&url, &cfg).expect("client");
    let identity = covey_agent::Identity::load(&state).expect("identity");
    let err = client
        .fetch_artifact(&identity, &tok_ref.sha256_bytes().expect("hash"), Some(tok_ref.size), 1 << 30)
        .await
        .expect_err("a corrupted tokenizer");
    assert!(
        matches!(err, covey_agent::AgentError::ArtifactMismatch { .. }) || err.code() == Some(tonic::Code::DataLoss),
        "{err}"
    );
    assert!(covey_agent::status(&state).expect("status").cached_versions.is_empty());
    running.abort();
}

/// The same flow with the real GGUF as the initial model: the coordinator imports it
/// (tokenizer and chat template into the manifest), one agent trains one short round on
/// it with the model's tokenizer, the round publishes an adapter of its own size, and the
/// agent chats, with the model's chat template, on the int8 release it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smollm2_gguf_federates_when_present() {
    let Some(gguf) = common::smollm2() else { return };
    let root = tempfile::tempdir().expect("tmp");
    let mut c = coordinator_config(root.path(), &gguf);
    c.lora.rank = 4;
    c.lora.device_ranks = vec![];
    c.lora.alpha = 8.0;
    c.lora.targets = vec!["q_proj".into(), "v_proj".into()];
    c.rounds.target_updates = 1;
    c.rounds.min_updates = 1;
    c.rounds.min_available = 1;
    c.rounds.max_rounds = 1;
    c.training.steps = 1;
    c.training.batch_size = 1;
    c.training.seq_len = 16;
    c.publish.quantization = ReleaseQuantization::Int8;
    let engine = server::open_engine(c).await.expect("engine imports the GGUF");
    let running = server::start(engine.clone()).await.expect("start");
    let v1 = engine.store().version(1).await.expect("v").expect("v1");
    let m1 = Manifest::verify(&v1.manifest, &v1.signature, &engine.public_key()).expect("v1");
    assert!(m1.release.tokenizer.is_some() && m1.release.chat_template.is_some());
    assert!(m1.release.model.chunks.len() > 100, "a 135 MB release is listed piece by piece");

    let data = root.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("local.txt"), &corpus()[0]).expect("write data");
    let state = root.path().join("agent");
    let mut cfg = AgentConfig::new(state.clone(), data);
    cfg.coordinator = Some(format!("http://{}", running.addr));
    cfg.max_poll_wait = Duration::from_millis(300);
    covey_agent::enroll(&cfg, TOKEN, "smollm2").await.expect("enrol");
    let summary = tokio::time::timeout(Duration::from_secs(900), covey_agent::run(cfg, RunUntil::Updates(1)))
        .await
        .expect("the agent finishes")
        .expect("run");
    assert_eq!(summary.rounds, vec![1]);
    for _ in 0..600 {
        if engine.store().versions().await.expect("versions").len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v2 = engine.store().version(2).await.expect("v").expect("v2");
    let m2 = Manifest::verify(&v2.manifest, &v2.signature, &engine.public_key()).expect("v2");
    let adapter = m2.adapter.expect("an adapter version");
    // f32 B of q (576 × 4) and v (192 × 4) over 30 layers, plus the safetensors header.
    assert!(adapter.b.size > 30 * (576 + 192) * 4 * 4 && adapter.b.size < 400_000, "{}", adapter.b.size);
    let history = covey_agent::run::read_history(&state);
    assert_eq!(history[0].downloaded_bytes, m1.artifacts().iter().map(|a| a.size).sum::<u64>());
    assert!(history[0].peak_rss_bytes.is_some_and(|b| b > 100 << 20));
    running.abort();

    // The agent holds the version it trained on (1: the int8 release of the GGUF).
    let sampling = covey_model::SamplingConfig { max_new_tokens: 8, temperature: 0.0, ..Default::default() };
    let reply = covey_agent::chat(&state, &[Message::new("user", "What is the capital of France?")], &sampling, None)
        .expect("chat");
    eprintln!("SmolLM2 via the agent: {reply:?}");
    assert!(reply.text.contains("Paris"), "{reply:?}");
}

/// covey-sim on a real (BPE) model in process: the experiment's model directory brings
/// its tokenizer, every client trains with it as an agent would, and the federated
/// adapter lowers the held-out perplexity of Hamlet's roles.
#[test]
fn covey_sim_federates_a_bpe_model_in_process() {
    let root = tempfile::tempdir().expect("tmp");
    let (model_dir, config) = initial_model(root.path(), &corpus());
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare");
    let toml = format!(
        r#"
name = "bpe-in-process"
mode = "in-process"
[model]
base = {model:?}
[data]
source = "leaf-shakespeare"
path = {data:?}
eval-bytes = 4000
[data.leaf]
plays = ["hamlet"]
max-clients = 4
[lora]
rank = 4
alpha = 8.0
targets = ["q_proj", "v_proj", "down_proj"]
[training]
steps = 6
batch-size = 2
seq-len = 32
learning-rate = 3e-2
[rounds]
rounds = 2
clients-per-round = 4
parallel = 2
[privacy]
clip-norm = 0.0
"#,
        model = model_dir.display().to_string(),
        data = data.display().to_string(),
    );
    let exp = covey_sim::config::Experiment::from_toml(&toml, Path::new("bpe.toml")).expect("experiment");
    let prepared = covey_sim::prepare::prepare(&exp).expect("prepare");
    assert_eq!(prepared.tokenizer.vocab_size(), config.vocab_size, "the model's BPE tokenizer, not bytes");
    assert!(prepared.tokenizer_config_json.is_some());
    let report = covey_sim::runner::run(&prepared, &covey_sim::progress::Silent).expect("run");
    let s = &report.summary;
    assert_eq!(s.rounds, 2);
    assert!(s.final_perplexity < s.baseline_perplexity, "{} -> {}", s.baseline_perplexity, s.final_perplexity);
}

/// A device whose memory fits a rank-4 task but not a rank-8 one: its first task (rank
/// 8: it has stated no cap yet) is declined with the reason recorded, and from then on it
/// asks for the rank its memory allows, gets rank-4 tasks and trains them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rank_a_device_asks_for_follows_from_its_memory_budget() {
    let root = tempfile::tempdir().expect("tmp");
    let parts = corpus();
    let (model_dir, config) = initial_model(root.path(), &parts);
    // The twin's coordinator (rank 8, rank 4 allowed), with rounds of this one device.
    let mut c = coordinator_config(root.path(), &model_dir);
    c.rounds.target_updates = 1;
    c.rounds.min_updates = 1;
    c.rounds.min_available = 1;
    let training = covey_proto::task::TrainingSpec {
        steps: c.training.steps as usize,
        batch_size: c.training.batch_size as usize,
        seq_len: c.training.seq_len as usize,
        learning_rate: f64::from(c.training.learning_rate),
        proximal_mu: 0.0,
        seed: 0,
        update_encoding: Default::default(),
    };
    let targets: Vec<covey_model::LoraTarget> =
        c.lora.targets.iter().map(|t| covey_model::LoraTarget::parse(t).expect("target")).collect();
    let engine = server::open_engine(c).await.expect("engine");
    let running = server::start(engine.clone()).await.expect("start");
    let url = format!("http://{}", running.addr);
    let v1 = engine.store().version(1).await.expect("v").expect("v1");
    let m1 = Manifest::verify(&v1.manifest, &v1.signature, &engine.public_key()).expect("v1");
    let release = m1.release.model.size;
    // Exactly what a rank-4 task needs: rank 8 does not fit, rank 4 does.
    let limit = covey_agent::budget::task_memory_bytes(&config, release, &training, 4, &targets);
    assert!(covey_agent::budget::task_memory_bytes(&config, release, &training, 8, &targets) > limit);
    let mut cfg = common::device_config(root.path(), 0, &url, &parts[0]);
    cfg.max_memory_bytes = Some(limit);
    covey_agent::enroll(&cfg, TOKEN, "small-device").await.expect("enrol");
    let state = cfg.state_dir.clone();
    let summary = tokio::time::timeout(Duration::from_secs(600), covey_agent::run(cfg, RunUntil::Updates(1)))
        .await
        .expect("the agent finishes")
        .expect("run");
    assert_eq!((summary.declined, summary.submitted), (1, 1), "{summary:?}");
    // The accepted update is a rank-4 B: half the bytes of a rank-8 one.
    let history = std::fs::read_to_string(state.join("history.jsonl")).expect("history");
    let entry: serde_json::Value = serde_json::from_str(history.lines().last().expect("a line")).expect("json");
    let payload = entry["payload_bytes"].as_u64().expect("payload bytes");
    let rank8: usize = targets.iter().map(|&t| config.lora_dims(t).1 * 8 * 4).sum::<usize>() * config.num_hidden_layers;
    assert!((payload as usize) < rank8 * 6 / 10, "{payload} bytes against {rank8} for rank 8");
    running.abort();
}
