use super::*;

const EMPTY_DIR_HEX: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

fn d32(b: u8) -> Bytes {
    Bytes::from(vec![b; 32])
}

fn dnode(name: &[u8], size: u64) -> pb::DirectoryNode {
    pb::DirectoryNode {
        name: Bytes::copy_from_slice(name),
        digest: d32(1),
        size,
    }
}

fn fnode(name: &[u8]) -> pb::FileNode {
    pb::FileNode {
        name: Bytes::copy_from_slice(name),
        digest: d32(2),
        size: 5,
        executable: false,
    }
}

fn snode(name: &[u8], target: &[u8]) -> pb::SymlinkNode {
    pb::SymlinkNode {
        name: Bytes::copy_from_slice(name),
        target: Bytes::copy_from_slice(target),
    }
}

fn invalid_name(d: pb::Directory) -> (Escaped, NameError) {
    match Directory::try_from(d) {
        Err(ValidationError::InvalidName { name, source }) => (name, source),
        other => panic!("expected InvalidName, got {other:?}"),
    }
}

#[test]
fn golden_empty_directory_digest() {
    let d = Directory::new();
    assert!(d.encode().is_empty());
    assert_eq!(d.digest().to_hex(), EMPTY_DIR_HEX);
    assert_eq!(d.size(), 0);
}

#[test]
fn bad_names_are_rejected_naming_the_entry() {
    let long = vec![b'a'; 256];
    let cases: Vec<(Vec<u8>, NameError)> = vec![
        (b"".to_vec(), NameError::Empty),
        (b".".to_vec(), NameError::Dot),
        (b"..".to_vec(), NameError::Dot),
        (long.clone(), NameError::TooLong(256)),
        (b"a\0b".to_vec(), NameError::ContainsNul),
        (b"a/b".to_vec(), NameError::ContainsSlash),
    ];
    for (name, want) in cases {
        for list in 0..3 {
            let mut d = pb::Directory::default();
            match list {
                0 => d.directories.push(dnode(&name, 0)),
                1 => d.files.push(fnode(&name)),
                _ => d.symlinks.push(snode(&name, b"t")),
            }
            let (got_name, got) = invalid_name(d);
            assert_eq!(got, want, "list {list}");
            assert_eq!(got_name.0.as_ref(), name.as_slice());
        }
    }
}

#[test]
fn any_other_bytes_are_valid_names() {
    for name in [&b"\xff\xfe"[..], b"...", b"a b", b"\n", &[b'x'; 255][..]] {
        assert!(PathComponent::try_from(name).is_ok(), "{name:?}");
    }
}

#[test]
fn error_message_names_the_entry() {
    let mut d = pb::Directory::default();
    d.files.push(fnode(b"bad/name"));
    let msg = Directory::try_from(d).unwrap_err().to_string();
    assert!(msg.contains("bad/name"), "{msg}");
}

#[test]
fn duplicates_within_a_list_are_rejected() {
    let mut d = pb::Directory::default();
    d.files.push(fnode(b"a"));
    d.files.push(fnode(b"a"));
    assert!(matches!(
        Directory::try_from(d),
        Err(ValidationError::DuplicateName { name }) if name.0.as_ref() == b"a"
    ));
}

#[test]
fn duplicates_across_lists_are_rejected() {
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        let mut d = pb::Directory::default();
        for list in [a, b] {
            match list {
                0 => d.directories.push(dnode(b"x", 0)),
                1 => d.files.push(fnode(b"x")),
                _ => d.symlinks.push(snode(b"x", b"t")),
            }
        }
        assert!(
            matches!(
                Directory::try_from(d),
                Err(ValidationError::DuplicateName { .. })
            ),
            "lists {a} and {b}"
        );
    }
}

#[test]
fn wrong_sorting_is_rejected_in_each_list() {
    for list in 0..3 {
        let mut d = pb::Directory::default();
        for name in [b"b", b"a"] {
            match list {
                0 => d.directories.push(dnode(name, 0)),
                1 => d.files.push(fnode(name)),
                _ => d.symlinks.push(snode(name, b"t")),
            }
        }
        match Directory::try_from(d) {
            Err(ValidationError::WrongSorting { name, previous }) => {
                assert_eq!(name.0.as_ref(), b"a");
                assert_eq!(previous.0.as_ref(), b"b");
            }
            other => panic!("list {list}: {other:?}"),
        }
    }
}

