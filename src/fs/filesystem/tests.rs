//! Unit tests calling the `FileSystem` methods directly, over an in-memory content source.

use super::*;
use crate::castore::B3Digest;
use crate::fs::blob::BlobBody;
use crate::fs::inode::ROOT_INO;
use crate::fs::listing::FsNode;
use bytes::Bytes;
use std::collections::HashMap;
use std::fs::File;
use std::io::SeekFrom;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use virtiofsd::oslib::ReadvFlags;
use virtiofsd::soft_idmap::{GuestGid, GuestUid};

fn ctx() -> Context {
    Context {
        uid: GuestUid::from(1000),
        gid: GuestGid::from(100),
        pid: 1,
    }
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// A seekable in-memory reader that counts its seeks.
struct CountingReader {
    data: Bytes,
    pos: u64,
    seeks: Arc<AtomicUsize>,
}

impl AsyncRead for CountingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = (self.pos as usize).min(self.data.len());
        // Small pieces, like a network stream, so the fill loop is exercised.
        let n = buf.remaining().min(self.data.len() - start).min(1000);
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for CountingReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        self.seeks.fetch_add(1, Ordering::SeqCst);
        match position {
            SeekFrom::Start(p) => self.pos = p,
            _ => return Err(io::Error::other("only SeekFrom::Start is used")),
        }
        Ok(())
    }
    fn poll_complete(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BlobMode {
    Stream,
    LocalFile,
}

struct FakeSource {
    rt: tokio::runtime::Runtime,
    dirs: HashMap<B3Digest, Vec<(Vec<u8>, FsNode)>>,
    blobs: HashMap<B3Digest, Bytes>,
    mode: BlobMode,
    listing_calls: AtomicUsize,
    seeks: Arc<AtomicUsize>,
    tmp: tempfile::TempDir,
}

impl ContentSource for FakeSource {
    fn listing(&self, digest: &B3Digest) -> Result<Listing, FsError> {
        self.listing_calls.fetch_add(1, Ordering::SeqCst);
        let entries = self
            .dirs
            .get(digest)
            .ok_or(FsError::DirectoryMissing { digest: *digest })?;
        Listing::from_entries(digest, entries.clone())
    }

    fn open_blob(&self, digest: &B3Digest) -> Result<BlobBody, FsError> {
        let data = self
            .blobs
            .get(digest)
            .ok_or(FsError::BlobMissing { digest: *digest })?;
        Ok(match self.mode {
            BlobMode::Stream => BlobBody::Stream(Box::new(CountingReader {
                data: data.clone(),
                pos: 0,
                seeks: self.seeks.clone(),
            })),
            BlobMode::LocalFile => {
                let path = self.tmp.path().join(digest.to_hex());
                std::fs::write(&path, data).map_err(|source| FsError::BlobRead {
                    digest: *digest,
                    offset: 0,
                    source,
                })?;
                BlobBody::File(File::open(&path).map_err(|source| FsError::BlobRead {
                    digest: *digest,
                    offset: 0,
                    source,
                })?)
            }
        })
    }

    fn runtime(&self) -> &tokio::runtime::Handle {
        self.rt.handle()
    }
}

/// Collects what the filesystem moves "into guest memory"; `cap` plays the guest buffer.
struct VecWriter {
    data: Vec<u8>,
    cap: usize,
}

impl VecWriter {
    fn new(cap: usize) -> Self {
        Self {
            data: Vec::new(),
            cap,
        }
    }
}

impl ZeroCopyWriter for VecWriter {
    fn read_from_file_at(
        &mut self,
        f: &File,
        count: usize,
        off: u64,
        _flags: Option<ReadvFlags>,
    ) -> io::Result<usize> {
        let count = count.min(self.cap - self.data.len());
        let mut buf = vec![0u8; count];
        let mut done = 0;
        while done < count {
            let n = f.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        self.data.extend_from_slice(&buf[..done]);
        Ok(done)
    }
}

fn file_node(data: &[u8], executable: bool) -> FsNode {
    FsNode::File {
        digest: B3Digest::of(data),
        size: data.len() as u64,
        executable,
    }
}

fn big_blob() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// root: bin (dir: hello exe), data (file), link -> data, sub (dir: a, b, c), gone (dir not
/// in the store), hole (file whose blob is missing), short (file whose blob is shorter than
/// its node says).
fn fixture_with(mode: BlobMode, limits: FsLimits) -> (CastoreFs, Arc<FakeSource>) {
    let (root, source) = fixture_parts(mode);
    let fs = CastoreFs::new(root, source.clone(), limits);
    (fs, source)
}

/// The fixture's root entries and content source.
fn fixture_parts(mode: BlobMode) -> (Listing, Arc<FakeSource>) {
    let hello = b"#!/bin/sh\necho hi\n".to_vec();
    let data = big_blob();
    let mut blobs = HashMap::new();
    blobs.insert(B3Digest::of(&hello), Bytes::from(hello.clone()));
    blobs.insert(B3Digest::of(&data), Bytes::from(data.clone()));
    blobs.insert(B3Digest::of(b"a"), Bytes::from_static(b"a"));
    let short_digest = B3Digest::of(b"short");
    blobs.insert(short_digest, Bytes::from_static(b"sho"));

    let bin = B3Digest::of(b"bin-dir");
    let sub = B3Digest::of(b"sub-dir");
    let mut dirs = HashMap::new();
    dirs.insert(bin, vec![(b"hello".to_vec(), file_node(&hello, true))]);
    dirs.insert(
        sub,
        vec![
            (b"c".to_vec(), file_node(b"a", false)),
            (b"a".to_vec(), file_node(b"a", false)),
            (b"b".to_vec(), FsNode::Directory { digest: bin }),
        ],
    );
    let root = Listing::from_entries(
        &B3Digest::of(b"root"),
        vec![
            (b"bin".to_vec(), FsNode::Directory { digest: bin }),
            (b"data".to_vec(), file_node(&data, false)),
            (
                b"link".to_vec(),
                FsNode::Symlink {
                    target: Bytes::from_static(b"data"),
                },
            ),
            (b"sub".to_vec(), FsNode::Directory { digest: sub }),
            (
                b"gone".to_vec(),
                FsNode::Directory {
                    digest: B3Digest::of(b"nowhere"),
                },
            ),
            (b"hole".to_vec(), file_node(b"never stored", false)),
            (
                b"short".to_vec(),
                FsNode::File {
                    digest: short_digest,
                    size: 5,
                    executable: false,
                },
            ),
        ],
    )
    .unwrap();
    let source = Arc::new(FakeSource {
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap(),
        dirs,
        blobs,
        mode,
        listing_calls: AtomicUsize::new(0),
        seeks: Arc::new(AtomicUsize::new(0)),
        tmp: tempfile::tempdir().unwrap(),
    });
    (root, source)
}

fn fixture(mode: BlobMode) -> (CastoreFs, Arc<FakeSource>) {
    fixture_with(mode, FsLimits::default())
}

fn lookup_path(fs: &CastoreFs, path: &[&CStr]) -> Entry {
    let mut ino = ROOT_INO;
    let mut last = None;
    for name in path {
        let e = fs.lookup(ctx(), ino, name).unwrap();
        assert_ne!(e.inode, 0, "{name:?} not found");
        ino = e.inode;
        last = Some(e);
    }
    last.unwrap()
}

fn read_all(fs: &CastoreFs, ino: u64, h: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
    let mut w = VecWriter::new(usize::MAX / 2);
    let n = fs.read(ctx(), ino, h, &mut w, size, offset, None, 0)?;
    assert_eq!(n, w.data.len());
    Ok(w.data)
}

#[test]
fn a_pending_root_mounts_and_answers_once_assigned() {
    let (root, source) = fixture_parts(BlobMode::Stream);
    let (fs, assigner) = CastoreFs::with_pending_root(source, FsLimits::default());
    let fs = Arc::new(fs);
    // What a mount needs works before the root's entries are known.
    fs.init(FsOptions::empty()).unwrap();
    let (attr, _) = fs.getattr(ctx(), ROOT_INO, None).unwrap();
    assert_eq!(attr.mode, libc::S_IFDIR | 0o555);
    fs.statfs(ctx(), ROOT_INO).unwrap();
    fs.opendir(ctx(), ROOT_INO, 0).unwrap();

    // A lookup waits for the assignment, then sees the entries.
    let waiting = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.lookup(ctx(), ROOT_INO, c"data").map(|e| e.inode))
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !waiting.is_finished(),
        "the lookup did not wait for the root"
    );
    assigner.assign(root);
    let ino = waiting.join().unwrap().unwrap();
    assert_ne!(ino, 0);
    assert_eq!(lookup_path(&fs, &[c"sub", c"b", c"hello"]).attr.size, 18);
}

