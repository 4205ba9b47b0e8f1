//! `tvix-build-vm nix-builder` refuses a bad build.json at the edge: a message on stderr
//! (which Nix shows), exit code 2, no server started, nothing imported, nothing written to
//! the store or the state dir. (The refusals' reasons are unit-tested in src/nix/tests.rs;
//! this checks what the program does with them.)

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::path::Path;
use support::cli::bin;

const TWO_OUTPUTS: &str = include_str!("../src/nix/testdata/build-two-outputs.json");

/// Every file under `dir` with its size, sorted: what "nothing written" is checked against.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            out.push((e.path().display().to_string(), meta.len()));
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn bad_build_json_is_refused_with_a_message_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let tmp = dir.path().join("top/build");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut good: serde_json::Value = serde_json::from_str(TWO_OUTPUTS).unwrap();
    good["realStoreDir"] = store.to_str().unwrap().into();
    good["tmpDir"] = tmp.to_str().unwrap().into();
    good["topTmpDir"] = dir.path().join("top").to_str().unwrap().into();
    // The input exists, and one output is already there.
    let input = good["inputPaths"][0].as_str().unwrap().to_owned();
    let input_base = input.rsplit('/').next().unwrap();
    std::fs::create_dir_all(store.join(input_base)).unwrap();
    std::fs::write(store.join(input_base).join("busybox"), b"not really").unwrap();

    let out_base = good["outputs"]["out"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let mut v = good.clone();
    v["version"] = 2.into();
    cases.push(("version", v.to_string(), "version"));
    cases.push(("malformed", "{\"version\":1,".into(), "build.json"));
    let mut v = good.clone();
    v["inputPaths"][0] = "/etc/passwd".into();
    cases.push(("outside", v.to_string(), "not inside the store dir"));
    let mut v = good.clone();
    v["builder"] = "/bin/sh".into();
    cases.push((
        "builder",
        v.to_string(),
        "not inside any of the input paths",
    ));
    cases.push(("existing", good.to_string(), "already exists"));

    let state = dir.path().join("state");
    for (what, text, needle) in cases {
        let existing = what == "existing";
        if existing {
            std::fs::write(store.join(&out_base), b"someone else's").unwrap();
        }
        let before = listing(&store);
        let json = dir.path().join("top/build.json");
        std::fs::write(&json, &text).unwrap();
        let out = bin()
            .arg("nix-builder")
            .arg("--state-dir")
            .arg(&state)
            .arg(&json)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains("error: tvix-build-vm:") && stderr.contains(needle),
            "{what}: {stderr}"
        );
        assert!(!stderr.contains('\x02'), "{what}: no handshake: {stderr:?}");
        assert!(out.stdout.is_empty(), "{what}");
        assert_eq!(listing(&store), before, "{what}: the store was written");
        assert!(!state.exists(), "{what}: the state dir was created");
    }
}