#[test]
fn sorting_is_by_raw_bytes() {
    // "B" (0x42) < "a" (0x61) < "\xff": byte order, not locale or UTF-8 order.
    let mut d = pb::Directory::default();
    d.files.push(fnode(b"B"));
    d.files.push(fnode(b"a"));
    d.files.push(fnode(b"\xff"));
    assert!(Directory::try_from(d).is_ok());
}

#[test]
fn bad_digest_lengths_are_rejected() {
    let mut d = pb::Directory::default();
    let mut n = dnode(b"a", 0);
    n.digest = Bytes::from_static(b"short");
    d.directories.push(n);
    assert!(matches!(
        Directory::try_from(d),
        Err(ValidationError::InvalidDigest {
            source: DigestError::WrongLength(5),
            ..
        })
    ));
    let mut d = pb::Directory::default();
    let mut n = fnode(b"a");
    n.digest = Bytes::new();
    d.files.push(n);
    assert!(matches!(
        Directory::try_from(d),
        Err(ValidationError::InvalidDigest {
            source: DigestError::WrongLength(0),
            ..
        })
    ));
}

#[test]
fn symlink_targets_are_checked() {
    let cases: Vec<(Vec<u8>, SymlinkTargetError)> = vec![
        (vec![], SymlinkTargetError::Empty),
        (vec![b'a'; 4096], SymlinkTargetError::TooLong(4096)),
        (b"a\0".to_vec(), SymlinkTargetError::ContainsNul),
    ];
    for (target, want) in cases {
        let mut d = pb::Directory::default();
        d.symlinks.push(snode(b"l", &target));
        match Directory::try_from(d) {
            Err(ValidationError::InvalidSymlinkTarget { name, source }) => {
                assert_eq!(source, want);
                assert_eq!(name.0.as_ref(), b"l");
            }
            other => panic!("{other:?}"),
        }
    }
    for ok in [&b"/abs/olute"[..], b"../x", &[b'a'; 4095][..]] {
        assert!(SymlinkTarget::try_from(ok).is_ok());
    }
}

#[test]
fn size_is_the_spec_value() {
    let mut d = pb::Directory::default();
    d.directories.push(dnode(b"a", 3));
    d.directories.push(dnode(b"b", 0));
    d.files.push(fnode(b"c"));
    d.symlinks.push(snode(b"d", b"t"));
    let dir = Directory::try_from(d).unwrap();
    assert_eq!(dir.size(), 4 + 3);
    assert_eq!(dir.len(), 4);
}

#[test]
fn size_overflow_is_an_error() {
    let mut d = pb::Directory::default();
    d.directories.push(dnode(b"a", u64::MAX));
    assert!(matches!(
        Directory::try_from(d),
        Err(ValidationError::SizeOverflow { .. })
    ));
    let mut d = pb::Directory::default();
    d.directories.push(dnode(b"a", u64::MAX - 1));
    d.files.push(fnode(b"b"));
    assert!(matches!(
        Directory::try_from(d),
        Err(ValidationError::SizeOverflow { name }) if name.0.as_ref() == b"b"
    ));
}

#[test]
fn undersized_child_is_rejected_oversized_accepted() {
    let mut child = Directory::new();
    child
        .try_insert(
            PathComponent::try_from("f").unwrap(),
            Node::Symlink {
                target: SymlinkTarget::try_from("t").unwrap(),
            },
        )
        .unwrap();
    let name = PathComponent::try_from("c").unwrap();
    let digest = child.digest();
    assert!(check_child_size(&name, 1, &child, digest).is_ok());
    assert!(check_child_size(&name, 2, &child, digest).is_ok());
    assert!(matches!(
        check_child_size(&name, 0, &child, digest),
        Err(ValidationError::UndersizedDirectory {
            size: 0,
            expected: 1,
            ..
        })
    ));
}