#[test]
fn lookup_and_getattr_give_nix_style_attributes() {
    let (fs, _) = fixture(BlobMode::Stream);
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap();
    let a = data.attr;
    assert_eq!(a.mode, libc::S_IFREG | 0o444);
    assert_eq!(a.size, 300_000);
    assert_eq!(a.blocks, 300_000u64.div_ceil(512));
    assert_eq!((a.nlink, a.blksize), (1, 4096));
    assert_eq!((a.atime, a.mtime, a.ctime), (1, 1, 1));
    assert_eq!((a.uid, a.gid), (GuestUid::from(0), GuestGid::from(0)));
    assert_eq!(a.ino, data.inode);
    assert!(data.entry_timeout >= Duration::from_secs(86400));
    assert!(data.attr_timeout >= Duration::from_secs(86400));

    let (again, timeout) = fs.getattr(ctx(), data.inode, None).unwrap();
    assert_eq!((again.ino, again.mode, again.size), (a.ino, a.mode, a.size));
    assert!(timeout >= Duration::from_secs(86400));

    let bin = fs.lookup(ctx(), ROOT_INO, c"bin").unwrap();
    assert_eq!(bin.attr.mode, libc::S_IFDIR | 0o555);
    assert_eq!(bin.attr.nlink, 2);
    let hello = fs.lookup(ctx(), bin.inode, c"hello").unwrap();
    assert_eq!(hello.attr.mode, libc::S_IFREG | 0o555);
    let link = fs.lookup(ctx(), ROOT_INO, c"link").unwrap();
    assert_eq!(link.attr.mode, libc::S_IFLNK | 0o777);
    assert_eq!(link.attr.size, 4);

    let (root, _) = fs.getattr(ctx(), ROOT_INO, None).unwrap();
    assert_eq!(root.mode, libc::S_IFDIR | 0o555);
    assert_eq!(root.ino, ROOT_INO);

    // Same entry, same inode; lookups are counted.
    let data2 = fs.lookup(ctx(), ROOT_INO, c"data").unwrap();
    assert_eq!(data2.inode, data.inode);
    assert_eq!(fs.inodes().lookups(data.inode), Some(2));
}

