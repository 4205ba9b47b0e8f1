//! `tvix-build-vm initrd`: a deterministic newc archive with the agent as /init.

use std::process::Command;

fn initrd(agent: &str, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tvix-build-vm"))
        .args(["initrd", "--agent", agent, "--out"])
        .arg(out)
        .env_remove("TVIX_BUILD_VM_AGENT")
        .output()
        .expect("running tvix-build-vm initrd")
}

#[test]
fn writes_the_same_newc_archive_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.cpio"), dir.path().join("b.cpio"));
    for out in [&a, &b] {
        let run = initrd("/bin/busybox", out);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let bytes = std::fs::read(&a).unwrap();
    assert!(bytes.starts_with(b"070701"), "not a newc archive");
    assert!(bytes.windows(5).any(|w| w == b"init\0"), "no /init entry");
    assert!(bytes.windows(11).any(|w| w == b"TRAILER!!!\0"));
    assert_eq!(bytes, std::fs::read(&b).unwrap(), "not deterministic");
}

#[test]
fn a_missing_agent_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.cpio");
    let run = initrd("/nonexistent/agent", &out);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("/nonexistent/agent"));
    assert!(!out.exists(), "nothing is written on failure");
}
