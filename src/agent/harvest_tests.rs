//! Tests of the output harvest against a fake guest and in-memory castore fakes. Every
//! failing case also checks that no directory became visible.

use super::*;
use crate::agent::error::{AgentFailure, DeadlineKind, Limit, ProtocolError, TreeViolation};
use crate::agent::log::DiscardLog;
use crate::agent::session::accept_hello;
use crate::agent::testing::*;
use crate::castore::blob::MemoryBlobService;
use crate::castore::directory::{NameError, SymlinkTargetError};
use crate::castore::BlobService;
use std::time::Duration;
use tvix_build_vm_agent::proto::{AgentFailure as ProtoFailure, Job};

struct Harvested {
    result: Result<Vec<Option<Node>>, Error>,
    /// Each harvested output's needles.
    needles: Vec<Option<Vec<u64>>>,
    blobs: MemoryBlobService,
    dirs: RecordingDirs,
}

async fn harvest_msgs(
    outputs: &[&str],
    msgs: &[Msg],
    limits: HarvestLimits,
    hold_open: bool,
) -> Harvested {
    harvest_scanning(outputs, msgs, limits, hold_open, &Scanner::none()).await
}

async fn harvest_scanning(
    outputs: &[&str],
    msgs: &[Msg],
    limits: HarvestLimits,
    hold_open: bool,
    needles: &Scanner,
) -> Harvested {
    let mut all = vec![hello(), exited_code(0)];
    all.extend_from_slice(msgs);
    let stream = fake_guest(wire(&all), hold_open);
    let greeted = accept_hello(stream, SessionLimits::default(), Duration::from_secs(10))
        .await
        .unwrap();
    let job = Job {
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut running = greeted.send_job(job).await.unwrap();
    let status = running.run(&mut DiscardLog).await.unwrap();
    let (blobs, dirs) = (MemoryBlobService::new(), RecordingDirs::default());
    let result = running
        .harvest(&status, &blobs, &dirs, &limits, needles)
        .await;
    let needles = match &result {
        Ok(outputs) => outputs
            .iter()
            .map(|o| o.as_ref().map(|o| o.needles.clone()))
            .collect(),
        Err(_) => Vec::new(),
    };
    Harvested {
        result: result.map(|outputs| outputs.into_iter().map(|o| o.map(|o| o.node)).collect()),
        needles,
        blobs,
        dirs,
    }
}

/// One directory output whose root holds `children`, then OutputsDone.
fn one_dir(children: Vec<Msg>) -> Vec<Msg> {
    let mut msgs = vec![start(0), dir(b"")];
    msgs.extend(children);
    msgs.extend([end(), done()]);
    msgs
}

/// Harvests a single directory output and returns the error, checking nothing is visible.
async fn failing(children: Vec<Msg>, limits: HarvestLimits) -> Error {
    let h = harvest_msgs(&["/nix/store/out"], &one_dir(children), limits, false).await;
    assert_eq!(
        h.dirs.visible().await,
        0,
        "a failed harvest left directories visible"
    );
    match h.result {
        Ok(nodes) => panic!("harvest succeeded: {nodes:?}"),
        Err(e) => e,
    }
}

fn tree_violation(err: &Error) -> (&Location, &TreeViolation) {
    match err {
        Error::Protocol(ProtocolError::Tree { at, violation }) => (at, violation),
        other => panic!("expected a tree violation, got {other:?}"),
    }
}

fn name(s: &str) -> PathComponent {
    PathComponent::try_from(s).unwrap()
}

#[tokio::test]
async fn a_nested_tree_is_stored_with_the_digests_the_host_computes() {
    let exe = b"#!/bin/sh\necho hi\n";
    let nested_f = b"nested content";
    let big: Vec<u8> = (0..600 * 1024u32).map(|i| (i % 251) as u8).collect();

    let mut msgs = vec![start(0), dir(b""), dir(b"a-dir"), dir(b"empty"), end()];
    msgs.extend(file(b"exe", exe, true));
    msgs.push(dir(b"nested"));
    msgs.extend(file(b"f", nested_f, false));
    msgs.extend([end(), end()]);
    msgs.extend(file(b"empty-file", b"", false));
    msgs.extend([symlink(b"link", b"a-dir/exe"), end()]);
    msgs.push(missing(1));
    msgs.push(start(2));
    msgs.extend(file(b"", &big, false));
    msgs.extend([start(3), symlink(b"", b"/nix/store/elsewhere"), done()]);

    let outputs = [
        "/nix/store/a",
        "/nix/store/b",
        "/nix/store/c",
        "/nix/store/d",
    ];
    let h = harvest_msgs(&outputs, &msgs, HarvestLimits::default(), false).await;
    let nodes = h.result.unwrap();

    let mut nested = Directory::new();
    nested
        .try_insert(name("f"), file_node(nested_f, false))
        .unwrap();
    let empty = Directory::new();
    let mut a_dir = Directory::new();
    a_dir.try_insert(name("empty"), empty.as_node()).unwrap();
    a_dir.try_insert(name("exe"), file_node(exe, true)).unwrap();
    a_dir.try_insert(name("nested"), nested.as_node()).unwrap();
    let mut root = Directory::new();
    root.try_insert(name("a-dir"), a_dir.as_node()).unwrap();
    root.try_insert(name("empty-file"), file_node(b"", false))
        .unwrap();
    let link = Node::Symlink {
        target: SymlinkTarget::try_from("a-dir/exe").unwrap(),
    };
    root.try_insert(name("link"), link).unwrap();

    assert_eq!(
        nodes,
        vec![
            Some(root.as_node()),
            None,
            Some(file_node(&big, false)),
            Some(Node::Symlink {
                target: SymlinkTarget::try_from("/nix/store/elsewhere").unwrap()
            }),
        ]
    );
    // size: 3 entries in root + a-dir's (3 + nested's 1 + empty's 0).
    assert_eq!(root.size(), 7);
    for d in [&root, &a_dir, &nested, &empty] {
        assert_eq!(h.dirs.get(&d.digest()).await.unwrap().as_ref(), Some(d));
    }
    assert_eq!(h.dirs.handed(), 4);
    assert_eq!(h.dirs.visible().await, 4);
    for data in [&exe[..], &nested_f[..], b"", &big] {
        let stored = blob(&h.blobs, &B3Digest::of(data)).await;
        assert_eq!(stored.as_deref(), Some(data));
    }
}

#[tokio::test]
async fn invalid_names_are_refused_naming_the_rule() {
    let cases: [(&[u8], NameError); 5] = [
        (b"..", NameError::Dot),
        (b".", NameError::Dot),
        (b"a/b", NameError::ContainsSlash),
        (b"", NameError::Empty),
        (b"a\0b", NameError::ContainsNul),
    ];
    for (bad, want) in cases {
        let err = failing(file(bad, b"x", false), HarvestLimits::default()).await;
        let (_, violation) = tree_violation(&err);
        assert!(
            matches!(violation, TreeViolation::InvalidName { source, .. } if *source == want),
            "{bad:?}: {violation:?}"
        );
    }
}

#[tokio::test]
async fn duplicate_and_unsorted_names_are_refused_with_their_path() {
    let mut dup = vec![dir(b"sub")];
    dup.extend(file(b"b", b"1", false));
    dup.extend(file(b"b", b"2", false));
    dup.push(end());
    let err = failing(dup, HarvestLimits::default()).await;
    let (at, violation) = tree_violation(&err);
    assert!(matches!(violation, TreeViolation::Duplicate(n) if n == "b"));
    assert_eq!(at.path, "sub/b");
    assert_eq!(at.output, "/nix/store/out");

    let mut unsorted = file(b"b", b"1", false);
    unsorted.extend(file(b"a", b"2", false));
    let err = failing(unsorted, HarvestLimits::default()).await;
    assert!(matches!(
        tree_violation(&err).1,
        TreeViolation::NotSorted { name, previous } if name == "a" && previous == "b"
    ));

    // Byte order, not any locale: "B" (0x42) sorts before "a" (0x61).
    let mut bytewise = file(b"B", b"1", false);
    bytewise.extend(file(b"a", b"2", false));
    let h = harvest_msgs(&["/o"], &one_dir(bytewise), HarvestLimits::default(), false).await;
    assert!(h.result.is_ok());
}

#[tokio::test]
async fn bad_symlink_targets_are_refused() {
    for (target, want) in [
        (&b""[..], SymlinkTargetError::Empty),
        (&b"a\0b"[..], SymlinkTargetError::ContainsNul),
    ] {
        let err = failing(vec![symlink(b"l", target)], HarvestLimits::default()).await;
        assert!(matches!(
            tree_violation(&err).1,
            TreeViolation::InvalidSymlinkTarget { source, .. } if *source == want
        ));
    }
}

#[tokio::test]
async fn a_file_with_more_bytes_than_announced_is_refused() {
    // One chunk larger than the rest of the file.
    let err = failing(
        vec![file_entry(b"f", 3, false), chunk(b"12345")],
        HarvestLimits::default(),
    )
    .await;
    assert!(matches!(
        tree_violation(&err).1,
        TreeViolation::FileTooLong { announced: 3 }
    ));
    // An extra chunk after the announced bytes.
    let err = failing(
        vec![file_entry(b"f", 3, false), chunk(b"123"), chunk(b"4")],
        HarvestLimits::default(),
    )
    .await;
    let (at, violation) = tree_violation(&err);
    assert!(matches!(
        violation,
        TreeViolation::FileTooLong { announced: 3 }
    ));
    assert_eq!(at.path, "f");
    // The same for an output that is a single file.
    let h = harvest_msgs(
        &["/o"],
        &[
            start(0),
            file_entry(b"", 1, false),
            chunk(b"1"),
            chunk(b"2"),
        ],
        HarvestLimits::default(),
        false,
    )
    .await;
    let err = h.result.err().unwrap();
    assert!(matches!(
        tree_violation(&err).1,
        TreeViolation::FileTooLong { announced: 1 }
    ));
}

#[tokio::test]
async fn a_file_with_fewer_bytes_than_announced_is_refused() {
    let err = failing(
        vec![file_entry(b"f", 5, false), chunk(b"123")],
        HarvestLimits::default(),
    )
    .await;
    assert!(matches!(
        tree_violation(&err).1,
        TreeViolation::FileTooShort {
            announced: 5,
            received: 3,
            got: "DirectoryEnd"
        }
    ));
}

#[tokio::test]
async fn a_stream_ending_mid_file_is_refused() {
    let msgs = [
        start(0),
        dir(b""),
        file_entry(b"f", 5, false),
        chunk(b"123"),
    ];
    let h = harvest_msgs(&["/o"], &msgs, HarvestLimits::default(), false).await;
    assert_eq!(h.dirs.visible().await, 0);
    let partial = B3Digest::of(b"123");
    assert!(
        !h.blobs.has(&partial).await.unwrap(),
        "a partial blob was stored"
    );
    let err = h.result.err().unwrap();
    assert!(matches!(
        tree_violation(&err).1,
        TreeViolation::FileTooShort {
            received: 3,
            got: "the end of the stream",
            ..
        }
    ));
}

#[tokio::test]
async fn an_empty_chunk_is_refused() {
    let err = failing(
        vec![file_entry(b"f", 5, false), chunk(b"")],
        HarvestLimits::default(),
    )
    .await;
    assert!(matches!(tree_violation(&err).1, TreeViolation::EmptyChunk));
}

#[tokio::test]
async fn depth_is_bounded() {
    let limits = HarvestLimits {
        max_depth: 3,
        ..Default::default()
    };
    // root (1) / a (2) / b (3): allowed.
    let ok = vec![dir(b"a"), dir(b"b"), end(), end()];
    let h = harvest_msgs(&["/o"], &one_dir(ok), limits.clone(), false).await;
    assert!(h.result.is_ok(), "{:?}", h.result);
    // ... / c (4): refused.
    let deep = vec![dir(b"a"), dir(b"b"), dir(b"c"), end(), end(), end()];
    let err = failing(deep, limits).await;
    assert!(matches!(
        &err,
        Error::Limit(LimitExceeded { limit: Limit::Depth, value: 4, max: 3, at: Some(at) })
            if at.path == "a/b/c"
    ));
}

#[tokio::test]
async fn a_deep_location_keeps_only_its_end() {
    let name = [b'n'; 255];
    let mut deep = Vec::new();
    for _ in 0..40 {
        deep.push(dir(&name));
    }
    deep.push(dir(b"last"));
    let limits = HarvestLimits {
        max_depth: 41,
        ..Default::default()
    };
    let err = failing(deep, limits).await;
    let Error::Limit(LimitExceeded { at: Some(at), .. }) = &err else {
        panic!("{err:?}")
    };
    assert!(at.path.starts_with(".../"), "{}", at.path);
    assert!(at.path.ends_with("/last"), "{}", at.path);
    assert!(at.path.len() < 1024 + 2 * 256, "{} bytes", at.path.len());
}

#[tokio::test]
async fn the_entry_count_is_bounded() {
    let limits = HarvestLimits {
        max_entries: 3,
        ..Default::default()
    };
    let children = vec![
        symlink(b"a", b"t"),
        symlink(b"b", b"t"),
        symlink(b"c", b"t"),
    ];
    let err = failing(children, limits).await;
    assert!(matches!(
        err,
        Error::Limit(LimitExceeded {
            limit: Limit::Entries,
            value: 4,
            max: 3,
            ..
        })
    ));
}

#[tokio::test]
async fn total_output_bytes_are_bounded_before_reading() {
    let limits = HarvestLimits {
        max_total_bytes: 10,
        ..Default::default()
    };
    let mut children = file(b"a", b"123456", false);
    // Announces 6 more bytes but never sends them: refused on the announcement.
    children.push(file_entry(b"b", 6, false));
    let err = failing(children, limits).await;
    assert!(matches!(
        err,
        Error::Limit(LimitExceeded {
            limit: Limit::OutputBytes,
            value: 12,
            max: 10,
            ..
        })
    ));
}

#[tokio::test]
async fn long_names_are_bounded() {
    let long = vec![b'n'; 256];
    let err = failing(vec![symlink(&long, b"t")], HarvestLimits::default()).await;
    assert!(matches!(
        err,
        Error::Limit(LimitExceeded {
            limit: Limit::NameBytes,
            value: 256,
            max: 255,
            ..
        })
    ));
}

#[tokio::test]
async fn outputs_done_must_follow_the_last_output() {
    let msgs = [missing(0), missing(0)];
    let h = harvest_msgs(&["/o"], &msgs, HarvestLimits::default(), false).await;
    assert!(matches!(
        h.result,
        Err(Error::Protocol(ProtocolError::Unexpected {
            expected: "OutputsDone",
            got: "OutputStart",
            ..
        }))
    ));
    let h = harvest_msgs(&["/o"], &[missing(0)], HarvestLimits::default(), false).await;
    assert!(matches!(
        h.result,
        Err(Error::Protocol(ProtocolError::Closed {
            phase: Phase::Harvest,
            ..
        }))
    ));
}

#[tokio::test]
async fn a_complete_output_stays_invisible_when_a_later_one_fails() {
    let mut msgs = vec![start(0), dir(b"")];
    msgs.extend(file(b"f", b"fine", false));
    msgs.extend([
        end(),
        start(1),
        dir(b""),
        symlink(b"..", b"x"),
        end(),
        done(),
    ]);
    let h = harvest_msgs(&["/a", "/b"], &msgs, HarvestLimits::default(), false).await;
    let err = h.result.err().unwrap();
    let (at, _) = tree_violation(&err);
    assert_eq!((at.index, at.output.as_str()), (1, "/b"));
    assert_eq!(
        h.dirs.handed(),
        1,
        "output 0's directory was handed to its putter"
    );
    assert_eq!(h.dirs.visible().await, 0);
}

#[tokio::test]
async fn outputs_out_of_order_are_refused() {
    let msgs = [missing(1), missing(0), done()];
    let h = harvest_msgs(&["/a", "/b"], &msgs, HarvestLimits::default(), false).await;
    assert!(matches!(
        h.result,
        Err(Error::Protocol(ProtocolError::OutputOrder {
            expected: 0,
            got: 1
        }))
    ));
}

#[tokio::test]
async fn malformed_entries_are_refused() {
    let named_root = harvest_msgs(
        &["/o"],
        &[start(0), dir(b"x"), end(), done()],
        HarvestLimits::default(),
        false,
    )
    .await;
    let err = named_root.result.err().unwrap();
    assert!(matches!(tree_violation(&err).1, TreeViolation::NamedRoot(n) if n == "x"));

    let unknown = Msg::Entry(Entry {
        name: b"u".to_vec(),
        kind: 7,
        ..Default::default()
    });
    let err = failing(vec![unknown], HarvestLimits::default()).await;
    assert!(matches!(
        tree_violation(&err).1,
        TreeViolation::UnknownKind(7)
    ));

    let sized_link = Msg::Entry(Entry {
        name: b"l".to_vec(),
        kind: EntryKind::Symlink as i32,
        target: b"t".to_vec(),
        size: 4,
        ..Default::default()
    });
    let err = failing(vec![sized_link], HarvestLimits::default()).await;
    assert!(matches!(
        tree_violation(&err).1,
        TreeViolation::StrayField {
            kind: "symlink",
            field: "size"
        }
    ));

    let err = failing(vec![chunk(b"stray")], HarvestLimits::default()).await;
    assert!(matches!(
        err,
        Error::Protocol(ProtocolError::Unexpected {
            got: "FileChunk",
            ..
        })
    ));
}

#[tokio::test]
async fn an_agent_failure_mid_harvest_is_reported() {
    let msgs = [
        start(0),
        dir(b""),
        Msg::Failure(ProtoFailure {
            phase: "read output".into(),
            message: "EIO".into(),
        }),
    ];
    let h = harvest_msgs(&["/o"], &msgs, HarvestLimits::default(), false).await;
    assert_eq!(h.dirs.visible().await, 0);
    assert!(matches!(
        h.result,
        Err(Error::Agent(AgentFailure { phase, .. })) if phase == "read output"
    ));
}

#[tokio::test(start_paused = true)]
async fn the_harvest_deadline_fires() {
    let limits = HarvestLimits {
        deadline: Duration::from_secs(60),
        ..Default::default()
    };
    let begun = tokio::time::Instant::now();
    let msgs = [start(0), dir(b""), file_entry(b"f", 10, false), chunk(b"1")];
    let h = harvest_msgs(&["/o"], &msgs, limits, true).await;
    assert!(matches!(
        h.result,
        Err(Error::Timeout(Timeout {
            which: DeadlineKind::Harvest,
            after
        })) if after == Duration::from_secs(60)
    ));
    assert!(begun.elapsed() >= Duration::from_secs(60));
    assert_eq!(h.dirs.visible().await, 0);
}

#[tokio::test]
async fn names_and_targets_together_are_bounded() {
    let limits = HarvestLimits {
        max_metadata_bytes: 10,
        ..Default::default()
    };
    let children = vec![symlink(b"a", b"123456789"), symlink(b"b", b"x")];
    let err = failing(children, limits).await;
    assert!(matches!(
        &err,
        Error::Limit(LimitExceeded {
            limit: Limit::MetadataBytes,
            value: 12,
            max: 10,
            at: Some(at),
        }) if at.path == "b"
    ));
}

mod random {
    //! Random message sequences: the harvest never panics, and either succeeds with every
    //! output's directories visible or fails with none visible.
    use super::*;
    use proptest::prelude::*;

    fn msg() -> impl Strategy<Value = Msg> {
        let name = prop_oneof![
            Just(b"".to_vec()),
            Just(b"a".to_vec()),
            Just(b"b".to_vec()),
            Just(b"..".to_vec()),
            Just(b"x/y".to_vec()),
        ];
        prop_oneof![
            4 => name.clone().prop_map(|n| dir(&n)),
            4 => Just(end()),
            3 => (name.clone(), 0u64..4, any::<bool>()).prop_map(|(n, s, x)| file_entry(&n, s, x)),
            3 => proptest::collection::vec(any::<u8>(), 0..3).prop_map(|d| chunk(&d)),
            2 => (name, proptest::collection::vec(any::<u8>(), 0..3))
                .prop_map(|(n, t)| symlink(&n, &t)),
            1 => (0u32..3).prop_map(start),
            1 => (0u32..3).prop_map(missing),
            1 => Just(done()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn harvest_is_all_or_nothing(tail in proptest::collection::vec(msg(), 0..24)) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Open a directory output first, so the tree code is reached on every case.
            let mut msgs = vec![start(0), dir(b"")];
            msgs.extend(tail);
            let limits = HarvestLimits { max_depth: 4, ..Default::default() };
            let h = rt.block_on(harvest_msgs(&["/a", "/b"], &msgs, limits, false));
            let visible = rt.block_on(h.dirs.visible());
            match &h.result {
                Ok(nodes) => {
                    prop_assert_eq!(nodes.len(), 2);
                    prop_assert_eq!(visible, h.dirs.handed());
                }
                Err(_) => prop_assert_eq!(visible, 0),
            }
        }
    }
}

/// A blob service whose writers never open: a castore that stalls.
struct StallingBlobs;

#[async_trait::async_trait]
impl BlobService for StallingBlobs {
    async fn has(&self, _digest: &B3Digest) -> Result<bool, crate::castore::Error> {
        Ok(false)
    }
    async fn open_read(
        &self,
        _digest: &B3Digest,
    ) -> Result<Option<Box<dyn crate::castore::BlobReader>>, crate::castore::Error> {
        Ok(None)
    }
    async fn open_write(
        &self,
    ) -> Result<Box<dyn crate::castore::BlobWriter>, crate::castore::Error> {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_castore_is_blamed_when_the_harvest_deadline_fires() {
    let mut msgs = vec![hello(), exited_code(0), start(0)];
    msgs.extend(file(b"", b"data", false));
    msgs.push(done());
    let greeted = accept_hello(
        fake_guest(wire(&msgs), true),
        SessionLimits::default(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let job = Job {
        outputs: vec!["/nix/store/out".into()],
        ..Default::default()
    };
    let mut running = greeted.send_job(job).await.unwrap();
    let status = running.run(&mut DiscardLog).await.unwrap();
    let limits = HarvestLimits {
        deadline: Duration::from_secs(7),
        ..HarvestLimits::default()
    };
    let dirs = RecordingDirs::default();
    let err = running
        .harvest(&status, &StallingBlobs, &dirs, &limits, &Scanner::none())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Infra(InfraError::CastoreStalled {
                what: "opening a blob for writing",
                after
            }) if after == Duration::from_secs(7)
        ),
        "{err:?}"
    );
    assert_eq!(err.class(), crate::agent::ErrorClass::Infrastructure);
}

#[tokio::test(start_paused = true)]
async fn a_silent_guest_is_blamed_when_the_harvest_deadline_fires() {
    let msgs = vec![hello(), exited_code(0), start(0)];
    let greeted = accept_hello(
        fake_guest(wire(&msgs), true),
        SessionLimits::default(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let job = Job {
        outputs: vec!["/nix/store/out".into()],
        ..Default::default()
    };
    let mut running = greeted.send_job(job).await.unwrap();
    let status = running.run(&mut DiscardLog).await.unwrap();
    let limits = HarvestLimits {
        deadline: Duration::from_secs(7),
        ..HarvestLimits::default()
    };
    let (blobs, dirs) = (MemoryBlobService::new(), RecordingDirs::default());
    let err = running
        .harvest(&status, &blobs, &dirs, &limits, &Scanner::none())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout(Timeout {
                which: DeadlineKind::Harvest,
                ..
            })
        ),
        "{err:?}"
    );
}

/// A memory blob service that counts the writers it opens.
#[derive(Default)]
struct CountingBlobs {
    inner: MemoryBlobService,
    writes: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl BlobService for CountingBlobs {
    async fn has(&self, digest: &B3Digest) -> Result<bool, crate::castore::Error> {
        self.inner.has(digest).await
    }
    async fn open_read(
        &self,
        digest: &B3Digest,
    ) -> Result<Option<Box<dyn crate::castore::BlobReader>>, crate::castore::Error> {
        self.inner.open_read(digest).await
    }
    async fn open_write(
        &self,
    ) -> Result<Box<dyn crate::castore::BlobWriter>, crate::castore::Error> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.open_write().await
    }
}

#[tokio::test]
async fn empty_files_cost_the_castore_one_write_per_harvest() {
    let mut children = Vec::new();
    for name in [&b"a"[..], b"b", b"c"] {
        children.extend(file(name, b"", false));
    }
    children.extend(file(b"d", b"data", false));
    let mut msgs = vec![hello(), exited_code(0)];
    msgs.extend(one_dir(children));
    let greeted = accept_hello(
        fake_guest(wire(&msgs), false),
        SessionLimits::default(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let job = Job {
        outputs: vec!["/nix/store/out".into()],
        ..Default::default()
    };
    let mut running = greeted.send_job(job).await.unwrap();
    let status = running.run(&mut DiscardLog).await.unwrap();
    let blobs = CountingBlobs::default();
    let dirs = RecordingDirs::default();
    let nodes = running
        .harvest(
            &status,
            &blobs,
            &dirs,
            &HarvestLimits::default(),
            &Scanner::none(),
        )
        .await
        .unwrap();
    assert_eq!(blobs.writes.load(std::sync::atomic::Ordering::Relaxed), 2);
    let empty = B3Digest::from(blake3::hash(b""));
    assert_eq!(blob(&blobs.inner, &empty).await.as_deref(), Some(&b""[..]));
    // The same tree as if every file had been written.
    let mut want = Directory::default();
    for name in ["a", "b", "c"] {
        want.try_insert(self::name(name), file_node(b"", false))
            .unwrap();
    }
    want.try_insert(self::name("d"), file_node(b"data", false))
        .unwrap();
    assert!(
        matches!(&nodes[0], Some(HarvestedOutput { node: Node::Directory { digest, .. }, .. }) if *digest == want.digest()),
        "{nodes:?}"
    );
}

#[tokio::test]
async fn needles_are_found_in_contents_and_targets_as_they_arrive_not_in_names() {
    let needles = ["aaaa", "bbbb", "cccc", "dddd", "eeee"].map(String::from);
    let scanner = Scanner::new(&needles).unwrap();
    // Output 0: "bbbb" straddles two chunks of one file, "aaaa" is whole in another file,
    // "cccc" is in a symlink target, "dddd" only in a name. Output 1: a file whose halves of
    // "aaaa" are in two different files (no match), and "eeee" at a file's root.
    let mut out0 = vec![start(0), dir(b"")];
    out0.push(file_entry(b"big", 8, false));
    out0.extend([chunk(b"..bb"), chunk(b"bb..")]);
    out0.extend(file(b"dddd-named", b"..aaaa..", false));
    out0.push(symlink(b"link", b"/nix/store/cccc-x"));
    out0.push(end());
    let mut msgs = out0;
    msgs.push(start(1));
    msgs.push(dir(b""));
    msgs.extend(file(b"x", b"..aa", false));
    msgs.extend(file(b"y", b"aa..", false));
    msgs.push(end());
    msgs.push(start(2));
    msgs.extend(file(b"", b"eeee", false));
    msgs.push(missing(3));
    msgs.push(done());
    let outputs = [
        "/nix/store/a",
        "/nix/store/b",
        "/nix/store/c",
        "/nix/store/d",
    ];
    let h = harvest_scanning(&outputs, &msgs, HarvestLimits::default(), false, &scanner).await;
    h.result.unwrap();
    assert_eq!(
        h.needles,
        [Some(vec![0, 1, 2]), Some(vec![]), Some(vec![4]), None]
    );
}