#[test]
fn missing_names_are_cacheable_negative_entries_and_bad_inodes_fail() {
    let (fs, _) = fixture(BlobMode::Stream);
    let e = fs.lookup(ctx(), ROOT_INO, c"nope").unwrap();
    assert_eq!(e.inode, 0);
    assert!(e.entry_timeout >= Duration::from_secs(86400));
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap();
    assert_eq!(
        errno(fs.lookup(ctx(), data.inode, c"x").err().unwrap()),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs.getattr(ctx(), 999_999, None).unwrap_err()),
        libc::ESTALE
    );
    assert_eq!(
        errno(fs.lookup(ctx(), 999_999, c"x").err().unwrap()),
        libc::ESTALE
    );
}

#[test]
fn directories_are_fetched_lazily_once() {
    let (fs, src) = fixture(BlobMode::Stream);
    assert_eq!(src.listing_calls.load(Ordering::SeqCst), 0);
    let sub = fs.lookup(ctx(), ROOT_INO, c"sub").unwrap();
    assert_eq!(src.listing_calls.load(Ordering::SeqCst), 0);
    fs.lookup(ctx(), sub.inode, c"a").unwrap();
    fs.lookup(ctx(), sub.inode, c"b").unwrap();
    fs.readdir(ctx(), sub.inode, 0, 4096, 0).unwrap();
    assert_eq!(src.listing_calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_missing_directory_is_eio_not_a_panic() {
    let (fs, _) = fixture(BlobMode::Stream);
    let gone = fs.lookup(ctx(), ROOT_INO, c"gone").unwrap();
    assert_eq!(
        errno(fs.lookup(ctx(), gone.inode, c"x").err().unwrap()),
        libc::EIO
    );
    assert_eq!(
        errno(fs.readdir(ctx(), gone.inode, 0, 4096, 0).err().unwrap()),
        libc::EIO
    );
}

fn collect(it: &mut ListingIter) -> Vec<(Vec<u8>, u64, u64, u32)> {
    let mut out = Vec::new();
    while let Some(e) = it.next() {
        out.push((e.name.to_bytes().to_vec(), e.offset, e.ino, e.type_));
    }
    out
}

#[test]
fn readdir_lists_in_name_order_with_resumable_offsets() {
    let (fs, _) = fixture(BlobMode::Stream);
    let sub = fs.lookup(ctx(), ROOT_INO, c"sub").unwrap();
    let all = collect(&mut fs.readdir(ctx(), sub.inode, 0, 4096, 0).unwrap());
    let names: Vec<&[u8]> = all.iter().map(|e| e.0.as_slice()).collect();
    assert_eq!(names, vec![&b"a"[..], b"b", b"c"]);
    assert_eq!(all.iter().map(|e| e.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(all[1].3, u32::from(libc::DT_DIR));
    assert_eq!(all[0].3, u32::from(libc::DT_REG));
    // Inode numbers agree with lookup (a and c have identical content: one inode).
    let b = fs.lookup(ctx(), sub.inode, c"b").unwrap();
    assert_eq!(all[1].2, b.inode);
    assert_eq!(all[0].2, all[2].2);
    // Resuming at an entry's offset continues right after it.
    let rest = collect(&mut fs.readdir(ctx(), sub.inode, 0, 4096, 2).unwrap());
    assert_eq!(rest.len(), 1);
    assert_eq!((rest[0].0.as_slice(), rest[0].1), (&b"c"[..], 3));
    assert!(collect(&mut fs.readdir(ctx(), sub.inode, 0, 4096, 3).unwrap()).is_empty());
    assert!(collect(&mut fs.readdir(ctx(), sub.inode, 0, 4096, u64::MAX).unwrap()).is_empty());
    // A small reply buffer gets a small window, and the rest follows from its offset.
    let first = collect(&mut fs.readdir(ctx(), sub.inode, 0, 40, 0).unwrap());
    assert_eq!(first.len(), 2);
    let next = collect(&mut fs.readdir(ctx(), sub.inode, 0, 40, first[1].1).unwrap());
    assert_eq!(next[0].0, b"c");
    // The root lists exactly the input nodes.
    let root = collect(&mut fs.readdir(ctx(), ROOT_INO, 0, 4096, 0).unwrap());
    let names: Vec<&[u8]> = root.iter().map(|e| e.0.as_slice()).collect();
    assert_eq!(
        names,
        vec![
            &b"bin"[..],
            b"data",
            b"gone",
            b"hole",
            b"link",
            b"short",
            b"sub"
        ]
    );
    // Not a directory.
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap();
    assert_eq!(
        errno(fs.readdir(ctx(), data.inode, 0, 4096, 0).err().unwrap()),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs.opendir(ctx(), data.inode, 0).unwrap_err()),
        libc::ENOTDIR
    );
    let (h, opts) = fs.opendir(ctx(), sub.inode, 0).unwrap();
    assert!(h.is_none());
    assert!(opts.contains(OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE));
}

fn check_reads_at_offsets(mode: BlobMode) {
    let (fs, src) = fixture(mode);
    let want = big_blob();
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap();
    let (h, opts) = fs
        .open(ctx(), data.inode, false, libc::O_RDONLY as u32)
        .unwrap();
    let h = h.unwrap();
    assert!(opts.contains(OpenOptions::KEEP_CACHE));

    // Sequential reads, 128 KiB at a time, reassemble the blob without seeking.
    let mut got = Vec::new();
    let mut off = 0u64;
    loop {
        let chunk = read_all(&fs, data.inode, h, off, 128 * 1024).unwrap();
        if chunk.is_empty() {
            break;
        }
        off += chunk.len() as u64;
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, want);
    if mode == BlobMode::Stream {
        assert_eq!(
            src.seeks.load(Ordering::SeqCst),
            0,
            "sequential reads must not seek"
        );
    }

    // Arbitrary offsets, including across the end and past it.
    for (off, len) in [
        (12345u64, 1000u32),
        (0, 1),
        (299_990, 100),
        (150_000, 70_000),
    ] {
        let chunk = read_all(&fs, data.inode, h, off, len).unwrap();
        let end = (off as usize + len as usize).min(want.len());
        assert_eq!(chunk, &want[off as usize..end], "read at {off}+{len}");
    }
    assert!(read_all(&fs, data.inode, h, 300_000, 10)
        .unwrap()
        .is_empty());
    assert!(read_all(&fs, data.inode, h, u64::MAX, 10)
        .unwrap()
        .is_empty());

    // A guest buffer smaller than the request gets a short read, and the next read at the
    // right offset is still correct.
    let mut w = VecWriter::new(100);
    let n = fs
        .read(ctx(), data.inode, h, &mut w, 4096, 5000, None, 0)
        .unwrap();
    assert_eq!((n, w.data.as_slice()), (100, &want[5000..5100]));
    assert_eq!(
        read_all(&fs, data.inode, h, 5100, 50).unwrap(),
        &want[5100..5150]
    );

    fs.release(ctx(), data.inode, 0, h, false, false, None)
        .unwrap();
    assert_eq!(fs.open_handles(), 0);
    assert_eq!(
        errno(read_all(&fs, data.inode, h, 0, 10).unwrap_err()),
        libc::EBADF
    );
}

#[test]
fn reads_at_offsets_from_a_stream() {
    check_reads_at_offsets(BlobMode::Stream);
}

#[test]
fn reads_at_offsets_from_a_local_file() {
    check_reads_at_offsets(BlobMode::LocalFile);
}

#[test]
fn concurrent_readers_see_correct_bytes() {
    let (fs, _) = fixture(BlobMode::Stream);
    let want = big_blob();
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap();
    let shared = fs
        .open(ctx(), data.inode, false, libc::O_RDONLY as u32)
        .unwrap()
        .0
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (fs, want) = (&fs, &want);
            s.spawn(move || {
                let own = fs
                    .open(ctx(), data.inode, false, libc::O_RDONLY as u32)
                    .unwrap()
                    .0
                    .unwrap();
                for i in 0..50u64 {
                    let off = (t * 7919 + i * 5171) % 290_000;
                    for h in [own, shared] {
                        let got = read_all(fs, data.inode, h, off, 4096).unwrap();
                        assert_eq!(got, &want[off as usize..off as usize + 4096]);
                    }
                }
            });
        }
    });
}

