//! constraints.available_ro_paths: a host directory the operator allows (`--allow-ro-path`)
//! is shared read-only at the same path in the guest, through real VMs under TCG; a path
//! not allowed is refused before any VM starts.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use support::cli::Env;
use support::BUSYBOX;

const SH: &str = "/nix/store/busybox";
const OUTSIDE_MARKER: &str = "HOST-FILE-OUTSIDE-THE-SHARE";

/// A shared directory that anyone may write on the host, so that only the share's
/// read-only-ness can stop the guest.
fn world_writable_dir(parent: &Path, name: &str) -> std::path::PathBuf {
    let d = parent.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn an_allowed_host_directory_is_read_only_at_the_same_path_and_keeps_its_symlinks_inside() {
    let env = Env::new();
    let host = tempfile::Builder::new()
        .prefix("tbv-ro-")
        .tempdir_in("/tmp")
        .unwrap();
    let shared = world_writable_dir(host.path(), "shared");
    std::fs::write(shared.join("file"), "host content\n").unwrap();
    std::fs::set_permissions(shared.join("file"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let sub = world_writable_dir(&shared, "sub");
    std::fs::write(sub.join("nested"), "nested content\n").unwrap();
    // Targets outside the share: a host file only reachable by following the link on the
    // host, and the host's /etc/shadow (the guest has no /etc/shadow of its own).
    let outside = world_writable_dir(host.path(), "outside");
    std::fs::write(outside.join("secret"), OUTSIDE_MARKER).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), shared.join("escape-abs")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", shared.join("escape-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", shared.join("shadow")).unwrap();
    let second = world_writable_dir(host.path(), "second");
    std::fs::write(second.join("file"), "second share\n").unwrap();
    let before = listing(&shared);

    let d = shared.to_str().unwrap();
    let d2 = second.to_str().unwrap();
    let script = format!(
        r#"B={SH}; D={d}
echo "read=$($B cat $D/file)"
echo "nested=$($B cat $D/sub/nested)"
echo "second=$($B cat {d2}/file)"
try() {{ name=$1; shift; if "$@" 2>err; then echo "BAD-$name"; else echo "refused-$name: $($B cat err)"; fi; }}
try write $B sh -c "echo guest > $D/file"
try append $B sh -c "echo guest >> $D/file"
try create $B touch $D/new
try mkdir $B mkdir $D/newdir
try chmod $B chmod 700 $D/file
try rm $B rm $D/file
try rename $B mv $D/file $D/moved
try symlink $B ln -s /x $D/link
try link $B ln $D/file $D/hard
try escape-abs $B cat $D/escape-abs
try escape-rel $B cat $D/escape-rel
try shadow $B cat $D/shadow
try dotdot $B cat $D/../outside/secret
echo "link-text=$($B readlink $D/escape-abs)"
true"#
    );
    let run = env.build(&[
        "-q",
        "--input",
        BUSYBOX,
        "--allow-ro-path",
        d,
        "--allow-ro-path",
        d2,
        "--ro-path",
        d,
        "--ro-path",
        d2,
        "--",
        SH,
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let log = &run.stderr;
    assert!(log.contains("read=host content\n"), "{log}");
    assert!(log.contains("nested=nested content\n"), "{log}");
    assert!(log.contains("second=second share\n"), "{log}");
    assert!(!log.contains("BAD-"), "the guest changed the share:\n{log}");
    for op in [
        "write", "append", "create", "mkdir", "chmod", "rm", "rename", "symlink", "link",
    ] {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("refused-{op}:")))
            .unwrap_or_else(|| panic!("no result for {op}:\n{log}"));
        assert!(
            line.contains("Read-only file system") || line.contains("Permission denied"),
            "{op} failed for another reason: {line}"
        );
    }
    for escape in ["escape-abs", "escape-rel", "shadow", "dotdot"] {
        assert!(
            log.contains(&format!("refused-{escape}:")),
            "{escape}:\n{log}"
        );
    }
    assert!(!log.contains(OUTSIDE_MARKER), "host file leaked:\n{log}");
    // The guest sees the link's text, and resolves it in its own filesystem.
    assert!(
        log.contains(&format!("link-text={}", outside.join("secret").display())),
        "{log}"
    );
    if let Ok(shadow) = std::fs::read_to_string("/etc/shadow") {
        let first = shadow.lines().next().unwrap_or_default();
        assert!(
            first.is_empty() || !log.contains(first),
            "host /etc/shadow leaked"
        );
    }

    // Nothing changed on the host.
    assert_eq!(listing(&shared), before);
    assert_eq!(
        std::fs::read_to_string(shared.join("file")).unwrap(),
        "host content\n"
    );
    let mode = std::fs::metadata(shared.join("file"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);
    env.assert_clean();
}

#[test]
fn a_path_the_host_does_not_allow_is_refused_naming_it() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = env.build(&["--input", BUSYBOX, "--ro-path", d, "--", SH, "true"]);
    run.assert_failed(
        3,
        &format!("constraints.available_ro_paths {d:?} is not allowed"),
    );
    env.assert_clean();
}

#[test]
fn only_directories_can_be_allowed() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("some-file");
    std::fs::write(&file, "x").unwrap();
    let f = file.to_str().unwrap();
    let run = env.build(&[
        "--input",
        BUSYBOX,
        "--allow-ro-path",
        f,
        "--ro-path",
        f,
        "--",
        SH,
        "true",
    ]);
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains(&format!("--allow-ro-path {f}"))
            && run.stderr.contains("not a directory"),
        "{}",
        run.stderr
    );
    env.assert_clean();
}