#[test]
fn canonical_encoding_round_trips_and_omits_defaults() {
    let mut d = pb::Directory::default();
    d.directories.push(dnode(b"a", 0));
    d.files.push(fnode(b"b"));
    d.symlinks.push(snode(b"c", b"/t"));
    let bytes = d.encode_to_vec();
    let dir = Directory::try_from(d.clone()).unwrap();
    assert_eq!(dir.to_proto(), d);
    assert_eq!(dir.encode(), bytes);
    assert_eq!(dir.digest(), B3Digest::of(&bytes));
    // size 0 and executable false are not on the wire: name (1+1+1) + digest (1+1+32).
    let mut only = pb::Directory::default();
    only.directories.push(dnode(b"a", 0));
    assert_eq!(only.encode_to_vec().len(), 2 + 3 + 34);
}

#[test]
fn node_proto_round_trip_and_unset_oneof() {
    let node = Node::File {
        digest: B3Digest::of(b"x"),
        size: 1,
        executable: true,
    };
    let p = node.to_proto(Bytes::from_static(b"name"));
    let (name, back) = Node::from_proto(p).unwrap();
    assert_eq!(name.as_bytes(), b"name");
    assert_eq!(back, node);
    assert!(matches!(
        Node::from_proto(pb::Node { node: None }),
        Err(ValidationError::NoNodeType { .. })
    ));
    // A root node must have a valid name.
    assert!(matches!(
        Node::from_proto(node.to_proto(Bytes::new())),
        Err(ValidationError::InvalidName {
            source: NameError::Empty,
            ..
        })
    ));
}

#[test]
fn anonymous_nodes() {
    let node = Node::Directory {
        digest: B3Digest::of(b"d"),
        size: 4,
    };
    let (name, back) = Node::from_proto_anonymous(node.to_proto(Bytes::new())).unwrap();
    assert_eq!((name, back), (None, node.clone()));
    let (name, _) = Node::from_proto_anonymous(node.to_proto(Bytes::from_static(b"n"))).unwrap();
    assert_eq!(name.unwrap().as_bytes(), b"n");
    assert!(matches!(
        Node::from_proto_anonymous(node.to_proto(Bytes::from_static(b".."))),
        Err(ValidationError::InvalidName {
            source: NameError::Dot,
            ..
        })
    ));
    let bad = pb::Node {
        node: Some(pb::node::Node::Symlink(pb::SymlinkNode {
            name: Bytes::new(),
            target: Bytes::new(),
        })),
    };
    assert!(matches!(
        Node::from_proto_anonymous(bad),
        Err(ValidationError::InvalidSymlinkTarget {
            source: SymlinkTargetError::Empty,
            ..
        })
    ));
}

#[test]
fn try_insert_rejects_duplicates() {
    let mut d = Directory::new();
    let n = PathComponent::try_from("a").unwrap();
    let sym = Node::Symlink {
        target: SymlinkTarget::try_from("t").unwrap(),
    };
    d.try_insert(n.clone(), sym.clone()).unwrap();
    assert!(matches!(
        d.try_insert(n, sym),
        Err(ValidationError::DuplicateName { .. })
    ));
    assert_eq!(d.size(), 1);
    assert!(d.get(b"a").is_some());
    assert!(d.get(b"b").is_none());
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = PathComponent> {
        proptest::collection::vec(any::<u8>(), 1..20)
            .prop_filter_map("valid name", |v| PathComponent::try_from(v).ok())
    }

    fn node() -> impl Strategy<Value = Node> {
        prop_oneof![
            (any::<[u8; 32]>(), 0u64..1_000_000).prop_map(|(d, size)| Node::Directory {
                digest: d.into(),
                size
            }),
            (any::<[u8; 32]>(), any::<u64>(), any::<bool>()).prop_map(|(d, size, executable)| {
                Node::File {
                    digest: d.into(),
                    size,
                    executable,
                }
            }),
            proptest::collection::vec(1u8..=255, 1..50).prop_map(|t| Node::Symlink {
                target: SymlinkTarget::try_from(t).unwrap()
            }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_digest_round_trip(entries in proptest::collection::vec((name(), node()), 0..20)) {
            let mut d = Directory::new();
            for (n, node) in entries {
                let _ = d.try_insert(n, node);
            }
            let bytes = d.encode();
            let decoded = pb::Directory::decode(bytes.as_slice()).unwrap();
            let back = Directory::try_from(decoded).unwrap();
            prop_assert_eq!(back.digest(), d.digest());
            prop_assert_eq!(back.encode(), bytes);
            prop_assert_eq!(back.size(), d.size());
            prop_assert_eq!(&back, &d);
        }
    }
}
