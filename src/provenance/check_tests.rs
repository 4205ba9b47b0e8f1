#![allow(clippy::unwrap_used)]

use super::*;
use crate::castore::blob::MemoryBlobService;
use crate::castore::directory::SymlinkTarget;
use crate::castore::directory_service::MemoryDirectoryService;
use crate::castore::import::import_path;
use crate::castore::{BlobService, DirectoryService};
use crate::provenance::statement::{tests::facts, Subject};
use ed25519_dalek::SigningKey;
use std::sync::Arc;

/// Two outputs on disk (a directory, a symlink), imported, and a statement naming them.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    link: PathBuf,
    outputs: Vec<(String, Node)>,
    statement: Statement,
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("aaa-out");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("bin/hello"), b"hello").unwrap();
    let link = tmp.path().join("bbb-link");
    std::os::unix::fs::symlink("aaa-out/bin/hello", &link).unwrap();
    let file = tmp.path().join("ccc-file");
    std::fs::write(&file, b"a file").unwrap();
    let blobs: Arc<dyn BlobService> = Arc::new(MemoryBlobService::new());
    let dirs: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::new());
    let mut subjects = Vec::new();
    let mut outputs = Vec::new();
    for p in [&dir, &link, &file] {
        let node = import_path(blobs.clone(), dirs.clone(), p).await.unwrap();
        let nar = nar::hash_node(&*blobs, &*dirs, &node).await.unwrap();
        let name = p.file_name().unwrap().to_str().unwrap();
        subjects.push(Subject {
            path: format!("nix/store/{name}"),
            node: node.clone(),
            nar,
        });
        // As the seed layout names outputs: by basename.
        outputs.push((name.to_owned(), node));
    }
    let mut f = facts();
    f.outputs = subjects;
    Fixture {
        _tmp: tmp,
        dir,
        link,
        outputs,
        statement: Statement::new(&f),
    }
}

#[tokio::test]
async fn matching_outputs_and_paths_have_no_mismatch() {
    let f = fixture().await;
    assert_eq!(against_outputs(&f.statement, &f.outputs), []);
    // The 2024 layout names outputs by their full request path.
    let full: Vec<_> = f
        .outputs
        .iter()
        .map(|(n, node)| (format!("/nix/store/{n}"), node.clone()))
        .collect();
    assert_eq!(against_outputs(&f.statement, &full), []);
    assert_eq!(
        against_paths(&f.statement, &[f.dir.clone(), f.link.clone()]).unwrap(),
        []
    );
    // A copy under another name is found by its hash.
    let copy = f._tmp.path().join("elsewhere");
    std::fs::create_dir_all(copy.join("bin")).unwrap();
    std::fs::write(copy.join("bin/hello"), b"hello").unwrap();
    assert_eq!(against_paths(&f.statement, &[copy]).unwrap(), []);
}

#[tokio::test]
async fn swapped_missing_and_extra_subjects_are_each_named() {
    let f = fixture().await;
    // The directory's and the file's digests swapped.
    let mut swapped = f.statement.clone();
    let digest_0 = swapped.subject[0].digest.clone();
    swapped.subject[0].digest = swapped.subject[2].digest.clone();
    swapped.subject[2].digest = digest_0;
    let m = against_outputs(&swapped, &f.outputs);
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(
        matches!(&m[0], Mismatch::Digest { subject, algorithm: CASTORE_BLAKE3, .. } if subject == "nix/store/aaa-out"),
        "{m:?}"
    );
    assert!(
        matches!(&m[1], Mismatch::Digest { subject, algorithm: CASTORE_BLAKE3, .. } if subject == "nix/store/ccc-file"),
        "{m:?}"
    );
    assert!(
        m[0].to_string().contains("castoreBlake3 differs"),
        "{}",
        m[0]
    );

    // The directory's and the symlink's names swapped.
    let mut renamed = f.statement.clone();
    renamed.subject[0].name = Some("nix/store/bbb-link".into());
    renamed.subject[1].name = Some("nix/store/aaa-out".into());
    let m = against_outputs(&renamed, &f.outputs);
    assert!(
        matches!(
            &m[..],
            [
                Mismatch::Kind {
                    actual: "directory",
                    ..
                },
                Mismatch::Kind {
                    actual: "symlink",
                    ..
                }
            ]
        ),
        "{m:?}"
    );

    let mut two = f.statement.clone();
    two.subject.truncate(2);
    assert_eq!(
        against_outputs(&two, &f.outputs),
        [Mismatch::Unattested {
            output: "ccc-file".into()
        }]
    );
    assert_eq!(
        against_outputs(&f.statement, &f.outputs[..2]),
        [Mismatch::NotAnOutput {
            subject: "nix/store/ccc-file".into()
        }]
    );

    // Another symlink target under the same name.
    let other = vec![
        f.outputs[0].clone(),
        f.outputs[2].clone(),
        (
            "bbb-link".to_owned(),
            Node::Symlink {
                target: SymlinkTarget::try_from("elsewhere").unwrap(),
            },
        ),
    ];
    let m = against_outputs(&f.statement, &other);
    assert!(
        matches!(
            &m[..],
            [Mismatch::Digest {
                algorithm: NAR_SHA256,
                ..
            }]
        ),
        "{m:?}"
    );
}

#[tokio::test]
async fn a_changed_tree_on_disk_is_named_with_both_hashes() {
    let f = fixture().await;
    std::fs::write(f.dir.join("bin/hello"), b"HELLO").unwrap();
    let m = against_paths(&f.statement, std::slice::from_ref(&f.dir)).unwrap();
    assert!(
        matches!(&m[..], [Mismatch::Digest { subject, algorithm: NAR_SHA256, .. }] if subject == "nix/store/aaa-out"),
        "{m:?}"
    );
    let stranger = f._tmp.path().join("stranger");
    std::fs::write(&stranger, b"x").unwrap();
    let m = against_paths(&f.statement, &[stranger]).unwrap();
    assert!(matches!(&m[..], [Mismatch::PathUnattested { .. }]), "{m:?}");
}

#[tokio::test]
async fn open_checks_signature_then_statement_type() {
    let f = fixture().await;
    let key = SigningKey::from_bytes(&[3; 32]);
    let env = Envelope::sign(&f.statement.to_payload(), &key);
    assert_eq!(open(&env, &key.verifying_key()).unwrap(), f.statement);

    let mut other = f.statement.clone();
    other.predicate_type = "https://slsa.dev/provenance/v0.2".into();
    let env = Envelope::sign(&other.to_payload(), &key);
    let e = open(&env, &key.verifying_key()).unwrap_err();
    assert!(
        matches!(
            e,
            OpenError::WrongType {
                field: "predicateType",
                ..
            }
        ),
        "{e}"
    );

    let env = Envelope::sign(b"[1,2]", &key);
    let e = open(&env, &key.verifying_key()).unwrap_err();
    assert!(matches!(e, OpenError::NotStatement(_)), "{e}");
}
