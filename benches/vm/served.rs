//! A `tvix-build-vm serve` child on a unix socket with the embedded store: one host, as a
//! client reaches it (sections 8 and 19).

use crate::setup::{Env, TRIVIAL_MEMORY_MIB};
use anyhow::{bail, Context};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// A `serve` child, killed when dropped.
pub struct Served {
    _child: tokio::process::Child,
    pub channel: Channel,
}

/// Starts `serve` with its store, runtime directory and socket under scratch directories
/// named after `name`, and waits until it listens.
pub async fn serve(env: &Env, name: &str) -> anyhow::Result<Served> {
    let sock = env.scratch(&format!("{name}-serve"))?.join("s.sock");
    let child = tokio::process::Command::new(&env.cli)
        .arg("serve")
        .arg("--store")
        .arg(env.scratch(&format!("{name}-store"))?)
        .arg("--runtime-dir")
        .arg(env.scratch(&format!("{name}-rt"))?)
        .arg("--kernel")
        .arg(&env.kernel)
        .arg("--agent")
        .arg(&env.agent)
        .args(["--vm-memory", &format!("{TRIVIAL_MEMORY_MIB}M")])
        .args(["--boot-timeout", "120s", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting tvix-build-vm serve")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::UnixStream::connect(&sock).await.is_err() {
        if Instant::now() > deadline {
            bail!("tvix-build-vm serve did not listen on {}", sock.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel = Endpoint::from_shared(format!("unix://{}", sock.display()))?.connect_lazy();
    Ok(Served {
        _child: child,
        channel,
    })
}
