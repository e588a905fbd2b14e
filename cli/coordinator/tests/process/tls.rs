//! TLS with rustls, certificates generated at test time: mutual TLS admits a device with a
//! client certificate from the CA and refuses one without, and plaintext.

use covey_coordinator::config::TlsConfig;
use covey_coordinator::server;
use covey_proto::pb::{self, fleet_client::FleetClient};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::{self, Device};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let cert =
            CertificateParams::new(vec![name.to_owned()]).expect("params").signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    Pki { ca, server: leaf("localhost"), client: leaf("device-1") }
}

async fn enroll(channel: Channel) -> Result<pb::EnrollResponse, tonic::Status> {
    let d = Device::new();
    FleetClient::new(channel)
        .enroll(pb::EnrollRequest {
            public_key: d.key.public_key().to_vec(),
            enrollment_token: support::TOKEN.into(),
            label: "tls".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_certified_devices() {
    let root = tempfile::tempdir().expect("tmp");
    let pki = pki();
    let write = |name: &str, text: &str| {
        let p = root.path().join(name);
        std::fs::write(&p, text).expect("write pem");
        p
    };
    let mut config = support::config(root.path());
    config.tls = Some(TlsConfig {
        cert: write("server.pem", &pki.server.0),
        key: write("server.key", &pki.server.1),
        client_ca: Some(write("ca.pem", &pki.ca)),
    });
    let engine = server::open_engine(config).await.expect("engine");
    let running = server::start(engine).await.expect("start");
    let url = format!("https://127.0.0.1:{}", running.addr.port());
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca)).domain_name("localhost");

    let with_cert = Channel::from_shared(url.clone())
        .expect("url")
        .tls_config(tls.clone().identity(Identity::from_pem(&pki.client.0, &pki.client.1)))
        .expect("tls")
        .connect()
        .await
        .expect("mutual TLS connects");
    enroll(with_cert).await.expect("enrolment over mutual TLS");

    let without_cert =
        match Channel::from_shared(url.clone()).expect("url").tls_config(tls).expect("tls").connect().await {
            Ok(ch) => enroll(ch).await.map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
    assert!(without_cert.is_err(), "a client without a certificate must be refused");

    let plain =
        match Channel::from_shared(format!("http://127.0.0.1:{}", running.addr.port())).expect("url").connect().await {
            Ok(ch) => enroll(ch).await.map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
    assert!(plain.is_err(), "plaintext must be refused");
    assert_eq!(running.engine.store().devices().await.expect("devices").len(), 1);

    // The operator's CLI presents a client certificate too (before, it could not reach a
    // coordinator that requires mutual TLS).
    let admin = |with_cert: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_covey-coordinator"));
        cmd.args(["status", "--addr", &url, "--domain-name", "localhost", "--json", "--ca-cert"])
            .arg(root.path().join("ca.pem"))
            .env("COVEY_ADMIN_TOKEN", support::ADMIN);
        if with_cert {
            cmd.arg("--client-cert").arg(write("admin.pem", &pki.client.0));
            cmd.arg("--client-key").arg(write("admin.key", &pki.client.1));
        }
        cmd.output().expect("run the admin CLI")
    };
    let out = admin(true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["current_version"], 1);
    assert!(!admin(false).status.success(), "without a client certificate the CLI is refused");
    running.abort();
}