#[test]
fn missing_or_short_blobs_are_eio() {
    for mode in [BlobMode::Stream, BlobMode::LocalFile] {
        let (fs, _) = fixture(mode);
        let hole = fs.lookup(ctx(), ROOT_INO, c"hole").unwrap();
        assert_eq!(
            errno(fs.open(ctx(), hole.inode, false, 0).unwrap_err()),
            libc::EIO
        );
        assert_eq!(fs.open_handles(), 0);
        let short = fs.lookup(ctx(), ROOT_INO, c"short").unwrap();
        let err = match fs.open(ctx(), short.inode, false, 0) {
            // A streamed blob is only found short when read.
            Ok((h, _)) => read_all(&fs, short.inode, h.unwrap(), 0, 4096).unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(errno(err), libc::EIO);
    }
}

#[test]
fn readlink_returns_the_target() {
    let (fs, _) = fixture(BlobMode::Stream);
    let link = fs.lookup(ctx(), ROOT_INO, c"link").unwrap();
    assert_eq!(fs.readlink(ctx(), link.inode).unwrap(), b"data");
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap();
    assert_eq!(
        errno(fs.readlink(ctx(), data.inode).unwrap_err()),
        libc::EINVAL
    );
}

#[test]
fn everything_that_writes_is_erofs() {
    let (fs, _) = fixture(BlobMode::Stream);
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap().inode;
    let ext = Extensions::default;
    let erofs = |r: io::Result<()>| assert_eq!(errno(r.unwrap_err()), libc::EROFS);
    erofs(fs.mkdir(ctx(), ROOT_INO, c"d", 0o755, 0, ext()).map(drop));
    erofs(
        fs.create(ctx(), ROOT_INO, c"f", 0o644, false, 0, 0, ext())
            .map(drop),
    );
    erofs(
        fs.mknod(ctx(), ROOT_INO, c"n", 0o644, 0, 0, ext())
            .map(drop),
    );
    erofs(fs.symlink(ctx(), c"t", ROOT_INO, c"s", ext()).map(drop));
    erofs(fs.link(ctx(), data, ROOT_INO, c"l").map(drop));
    erofs(fs.unlink(ctx(), ROOT_INO, c"data"));
    erofs(fs.rmdir(ctx(), ROOT_INO, c"bin"));
    erofs(fs.rename(ctx(), ROOT_INO, c"data", ROOT_INO, c"x", 0));
    erofs(
        fs.setattr(
            ctx(),
            data,
            fuse::SetattrIn::default(),
            None,
            SetattrValid::MODE,
        )
        .map(drop),
    );
    erofs(fs.setxattr(ctx(), data, c"user.x", b"1", 0, SetxattrFlags::empty()));
    erofs(fs.removexattr(ctx(), data, c"user.x"));
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        erofs(fs.open(ctx(), data, false, flags as u32).map(drop));
    }
    let h = fs.open(ctx(), data, false, 0).unwrap().0.unwrap();
    erofs(
        fs.write(ctx(), data, h, NoBytes, 1, 0, None, false, false, 0)
            .map(drop),
    );
    erofs(fs.fallocate(ctx(), data, h, 0, 0, 10));
    erofs(
        fs.copyfilerange(ctx(), data, h, 0, data, h, 10, 1, 0)
            .map(drop),
    );
    erofs(fs.access(ctx(), data, libc::W_OK as u32));
}

