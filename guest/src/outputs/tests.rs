use super::*;
use std::os::unix::fs::{symlink, PermissionsExt};
use tvix_build_vm_agent::proto::FileChunk;

fn p(s: &str) -> GuestPath {
    GuestPath::parse("test", s).unwrap()
}

fn root_fd(dir: &std::path::Path) -> OwnedFd {
    nix::fcntl::open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
}

fn start(index: u32, missing: bool) -> Msg {
    Msg::OutputStart(OutputStart { index, missing })
}
fn dir(name: &[u8]) -> Msg {
    Msg::Entry(Entry {
        name: name.to_vec(),
        kind: EntryKind::Directory as i32,
        ..Default::default()
    })
}
fn file(name: &[u8], size: u64, executable: bool) -> Msg {
    Msg::Entry(Entry {
        name: name.to_vec(),
        kind: EntryKind::File as i32,
        executable,
        size,
        ..Default::default()
    })
}
fn link(name: &[u8], target: &[u8]) -> Msg {
    Msg::Entry(Entry {
        name: name.to_vec(),
        kind: EntryKind::Symlink as i32,
        target: target.to_vec(),
        ..Default::default()
    })
}
fn chunk(data: &[u8]) -> Msg {
    Msg::FileChunk(FileChunk {
        data: data.to_vec(),
    })
}
fn end() -> Msg {
    Msg::DirectoryEnd(DirectoryEnd {})
}

#[test]
fn tree_is_preorder_sorted_by_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nix/store/abc-out");
    std::fs::create_dir_all(out.join("bin")).unwrap();
    std::fs::create_dir_all(out.join("empty")).unwrap();
    std::fs::write(out.join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        out.join("bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(out.join("B"), b"").unwrap();
    std::fs::write(out.join("a"), b"x").unwrap();
    std::fs::write(out.join("\u{e9}"), b"e").unwrap(); // 0xc3 0xa9 sorts after ASCII
    symlink("/nix/store/abc-out/a", out.join("link")).unwrap();
    // A symlink pointing out of the sandbox is sent, not followed.
    symlink("/etc/passwd", out.join("escape")).unwrap();

    let root = root_fd(tmp.path());
    let mut msgs: Vec<Msg> = Vec::new();
    send_output(root.as_fd(), 3, &p("/nix/store/abc-out"), &mut msgs).unwrap();
    assert_eq!(
        msgs,
        vec![
            start(3, false),
            dir(b""),
            file(b"B", 0, false),
            file(b"a", 1, false),
            chunk(b"x"),
            dir(b"bin"),
            file(b"hello", 18, true),
            chunk(b"#!/bin/sh\necho hi\n"),
            end(),
            dir(b"empty"),
            end(),
            link(b"escape", b"/etc/passwd"),
            link(b"link", b"/nix/store/abc-out/a"),
            file("\u{e9}".as_bytes(), 1, false),
            chunk(b"e"),
            end(),
        ]
    );
}

#[test]
fn single_file_and_symlink_roots_have_empty_names() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"data").unwrap();
    symlink("f", tmp.path().join("l")).unwrap();
    let root = root_fd(tmp.path());
    let mut msgs: Vec<Msg> = Vec::new();
    send_output(root.as_fd(), 0, &p("/f"), &mut msgs).unwrap();
    send_output(root.as_fd(), 1, &p("/l"), &mut msgs).unwrap();
    assert_eq!(
        msgs,
        vec![
            start(0, false),
            file(b"", 4, false),
            chunk(b"data"),
            start(1, false),
            link(b"", b"f"),
        ]
    );
}

#[test]
fn large_files_come_in_exact_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let len = 2 * FILE_CHUNK_BYTES + 5;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(tmp.path().join("big"), &data).unwrap();
    let root = root_fd(tmp.path());
    let mut msgs: Vec<Msg> = Vec::new();
    send_output(root.as_fd(), 0, &p("/big"), &mut msgs).unwrap();
    assert_eq!(msgs.len(), 5);
    assert_eq!(msgs[1], file(b"", len as u64, false));
    assert_eq!(msgs[2], chunk(&data[..FILE_CHUNK_BYTES]));
    assert_eq!(
        msgs[3],
        chunk(&data[FILE_CHUNK_BYTES..2 * FILE_CHUNK_BYTES])
    );
    assert_eq!(msgs[4], chunk(&data[2 * FILE_CHUNK_BYTES..]));
}

#[test]
fn missing_outputs_and_non_files_at_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    nix::unistd::mkfifo(&tmp.path().join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    std::fs::write(tmp.path().join("file"), b"").unwrap();
    let root = root_fd(tmp.path());
    let mut msgs: Vec<Msg> = Vec::new();
    send_output(root.as_fd(), 0, &p("/nope"), &mut msgs).unwrap();
    send_output(root.as_fd(), 1, &p("/nope/deeper"), &mut msgs).unwrap();
    send_output(root.as_fd(), 2, &p("/file/below-a-file"), &mut msgs).unwrap();
    send_output(root.as_fd(), 3, &p("/fifo"), &mut msgs).unwrap();
    assert_eq!(
        msgs,
        vec![
            start(0, true),
            start(1, true),
            start(2, true),
            start(3, true)
        ]
    );
}

#[test]
fn a_fifo_inside_an_output_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("out/sub")).unwrap();
    nix::unistd::mkfifo(
        &tmp.path().join("out/sub/pipe"),
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let root = root_fd(tmp.path());
    let mut msgs: Vec<Msg> = Vec::new();
    let err = send_output(root.as_fd(), 0, &p("/out"), &mut msgs).unwrap_err();
    assert!(
        matches!(&err, OutputError::Special { path, kind: "FIFO" } if path == "/out/sub/pipe"),
        "{err:?}"
    );
}

#[test]
fn paths_resolve_inside_the_root() {
    // An absolute symlink on the way to an output resolves against the sandbox root, not
    // against the agent's /.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("real")).unwrap();
    std::fs::write(tmp.path().join("real/passwd"), b"inside").unwrap();
    symlink("/real", tmp.path().join("etc")).unwrap();
    let root = root_fd(tmp.path());
    let mut msgs: Vec<Msg> = Vec::new();
    send_output(root.as_fd(), 0, &p("/etc/passwd"), &mut msgs).unwrap();
    assert_eq!(
        msgs,
        vec![start(0, false), file(b"", 6, false), chunk(b"inside")]
    );
}
