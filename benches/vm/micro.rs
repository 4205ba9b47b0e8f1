//! Section 7 in the table: the criterion micro benchmarks (`benches/castore.rs`) are run
//! separately (`cargo bench --bench castore`, which scripts/bench.sh does first); their
//! latest estimates are read back from criterion's output directory.

use crate::report::Row;
use std::path::{Path, PathBuf};

fn criterion_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp; criterion writes <target>/criterion.
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().map_or_else(
        || PathBuf::from("target/criterion"),
        |t| t.join("criterion"),
    )
}

/// The mean time in nanoseconds of `group/bench`, if criterion has measured it.
fn mean_ns(group: &str, bench: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v.get("mean")?.get("point_estimate")?.as_f64()
}

/// Rows comparing castore import/hash with plain BLAKE3, and the framing figures.
pub fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mib_s = |bytes: f64, ns: f64| bytes / (1 << 20) as f64 / (ns / 1e9);
    for (group, bytes, what) in [
        (
            "castore_file_64MiB",
            64.0 * (1 << 20) as f64,
            "7a. castore import of one 64 MiB file",
        ),
        (
            "castore_tree_1000x16KiB",
            1000.0 * 16384.0,
            "7b. castore import of 1,000 files of 16 KiB",
        ),
    ] {
        let (Some(import), Some(plain)) = (mean_ns(group, "import_path"), mean_ns(group, "blake3"))
        else {
            rows.push(
                Row::new(group, what, "MiB/s")
                    .note("no criterion results: run `cargo bench --bench castore`"),
            );
            continue;
        };
        let mut row = Row::new(group, what, "MiB/s")
            .ours(&[mib_s(bytes, import)])
            .peer("plain BLAKE3", &[mib_s(bytes, plain)])
            .ratio(&[plain / import])
            .note("criterion means; import_path into a fresh local blob store + redb, vs blake3::hash of the same bytes in memory");
        if let Some(put) = mean_ns(group, "put_bytes") {
            row.note.push_str(&format!(
                "; put_bytes (hash + write, no file read) {:.0} MiB/s",
                mib_s(bytes, put)
            ));
        }
        rows.push(row);
    }
    for (bench, what) in [
        (
            "encode_256KiB_chunk",
            "7c. frame encode of a 256 KiB file chunk",
        ),
        (
            "decode_256KiB_chunk",
            "7d. frame decode of a 256 KiB file chunk",
        ),
        ("encode_log_line", "7e. frame encode of an 80-byte log line"),
        ("decode_log_line", "7f. frame decode of an 80-byte log line"),
    ] {
        if let Some(ns) = mean_ns("agent_frame", bench) {
            let mut row = Row::new(&format!("frame_{bench}"), what, "us").ours(&[ns / 1e3]);
            if bench.contains("256KiB") {
                row = row.note(format!("{:.0} MiB/s", mib_s(262144.0, ns)));
            }
            rows.push(row);
        }
    }
    rows
}