/// A write payload that must never be touched.
struct NoBytes;
impl ZeroCopyReader for NoBytes {
    fn write_to_file_at(
        &mut self,
        _f: &File,
        _count: usize,
        _off: u64,
        _flags: Option<virtiofsd::oslib::WritevFlags>,
    ) -> io::Result<usize> {
        panic!("a read-only filesystem consumed write data");
    }
}

#[test]
fn xattrs_are_absent_and_access_follows_the_mode() {
    let (fs, _) = fixture(BlobMode::Stream);
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap().inode;
    let bin = fs.lookup(ctx(), ROOT_INO, c"bin").unwrap().inode;
    let hello = fs.lookup(ctx(), bin, c"hello").unwrap().inode;
    assert_eq!(
        errno(
            fs.getxattr(ctx(), data, c"security.capability", 0)
                .err()
                .unwrap()
        ),
        libc::ENODATA
    );
    assert!(matches!(
        fs.listxattr(ctx(), data, 0).unwrap(),
        ListxattrReply::Count(0)
    ));
    assert!(matches!(
        fs.listxattr(ctx(), data, 100).unwrap(),
        ListxattrReply::Names(n) if n.is_empty()
    ));
    fs.access(ctx(), data, libc::R_OK as u32).unwrap();
    assert_eq!(
        errno(fs.access(ctx(), data, libc::X_OK as u32).unwrap_err()),
        libc::EACCES
    );
    fs.access(ctx(), hello, (libc::R_OK | libc::X_OK) as u32)
        .unwrap();
    fs.access(ctx(), bin, libc::X_OK as u32).unwrap();
    let st = fs.statfs(ctx(), ROOT_INO).unwrap();
    assert_eq!((st.f_namemax, st.f_bsize), (255, 4096));
}

