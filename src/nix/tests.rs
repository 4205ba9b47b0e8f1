#![allow(
    clippy::unwrap_used,
    reason = "tests: any failure should fail the test"
)]

use super::build_json::{self, NixBuild};
use super::cache::{import_inputs, InputCache};
use super::place::place_outputs;
use super::request::{read_tmp_dir, to_paths_request, to_raw_request, MAX_TMP_DIR_BYTES};
use super::NixError;
use crate::castore::blob::MemoryBlobService;
use crate::castore::directory_service::MemoryDirectoryService;
use crate::castore::{BlobService, DirectoryService, Node, PathComponent};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

/// build.json files a real Nix 2.34 wrote.
const SAMPLES: &[(&str, &str)] = &[
    ("ca", include_str!("testdata/build-ca.json")),
    ("closure", include_str!("testdata/build-closure.json")),
    ("daemon", include_str!("testdata/build-daemon.json")),
    ("fod", include_str!("testdata/build-fod.json")),
    ("passfile", include_str!("testdata/build-passfile.json")),
    ("sa", include_str!("testdata/build-structured-attrs.json")),
    ("two", include_str!("testdata/build-two-outputs.json")),
];

fn sample(name: &str) -> serde_json::Value {
    let (_, text) = SAMPLES.iter().find(|(n, _)| *n == name).unwrap();
    serde_json::from_str(text).unwrap()
}

fn parse(v: &serde_json::Value) -> Result<NixBuild, NixError> {
    build_json::parse(&serde_json::to_vec(v).unwrap())
}

fn field_of(e: NixError) -> (String, String) {
    match e {
        NixError::Field { field, reason } => (field, reason),
        other => panic!("expected a field error, got {other:?}"),
    }
}

fn node(name: &str) -> (PathComponent, Node) {
    (
        PathComponent::try_from(name).unwrap(),
        Node::File {
            digest: blake3::hash(name.as_bytes()).into(),
            size: 1,
            executable: true,
        },
    )
}

