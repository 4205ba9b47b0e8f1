//! Micro benchmarks (docs/benchmarks.md, row 7): castore import and hashing against plain BLAKE3 of
//! the same bytes, and the agent protocol's framing (encode/decode of frames).
//!
//! `cargo bench --bench castore` (add `-- --quick` for a short run). The VM harness
//! (`benches/vm`) reads these results back into its table.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tvix_build_vm::castore::blob::{put_bytes, LocalBlobService};
use tvix_build_vm::castore::directory_service::memory::MemoryDirectoryService;
use tvix_build_vm::castore::directory_service::RedbDirectoryService;
use tvix_build_vm::castore::import::import_path;
use tvix_build_vm::castore::{BlobService, DirectoryService};
use tvix_build_vm_agent::frame::{encode, Decoder};
use tvix_build_vm_agent::proto::{guest_message::Msg, FileChunk, GuestMessage, Log};

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A fresh store per iteration: a blob that already exists would not be written again.
struct Store {
    _dir: tempfile::TempDir,
    blobs: Arc<dyn BlobService>,
    dirs: Arc<dyn DirectoryService>,
}

fn fresh_store(redb: bool) -> Store {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs: Arc<dyn BlobService> =
        Arc::new(LocalBlobService::open(&dir.path().join("blobs")).expect("blob store"));
    let dirs: Arc<dyn DirectoryService> = if redb {
        Arc::new(RedbDirectoryService::open(&dir.path().join("d.redb")).expect("redb"))
    } else {
        Arc::new(MemoryDirectoryService::new())
    };
    Store {
        _dir: dir,
        blobs,
        dirs,
    }
}

fn import_group(c: &mut Criterion, name: &str, src: &Path, all_bytes: &[u8]) {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(all_bytes.len() as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    g.bench_function("blake3", |b| b.iter(|| blake3::hash(all_bytes)));
    g.bench_function("import_path", |b| {
        b.iter_batched(
            || fresh_store(true),
            |s| {
                rt.block_on(import_path(s.blobs.clone(), s.dirs.clone(), src))
                    .expect("import");
                s
            },
            BatchSize::PerIteration,
        )
    });
    // The same with directories in memory: what the blob side costs without redb's commit.
    g.bench_function("import_path_memory_dirs", |b| {
        b.iter_batched(
            || fresh_store(false),
            |s| {
                rt.block_on(import_path(s.blobs.clone(), s.dirs.clone(), src))
                    .expect("import");
                s
            },
            BatchSize::PerIteration,
        )
    });
    if std::fs::metadata(src).is_ok_and(|m| m.is_file()) {
        g.bench_function("put_bytes", |b| {
            b.iter_batched(
                || fresh_store(false),
                |s| {
                    rt.block_on(put_bytes(s.blobs.as_ref(), all_bytes))
                        .expect("put");
                    s
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn castore(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = pseudo_random(64 << 20, 1);
    let file = dir.path().join("big");
    std::fs::write(&file, &big).expect("write");
    import_group(c, "castore_file_64MiB", &file, &big);

    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).expect("mkdir");
    let mut all = Vec::new();
    for i in 0..1000u64 {
        let data = pseudo_random(16 << 10, i + 7);
        std::fs::write(tree.join(format!("f{i:04}")), &data).expect("write");
        all.extend_from_slice(&data);
    }
    import_group(c, "castore_tree_1000x16KiB", &tree, &all);
}

fn frames(c: &mut Criterion) {
    let chunk = GuestMessage {
        msg: Some(Msg::FileChunk(FileChunk {
            data: pseudo_random(256 << 10, 3),
        })),
    };
    let line = GuestMessage {
        msg: Some(Msg::Log(Log {
            stream: 1,
            data: b"building '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello-2.12.1.drv'...\n"
                .to_vec(),
        })),
    };
    let mut g = c.benchmark_group("agent_frame");
    for (label, msg) in [("256KiB_chunk", &chunk), ("log_line", &line)] {
        let framed = encode(msg).expect("encode");
        g.throughput(Throughput::Bytes(framed.len() as u64));
        g.bench_function(format!("encode_{label}"), |b| {
            b.iter(|| encode(std::hint::black_box(msg)).expect("encode"))
        });
        g.bench_function(format!("decode_{label}"), |b| {
            let mut decoder = Decoder::default();
            b.iter(|| {
                decoder.push(std::hint::black_box(&framed));
                decoder
                    .next::<GuestMessage>()
                    .expect("decode")
                    .expect("whole frame")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, castore, frames);
criterion_main!(benches);