#[test]
fn opening_a_directory_or_symlink_fails() {
    let (fs, _) = fixture(BlobMode::Stream);
    let bin = fs.lookup(ctx(), ROOT_INO, c"bin").unwrap().inode;
    assert_eq!(
        errno(fs.open(ctx(), bin, false, 0).unwrap_err()),
        libc::EISDIR
    );
    let link = fs.lookup(ctx(), ROOT_INO, c"link").unwrap().inode;
    assert!(fs.open(ctx(), link, false, 0).is_err());
    assert_eq!(fs.open_handles(), 0);
}

#[test]
fn open_handles_are_capped() {
    let limits = FsLimits {
        max_handles: 2,
        ..FsLimits::default()
    };
    let (fs, _) = fixture_with(BlobMode::LocalFile, limits);
    let data = fs.lookup(ctx(), ROOT_INO, c"data").unwrap().inode;
    let a = fs.open(ctx(), data, false, 0).unwrap().0.unwrap();
    let _b = fs.open(ctx(), data, false, 0).unwrap().0.unwrap();
    assert_eq!(
        errno(fs.open(ctx(), data, false, 0).unwrap_err()),
        libc::ENFILE
    );
    fs.release(ctx(), data, 0, a, false, false, None).unwrap();
    fs.open(ctx(), data, false, 0).unwrap();
    // Releasing an unknown handle is an error, not a panic.
    assert_eq!(
        errno(
            fs.release(ctx(), data, 0, 4242, false, false, None)
                .unwrap_err()
        ),
        libc::EBADF
    );
    fs.destroy();
    assert_eq!(fs.open_handles(), 0);
}