#[test]
fn every_sample_maps_onto_a_valid_request() {
    for (name, text) in SAMPLES {
        let build = build_json::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let inputs = build.inputs.iter().map(|b| node(&b.to_string())).collect();
        let raw = to_raw_request(&build, inputs, Vec::new(), &[]);
        raw.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// What goes on `BuildPaths` decodes on the server into exactly the request validated here.
#[test]
fn the_wire_request_decodes_to_the_same_validated_request() {
    for (name, text) in SAMPLES {
        let build = build_json::parse(text.as_bytes()).unwrap();
        let inputs = build.inputs.iter().map(|b| node(&b.to_string())).collect();
        let tmp = vec![(
            "build/.attrs.json".to_owned(),
            bytes::Bytes::from_static(b"{}"),
        )];
        let raw = to_raw_request(&build, inputs, tmp, &["kvm".to_owned()]);
        let wire = to_paths_request(raw.clone());
        let ours = raw.validate().unwrap();
        let theirs = crate::wire::paths::decode(wire).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ours, theirs, "{name}");
    }
}

#[test]
fn two_outputs_map_exactly() {
    let v = sample("two");
    let build = parse(&v).unwrap();
    let inputs = vec![node("yiyfigk1wgp4k3qv30y2b5w1rdfbfzzh-busybox")];
    let raw = to_raw_request(&build, inputs, Vec::new(), &[]);
    let req = raw.validate().unwrap();
    assert_eq!(
        req.command_args[0],
        "/nix/store/yiyfigk1wgp4k3qv30y2b5w1rdfbfzzh-busybox/busybox"
    );
    assert_eq!(
        &req.command_args[1..],
        &[
            "sh".to_owned(),
            "-c".into(),
            v["args"][2].as_str().unwrap().into()
        ]
    );
    assert_eq!(req.working_dir.as_str(), "build");
    assert_eq!(req.inputs_dir.as_str(), "nix/store");
    let outs: Vec<&str> = req.outputs.iter().map(|o| o.as_str()).collect();
    assert_eq!(
        outs,
        [
            "nix/store/2jb597dd4jpwiaiqna9md0lqb00f5zmd-a-dev",
            "nix/store/r4jciywfm0i8ghd9nvvyaa2v1lfgvwlk-a"
        ]
    );
    // The environment is Nix's, variable for variable.
    let env = v["env"].as_object().unwrap();
    assert_eq!(req.environment_vars.len(), env.len());
    for (k, val) in &req.environment_vars {
        assert_eq!(env[k].as_str().unwrap().as_bytes(), &val[..], "{k}");
    }
    assert_eq!(req.constraints.system, "x86_64-linux");
    assert!(req.constraints.available_ro_paths.is_empty());
    assert!(!req.constraints.network_access);
    assert_eq!(
        build
            .outputs
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["dev", "out"]
    );
}

#[test]
fn fixed_output_derivations_get_the_network() {
    let build = parse(&sample("fod")).unwrap();
    let raw = to_raw_request(&build, Vec::new(), Vec::new(), &[]);
    assert!(raw.constraints.network_access);
}

#[test]
fn another_version_is_refused_by_name() {
    for version in [
        serde_json::json!(2),
        serde_json::json!("1"),
        serde_json::json!(0),
    ] {
        let mut v = sample("two");
        v["version"] = version.clone();
        let (field, reason) = field_of(parse(&v).unwrap_err());
        assert_eq!(field, "version");
        assert!(reason.contains("understands version 1"), "{reason}");
    }
    let mut v = sample("two");
    v.as_object_mut().unwrap().remove("version");
    assert_eq!(field_of(parse(&v).unwrap_err()).0, "version");
    // A version-2 file with a different shape is still refused for its version.
    let e = build_json::parse(br#"{"version":2,"somethingNew":[]}"#).unwrap_err();
    assert_eq!(field_of(e).0, "version");
}

#[test]
fn malformed_json_is_refused() {
    assert!(matches!(
        build_json::parse(b"{\"version\":1,").unwrap_err(),
        NixError::Json(_)
    ));
    let mut v = sample("two");
    v.as_object_mut().unwrap().remove("outputs");
    let e = parse(&v).unwrap_err();
    assert!(e.to_string().contains("outputs"), "{e}");
}

#[test]
fn paths_outside_the_store_are_refused() {
    let mut v = sample("closure");
    v["inputPaths"][1] = "/etc/passwd".into();
    let (field, reason) = field_of(parse(&v).unwrap_err());
    assert_eq!(field, "inputPaths[1]");
    assert!(reason.contains("not inside the store dir"), "{reason}");

    let mut v = sample("closure");
    v["inputPaths"][0] = "/nix/store/../../etc".into();
    assert_eq!(field_of(parse(&v).unwrap_err()).0, "inputPaths[0]");

    let mut v = sample("closure");
    v["inputPaths"][0] = "/nix/store/a/b".into();
    assert_eq!(field_of(parse(&v).unwrap_err()).0, "inputPaths[0]");

    let mut v = sample("two");
    v["outputs"]["dev"] = "/tmp/x".into();
    assert_eq!(field_of(parse(&v).unwrap_err()).0, "outputs.dev");

    let mut v = sample("two");
    v["storeDir"] = "nix/store".into();
    assert_eq!(field_of(parse(&v).unwrap_err()).0, "storeDir");
}

#[test]
fn an_output_that_is_an_input_is_refused() {
    let mut v = sample("closure");
    v["outputs"]["out"] = v["inputPaths"][2].clone();
    let (field, reason) = field_of(parse(&v).unwrap_err());
    assert_eq!(field, "outputs.out");
    assert!(reason.contains("also an input"), "{reason}");
}

#[test]
fn a_builder_outside_the_inputs_is_refused() {
    for builder in ["/bin/sh", "/nix/store/zzzz-other/bin/sh", "/nix/storex/a"] {
        let mut v = sample("two");
        v["builder"] = builder.into();
        let (field, reason) = field_of(parse(&v).unwrap_err());
        assert_eq!(field, "builder", "{builder}");
        assert!(
            reason.contains("not inside any of the input paths"),
            "{reason}"
        );
    }
    // The input path itself may be the builder.
    let mut v = sample("two");
    v["builder"] = v["inputPaths"][0].clone();
    parse(&v).unwrap();
}

/// A build.json pointing at a temporary store and tmp dir.
fn in_tempdir(v: &mut serde_json::Value, root: &Path) {
    let store = root.join("store");
    let tmp = root.join("top/build");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    v["realStoreDir"] = store.to_str().unwrap().into();
    v["tmpDir"] = tmp.to_str().unwrap().into();
    v["topTmpDir"] = root.join("top").to_str().unwrap().into();
}

#[test]
fn an_existing_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = sample("two");
    in_tempdir(&mut v, dir.path());
    let json = dir.path().join("build.json");
    std::fs::write(&json, serde_json::to_vec(&v).unwrap()).unwrap();
    build_json::read(&json).unwrap();
    std::fs::write(
        dir.path().join("store/r4jciywfm0i8ghd9nvvyaa2v1lfgvwlk-a"),
        b"stale",
    )
    .unwrap();
    let (field, reason) = field_of(build_json::read(&json).unwrap_err());
    assert_eq!(field, "outputs.out");
    assert!(reason.contains("already exists"), "{reason}");
}

#[test]
fn kvm_feature_asks_for_dev_kvm_from_env_and_structured_attrs() {
    let mut v = sample("two");
    v["env"]["requiredSystemFeatures"] = "big-parallel kvm".into();
    let build = parse(&v).unwrap();
    let features = build.required_system_features().unwrap();
    let raw = to_raw_request(&build, Vec::new(), Vec::new(), &features);
    assert_eq!(raw.constraints.available_ro_paths, ["/dev/kvm"]);

    let dir = tempfile::tempdir().unwrap();
    let mut v = sample("sa");
    in_tempdir(&mut v, dir.path());
    let build = parse(&v).unwrap();
    assert!(build.required_system_features().unwrap().is_empty());
    std::fs::write(
        dir.path().join("top/build/.attrs.json"),
        br#"{"requiredSystemFeatures":["kvm"],"outputs":{"out":"x"}}"#,
    )
    .unwrap();
    assert_eq!(build.required_system_features().unwrap(), ["kvm"]);
    let mut v = sample("sa");
    in_tempdir(&mut v, dir.path());
    let build = parse(&v).unwrap();
    let raw = to_raw_request(
        &build,
        Vec::new(),
        Vec::new(),
        &build.required_system_features().unwrap(),
    );
    assert_eq!(raw.constraints.available_ro_paths, ["/dev/kvm"]);
}

#[test]
fn tmp_dir_files_are_carried_into_build_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = sample("passfile");
    in_tempdir(&mut v, dir.path());
    let build = parse(&v).unwrap();
    let tmp = dir.path().join("top/build");
    let attr = ".attr-1lak0mvllw8rv9i9ygkglvhqsq19qi9ynl4bi7gbf69ab5nzw89a";
    std::fs::write(tmp.join(attr), b"big contents").unwrap();
    std::fs::write(tmp.join(".attrs.sh"), b"declare -x a=1").unwrap();
    let files = read_tmp_dir(&build).unwrap();
    assert_eq!(
        files
            .iter()
            .map(|(p, c)| (p.as_str(), &c[..]))
            .collect::<Vec<_>>(),
        [
            (&*format!("build/{attr}"), &b"big contents"[..]),
            ("build/.attrs.sh", &b"declare -x a=1"[..]),
        ]
    );
    let inputs = vec![node(
        "9ayqmbj1zgsyllkbsbml5y79hwmmykby-92y84mhzly4gh2qhpr93awmivfyiwd4l-bb",
    )];
    let req = to_raw_request(&build, inputs, files, &[])
        .validate()
        .unwrap();
    assert_eq!(req.additional_files.len(), 2);

    // More than the bound in all.
    let big = vec![b'x'; (MAX_TMP_DIR_BYTES / 2 + 1) as usize];
    std::fs::write(tmp.join("a"), &big).unwrap();
    std::fs::write(tmp.join("b"), &big).unwrap();
    assert!(matches!(
        read_tmp_dir(&build).unwrap_err(),
        NixError::TmpDirTooLarge { .. }
    ));
    std::fs::remove_file(tmp.join("a")).unwrap();
    std::fs::remove_file(tmp.join("b")).unwrap();

    // Nix puts only files there; anything else is refused by name.
    std::fs::create_dir(tmp.join("sub")).unwrap();
    match read_tmp_dir(&build).unwrap_err() {
        NixError::TmpDirEntry { path } => assert_eq!(path, tmp.join("sub")),
        other => panic!("{other:?}"),
    }
}

