//! The local `serve` that concurrent `nix-builder` processes share: started once on first use
//! by whichever gets there first, found by the others, outside their process group, and
//! replaced when it died.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::Pid;
use std::os::unix::net::UnixStream;
use std::path::Path;
use tvix_build_vm::nix::local_serve::LocalServe;

const PROGRAM: &str = env!("CARGO_BIN_EXE_tvix-build-vm");

/// The pid of the process serving `socket`.
fn server_pid(socket: &Path) -> Pid {
    let stream = UnixStream::connect(socket).unwrap();
    Pid::from_raw(getsockopt(&stream, PeerCredentials).unwrap().pid())
}

/// Kills the server we started.
struct Stop(Pid);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
    }
}

#[test]
fn concurrent_first_uses_start_one_server_outside_our_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalServe::new(&dir.path().join("state"));
    let sockets: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| local.ensure(Path::new(PROGRAM), &[]).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(sockets.iter().all(|s| *s == local.socket()), "{sockets:?}");
    let pid = server_pid(&local.socket());
    let _stop = Stop(pid);
    assert_ne!(pid, nix::unistd::getpid());

    // One server was started: the log holds one start-up.
    let log = std::fs::read_to_string(local.log_path()).unwrap();
    let starts = log.matches("serving listen=").count();
    assert_eq!(starts, 1, "servers that started:\n{log}");

    // Its own session and process group: Nix's SIGKILL of ours does not reach it.
    let sid = nix::unistd::getsid(Some(pid)).unwrap();
    assert_eq!(sid, pid, "the server leads a session of its own");
    assert_ne!(
        nix::unistd::getpgid(Some(pid)).unwrap(),
        nix::unistd::getpgrp()
    );

    // A later use finds it without starting another.
    assert_eq!(
        local.ensure(Path::new(PROGRAM), &[]).unwrap(),
        local.socket()
    );
    assert_eq!(server_pid(&local.socket()), pid);

    // A dead server (its socket left behind) is replaced.
    kill(pid, Signal::SIGKILL).unwrap();
    // It is this test process's child (the spawning thread ran here): reap it.
    nix::sys::wait::waitpid(pid, None).unwrap();
    assert!(local.socket().exists(), "the stale socket stays behind");
    local.ensure(Path::new(PROGRAM), &[]).unwrap();
    let pid2 = server_pid(&local.socket());
    let _stop2 = Stop(pid2);
    assert_ne!(pid2, pid);
}

#[test]
fn a_server_that_cannot_start_is_reported_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalServe::new(&dir.path().join("state"));
    let err = local
        .ensure(Path::new(PROGRAM), &["--no-such-flag".into()])
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("exited"), "{msg}");
    assert!(msg.contains("--no-such-flag"), "{msg}");
}
