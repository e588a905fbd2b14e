//! Everything `covey-coordinator serve` starts: state, key, engine, round driver, gRPC
//! (with rustls TLS when configured) and `/metrics`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use covey_proto::keys::KeyPair;
use covey_proto::pb::{admin_server::AdminServer, fleet_server::FleetServer};
use covey_proto::{MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES};
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{error, info};

use crate::artifacts::Artifacts;
use crate::config::CoordinatorConfig;
use crate::engine::Coordinator;
use crate::error::{CoordinatorError, Result};
use crate::metrics::{self, Metrics};
use crate::service::{AdminService, FleetService, admin_interceptor};
use crate::store::SqliteStore;

/// Load the coordinator key from `path`, creating it (owner-only permissions) if absent.
pub fn load_or_create_key(path: &Path) -> Result<KeyPair> {
    match std::fs::read(path) {
        Ok(bytes) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path).map_err(|e| CoordinatorError::io(path, e))?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(CoordinatorError::Config {
                        field: "coordinator.key".into(),
                        reason: format!(
                            "{} is readable by others (mode {:o}); `chmod 600` it",
                            path.display(),
                            mode & 0o777
                        ),
                    });
                }
            }
            Ok(KeyPair::from_pkcs8(&bytes)?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate()?;
            write_secret(path, key.pkcs8())?;
            info!("generated the coordinator key {}", path.display());
            Ok(key)
        }
        Err(e) => Err(CoordinatorError::io(path, e)),
    }
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(|e| CoordinatorError::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| CoordinatorError::io(path, e))
}

/// Open the embedded default state (SQLite + artifact directory + key) under
/// `config.state_dir` and build the engine.
pub async fn open_engine(config: CoordinatorConfig) -> Result<Arc<Coordinator>> {
    let dir = config.state_dir.clone();
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(&dir).map_err(|e| CoordinatorError::io(&dir, e))?;
    // One coordinator per state directory: a second one's start-up repair would delete
    // the first one's uploads in flight. Held for the engine's life; the operating system
    // releases it when the process ends, however it ends.
    let lock = lock_state_dir(&dir)?;
    let store = SqliteStore::open(&dir.join("state.sqlite")).await?;
    let artifacts = Artifacts::dir(&dir.join("artifacts"))?;
    let key = load_or_create_key(&dir.join("coordinator.key"))?;
    let engine = Coordinator::open(config, Arc::new(store), artifacts, key, Arc::new(Metrics::default())).await?;
    engine.hold_state_lock(lock);
    Ok(engine)
}

/// The file a running coordinator locks in its state directory.
pub const LOCK_FILE: &str = "coordinator.lock";

/// Take the exclusive lock on `dir/coordinator.lock`, or fail with
/// [`CoordinatorError::StateLocked`] when another process holds it.
fn lock_state_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| CoordinatorError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(CoordinatorError::StateLocked { state_dir: dir.to_owned() }),
        Err(std::fs::TryLockError::Error(e)) => Err(CoordinatorError::io(&path, e)),
    }
}

/// A running coordinator.
#[derive(Debug)]
pub struct Running {
    /// gRPC address.
    pub addr: SocketAddr,
    /// `/metrics` address, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The engine.
    pub engine: Arc<Coordinator>,
    /// The gRPC server task.
    pub server: JoinHandle<Result<()>>,
    /// The round driver task.
    pub rounds: JoinHandle<Result<()>>,
}

impl Running {
    /// Stop serving.
    pub fn abort(&self) {
        self.server.abort();
        self.rounds.abort();
    }
}

/// Start serving `engine` on `config.listen` (port 0 picks one).
pub async fn start(engine: Arc<Coordinator>) -> Result<Running> {
    let config = engine.config().clone();
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|e| CoordinatorError::io(Path::new("listen"), e))?;
    let addr = listener.local_addr().map_err(|e| CoordinatorError::io(Path::new("listen"), e))?;
    let metrics_addr = match config.metrics_listen {
        Some(a) => {
            let l = metrics::bind(a).await.map_err(|e| CoordinatorError::io(Path::new("metrics-listen"), e))?;
            let bound = l.local_addr().ok();
            let m = engine.metrics().clone();
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(m, l).await {
                    error!("metrics endpoint stopped: {e}");
                }
            });
            bound
        }
        None => None,
    };
    let limits = &config.limits;
    let mut builder = Server::builder()
        .timeout(limits.request_timeout)
        .concurrency_limit_per_connection(limits.max_streams_per_connection as usize)
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .initial_stream_window_size(Some(256 << 10))
        .initial_connection_window_size(Some(1 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    if config.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving plaintext beyond loopback: tokens, tasks and models travel unencrypted; configure [tls]");
    }
    if let Some(tls) = &config.tls {
        let read = |p: &Path| std::fs::read(p).map_err(|e| CoordinatorError::io(p, e));
        let mut t = ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        if let Some(ca) = &tls.client_ca {
            t = t.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder.tls_config(t)?;
    }
    let fleet = FleetServer::new(FleetService::new(engine.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = tonic::service::interceptor::InterceptedService::new(
        AdminServer::new(AdminService::new(engine.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        admin_interceptor(config.admin.token.clone()),
    );
    let router = builder.add_service(fleet).add_service(admin);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server =
        tokio::spawn(async move { router.serve_with_incoming(incoming).await.map_err(CoordinatorError::from) });
    let rounds = tokio::spawn(engine.clone().run_rounds());
    info!(%addr, tls = config.tls.is_some(), "serving covey.v1");
    Ok(Running { addr, metrics_addr, engine, server, rounds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinator_key_is_owner_only_and_refused_otherwise() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("coordinator.key");
        let key = load_or_create_key(&path).expect("created");
        assert_eq!(load_or_create_key(&path).expect("reloaded").public_key(), key.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "created owner-only");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let err = load_or_create_key(&path).expect_err("readable by others");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }
}