fn stores() -> (Arc<dyn BlobService>, Arc<dyn DirectoryService>) {
    (
        Arc::new(MemoryBlobService::new()),
        Arc::new(MemoryDirectoryService::new()),
    )
}

/// A build.json whose inputs are a busybox-like tree and a plain file in a temporary store.
fn closure_in(dir: &Path) -> NixBuild {
    let mut v = sample("closure");
    in_tempdir(&mut v, dir);
    let store = dir.join("store");
    let bb = store.join("9ayqmbj1zgsyllkbsbml5y79hwmmykby-92y84mhzly4gh2qhpr93awmivfyiwd4l-bb");
    std::fs::create_dir_all(bb.join("bin")).unwrap();
    std::fs::write(bb.join("bin/busybox"), vec![7u8; 5000]).unwrap();
    std::os::unix::fs::symlink("busybox", bb.join("bin/sh")).unwrap();
    std::fs::write(
        store.join("ikgan7cz7nqpl9iia4apw1yf5zwfzrnc-hello"),
        b"hello",
    )
    .unwrap();
    std::fs::create_dir(store.join("jwrxq1lwsijx0pd5sr1y2w0w0sbqsz7w-dep")).unwrap();
    std::fs::write(
        store.join("jwrxq1lwsijx0pd5sr1y2w0w0sbqsz7w-dep/d"),
        b"dep!",
    )
    .unwrap();
    parse(&v).unwrap()
}

