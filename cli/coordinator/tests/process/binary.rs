//! Running the `covey-coordinator` binary (shared with `benches/upload_flood.rs`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Start the `covey-coordinator` binary on `config`; returns the child and its address.
pub fn spawn(config: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_covey-coordinator"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn covey-coordinator");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(addr) = line.strip_prefix("covey-coordinator listening on ") {
                sent = tx.send(addr.trim().to_owned()).is_ok();
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the coordinator did not start");
    (child, addr.parse().expect("address"))
}