#[test]
fn lookups_and_forgets_keep_the_inode_table_bounded() {
    let limits = FsLimits {
        max_inodes: 8,
        ..FsLimits::default()
    };
    let (fs, _) = fixture_with(BlobMode::Stream, limits);
    let sub = lookup_path(&fs, &[c"sub"]).inode;
    for _ in 0..1000 {
        for name in [c"a", c"b", c"c"] {
            let e = fs.lookup(ctx(), sub, name).unwrap();
            fs.forget(ctx(), e.inode, 1);
        }
        for name in [c"data", c"link", c"bin", c"hole"] {
            let e = fs.lookup(ctx(), ROOT_INO, name).unwrap();
            fs.batch_forget(ctx(), vec![(e.inode, 1)]);
        }
        assert!(fs.inodes().len() <= 8);
    }
    // Hostile counts: a huge forget or forgetting unknown inodes changes nothing harmful.
    fs.forget(ctx(), sub, u64::MAX);
    fs.forget(ctx(), 77_777, 3);
    fs.forget(ctx(), ROOT_INO, 3);
    assert_eq!(fs.inodes().lookups(sub), Some(0));
    let (root, _) = fs.getattr(ctx(), ROOT_INO, None).unwrap();
    assert_eq!(root.ino, ROOT_INO);
}

#[test]
fn init_asks_for_the_caching_features() {
    let (fs, _) = fixture(BlobMode::Stream);
    let got = fs.init(FsOptions::all()).unwrap();
    assert!(
        got.contains(FsOptions::DO_READDIRPLUS | FsOptions::CACHE_SYMLINKS | FsOptions::MAX_PAGES)
    );
    assert!(!got.contains(FsOptions::WRITEBACK_CACHE));
    // Nothing the kernel did not offer.
    assert_eq!(fs.init(FsOptions::empty()).unwrap(), FsOptions::empty());
}