#[tokio::test]
async fn inputs_are_imported_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let build = closure_in(dir.path());
    let cache = InputCache::open(&dir.path().join("cache")).unwrap();
    let (blobs, dirs) = stores();

    let (first, stats) = import_inputs(&cache, blobs.clone(), dirs.clone(), &build)
        .await
        .unwrap();
    assert_eq!(stats.imported, 3);
    assert_eq!(stats.reused, 0);
    assert_eq!(stats.bytes_read, 5000 + 5 + 4);
    assert_eq!(
        first.iter().map(|(b, _)| b.to_string()).collect::<Vec<_>>(),
        build
            .inputs
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
    );

    // A second build (a fresh cache handle, as a new process has) reads nothing.
    let cache = InputCache::open(&dir.path().join("cache")).unwrap();
    let (second, stats) = import_inputs(&cache, blobs.clone(), dirs.clone(), &build)
        .await
        .unwrap();
    assert_eq!(stats.imported, 0);
    assert_eq!(stats.reused, 3);
    assert_eq!(stats.bytes_read, 0);
    assert_eq!(first, second);

    // A path garbage-collected and built again with other bytes is imported again.
    let hello = dir
        .path()
        .join("store/ikgan7cz7nqpl9iia4apw1yf5zwfzrnc-hello");
    std::fs::remove_file(&hello).unwrap();
    std::fs::write(&hello, b"HELLO, again").unwrap();
    let (third, stats) = import_inputs(&cache, blobs.clone(), dirs.clone(), &build)
        .await
        .unwrap();
    assert_eq!((stats.imported, stats.reused, stats.bytes_read), (1, 2, 12));
    assert_ne!(first, third);

    // A castore that lost the node (another store, wiped) gets it imported again.
    let (blobs2, dirs2) = stores();
    let (fourth, stats) = import_inputs(&cache, blobs2, dirs2, &build).await.unwrap();
    assert_eq!((stats.imported, stats.reused), (3, 0), "{stats:?}");
    assert_eq!(third, fourth);
}

/// Imports `build`'s inputs through the asking-first cache in `dir`.
async fn import_asking(
    dir: &Path,
    (blobs, dirs): &(Arc<dyn BlobService>, Arc<dyn DirectoryService>),
    build: &NixBuild,
) -> (Vec<(PathComponent, Node)>, super::cache::ImportStats) {
    let cache = InputCache::open(dir).unwrap().asking_first();
    import_inputs(&cache, blobs.clone(), dirs.clone(), build)
        .await
        .unwrap()
}

