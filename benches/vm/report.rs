//! The result table (printed) and its JSON form.

use crate::stats::Summary;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// What a target bounds, and how.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The ratio must be at most this.
    RatioAtMost(f64),
    /// The ratio must be at least this.
    RatioAtLeast(f64),
    /// Our own figure must be at most this (absolute, in the row's unit).
    OursAtMost(f64),
    /// Reported for context only.
    None,
}

impl Target {
    fn show(self, unit: &str) -> String {
        match self {
            Target::RatioAtMost(x) => format!("<= {x}x"),
            Target::RatioAtLeast(x) => format!(">= {x}x"),
            Target::OursAtMost(x) => format!("<= {x} {unit}"),
            Target::None => "-".into(),
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Stable key, e.g. `trivial_vs_floor`.
    pub key: String,
    pub what: String,
    /// Unit of `ours` and `peer`.
    pub unit: String,
    pub ours: Option<Summary>,
    /// What we are compared with (the floor, virtiofsd, raw vsock, ...).
    pub peer_name: String,
    pub peer: Option<Summary>,
    /// Paired ratios, ours over peer unless `note` says otherwise.
    pub ratio: Option<Summary>,
    pub target: Target,
    /// Whether the median met the target; `None` when there is no target or no data.
    pub met: Option<bool>,
    pub note: String,
}

impl Row {
    pub fn new(key: &str, what: &str, unit: &str) -> Row {
        Row {
            key: key.into(),
            what: what.into(),
            unit: unit.into(),
            ours: None,
            peer_name: String::new(),
            peer: None,
            ratio: None,
            target: Target::None,
            met: None,
            note: String::new(),
        }
    }

    pub fn ours(mut self, samples: &[f64]) -> Row {
        self.ours = Summary::of(samples);
        self
    }

    pub fn peer(mut self, name: &str, samples: &[f64]) -> Row {
        self.peer_name = name.into();
        self.peer = Summary::of(samples);
        self
    }

    pub fn ratio(mut self, samples: &[f64]) -> Row {
        self.ratio = Summary::of(samples);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    /// Sets the target and judges the medians against it.
    pub fn target(mut self, target: Target) -> Row {
        self.target = target;
        self.met = match target {
            Target::RatioAtMost(x) => self.ratio.map(|r| r.median <= x),
            Target::RatioAtLeast(x) => self.ratio.map(|r| r.median >= x),
            Target::OursAtMost(x) => self.ours.map(|o| o.median <= x),
            Target::None => None,
        };
        self
    }
}

/// Where and when the figures were taken.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total: String,
    pub kernel: String,
    pub qemu: String,
    pub accel: String,
    pub loadavg_before: String,
    pub loadavg_after: String,
}

impl Machine {
    pub fn probe(qemu_version: String, accel: String) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default()
        };
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: field(&cpuinfo, "model name"),
            mem_total: field(&meminfo, "MemTotal"),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            qemu: qemu_version,
            accel,
            loadavg_before: loadavg(),
            loadavg_after: String::new(),
        }
    }
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub date_unix: u64,
    pub command: String,
    pub quick: bool,
    pub machine: Machine,
    pub rows: Vec<Row>,
}

/// Decimals that show three significant digits (at most six).
fn digits_for(x: f64) -> usize {
    if x == 0.0 || !x.is_finite() {
        return 2;
    }
    (2 - x.abs().log10().floor() as i64).clamp(0, 6) as usize
}

fn show(s: &Option<Summary>, unit: &str) -> String {
    match s {
        Some(s) => format!("{} {unit}", s.show(digits_for(s.median))),
        None => "-".into(),
    }
}

impl Report {
    /// The table as Markdown (readable in a terminal too).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| what | ours | peer / floor | ratio | target | met? |\n| --- | --- | --- | --- | --- | --- |"
        );
        for r in &self.rows {
            let peer = match &r.peer {
                Some(_) => format!("{}: {}", r.peer_name, show(&r.peer, &r.unit)),
                None if !r.peer_name.is_empty() => r.peer_name.clone(),
                None => "-".into(),
            };
            let ratio = match &r.ratio {
                Some(s) => format!("{}x", s.show(2)),
                None => "-".into(),
            };
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.what,
                show(&r.ours, &r.unit),
                peer,
                ratio,
                r.target.show(&r.unit),
                met
            );
        }
        let notes: Vec<&Row> = self.rows.iter().filter(|r| !r.note.is_empty()).collect();
        if !notes.is_empty() {
            out.push('\n');
            for r in notes {
                let _ = writeln!(out, "- {}: {}", r.what, r.note);
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).context("encoding the report")?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}
