//! The least privilege the daemon takes on cheaply. Must run while the process is still
//! single-threaded: capabilities are per thread, and threads inherit them when spawned.
//!
//! Done: no new privileges (no setuid/file-capability gains via exec), every capability
//! dropped (effective, permitted, inheritable; also the bounding set when allowed), no core
//! dumps (they would hold guest-visible content), and an fd limit just above what the
//! handle cap needs. The daemon opens no file for writing except its socket and an
//! anonymous staging memfd.
//!
//! Not done (would need more than a few syscalls, or would break a castore backend): a
//! seccomp filter (virtiofsd's allowlist is for its passthrough fs and is compiled out
//! here), mount/network/user namespaces or a chroot (a gRPC castore needs the network and
//! a local one its directory).

use nix::sys::resource::{getrlimit, setrlimit, Resource};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    #[error("cannot drop capabilities")]
    Capabilities(#[source] capng::Error),
    #[error("cannot read or set resource limit {resource}")]
    Rlimit {
        resource: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("the daemon needs {needed} file descriptors, but the hard limit is {hard}")]
    TooFewFds { needed: u64, hard: u64 },
}

/// Applies the restrictions above; `fds` is the RLIMIT_NOFILE soft limit to set.
pub fn restrict(fds: u64) -> Result<(), SandboxError> {
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    drop_capabilities()?;
    let rlimit = |resource: &'static str| move |source| SandboxError::Rlimit { resource, source };
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(rlimit("RLIMIT_CORE"))?;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(rlimit("RLIMIT_NOFILE"))?;
    if hard < fds {
        return Err(SandboxError::TooFewFds { needed: fds, hard });
    }
    setrlimit(Resource::RLIMIT_NOFILE, fds, hard).map_err(rlimit("RLIMIT_NOFILE"))?;
    Ok(())
}

fn drop_capabilities() -> Result<(), SandboxError> {
    capng::get_caps_process().map_err(SandboxError::Capabilities)?;
    if matches!(
        capng::have_capabilities(capng::Set::BOTH),
        Ok(capng::HaveCapsResult::NONE)
    ) {
        return Ok(());
    }
    // The bounding set can only shrink with CAP_SETPCAP; try it first, while that is still
    // held, and carry on without it if not permitted.
    capng::clear(capng::Set::BOUNDS);
    if capng::apply(capng::Set::BOUNDS).is_err() {
        tracing::debug!("cannot clear the capability bounding set");
    }
    capng::clear(capng::Set::BOTH);
    capng::apply(capng::Set::BOTH).map_err(SandboxError::Capabilities)
}