/// Asking first: a cache that does not know the inputs (another state dir, another
/// machine) hashes them and uploads nothing the castore already holds whole.
#[tokio::test]
async fn asking_first_uploads_only_what_the_castore_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let build = closure_in(dir.path());
    let store = stores();
    let (first, stats) = import_asking(&dir.path().join("a"), &store, &build).await;
    assert_eq!((stats.imported, stats.present), (3, 0), "{stats:?}");

    let (second, stats) = import_asking(&dir.path().join("b"), &store, &build).await;
    assert_eq!(
        (stats.imported, stats.present, stats.reused),
        (0, 3, 0),
        "{stats:?}"
    );
    assert_eq!(stats.bytes_read, 5000 + 5 + 4, "hashed, not uploaded");
    assert_eq!(first, second);
    // And b now knows them: the next build reads nothing.
    let (_, stats) = import_asking(&dir.path().join("b"), &store, &build).await;
    assert_eq!((stats.reused, stats.bytes_read), (3, 0), "{stats:?}");

    // A castore that holds none of them gets them all.
    let (_, stats) = import_asking(&dir.path().join("c"), &stores(), &build).await;
    assert_eq!((stats.imported, stats.present), (3, 0), "{stats:?}");
}

#[tokio::test]
async fn outputs_are_placed_whole_with_modes_nix_accepts_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = sample("two");
    in_tempdir(&mut v, dir.path());
    let build = parse(&v).unwrap();
    let (blobs, dirs) = stores();

    // Outputs as a build would have harvested them: a file and a tree.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("dev/sub")).unwrap();
    std::fs::write(src.join("dev/sub/x"), b"D").unwrap();
    std::fs::set_permissions(src.join("dev/sub"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(src.join("out"), b"A").unwrap();
    let dev = crate::castore::import::import_path(blobs.clone(), dirs.clone(), &src.join("dev"))
        .await
        .unwrap();
    let out = crate::castore::import::import_path(blobs.clone(), dirs.clone(), &src.join("out"))
        .await
        .unwrap();
    let nodes = vec![
        ("dev".to_owned(), dev.clone()),
        ("out".to_owned(), out.clone()),
    ];

    // The second output's destination appears meanwhile: nothing stays behind.
    let out_dest = dir.path().join("store/r4jciywfm0i8ghd9nvvyaa2v1lfgvwlk-a");
    let dev_dest = dir
        .path()
        .join("store/2jb597dd4jpwiaiqna9md0lqb00f5zmd-a-dev");
    std::fs::write(&out_dest, b"someone else's").unwrap();
    let e = place_outputs(blobs.as_ref(), dirs.as_ref(), &build, &nodes)
        .await
        .unwrap_err();
    assert!(
        matches!(e, NixError::Export { ref name, .. } if name == "out"),
        "{e:?}"
    );
    assert!(!dev_dest.exists());
    std::fs::remove_file(&out_dest).unwrap();

    // A missing output node places nothing either.
    let e = place_outputs(blobs.as_ref(), dirs.as_ref(), &build, &nodes[..1])
        .await
        .unwrap_err();
    assert!(
        matches!(e, NixError::MissingOutput(ref n) if n == "out"),
        "{e:?}"
    );
    assert!(!dev_dest.exists());

    let placed = place_outputs(blobs.as_ref(), dirs.as_ref(), &build, &nodes)
        .await
        .unwrap();
    assert_eq!(placed, [dev_dest.clone(), out_dest.clone()]);
    assert_eq!(std::fs::read(&out_dest).unwrap(), b"A");
    assert_eq!(std::fs::read(dev_dest.join("sub/x")).unwrap(), b"D");
    for p in [
        &dev_dest,
        &dev_dest.join("sub"),
        &dev_dest.join("sub/x"),
        &out_dest,
    ] {
        let mode = std::fs::symlink_metadata(p).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o022,
            0,
            "{} is group/world writable: {mode:o}",
            p.display()
        );
    }
    // Nothing temporary is left in the store.
    let mut names: Vec<_> = std::fs::read_dir(dir.path().join("store"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
}
