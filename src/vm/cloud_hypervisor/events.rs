//! Reading cloud-hypervisor's `--event-monitor path=<file>`.
//!
//! cloud-hypervisor appends one pretty-printed JSON object per event and then a blank line,
//! in two separate writes, so a reader can catch an object half-written. [`EventLog`] reads
//! what was appended since its last call, parses every complete object and keeps the
//! incomplete rest for the next call.
//!
//! Several events follow what the guest does (a reboot loop emits two per round), so every
//! read is bounded: one event at most [`MAX_EVENT_BYTES`], the whole file at most
//! [`MAX_LOG_BYTES`]. A single-use VM ends at its first reboot, far below either bound.
//!
//! Unknown fields are accepted on purpose: the event format is cloud-hypervisor's to extend,
//! and a new field must not blind the host to the guest's reboot.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The largest single event accepted.
pub const MAX_EVENT_BYTES: usize = 64 << 10;
/// The most bytes read from one event file.
pub const MAX_LOG_BYTES: u64 = 4 << 20;

/// Errors reading the event file.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The file could not be read.
    #[error("reading events from {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something in the file is not an event.
    #[error("{path}: malformed event at byte {offset}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Where the bad event starts.
        offset: u64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An event is longer than [`MAX_EVENT_BYTES`] without ending.
    #[error("{path}: an event at byte {offset} exceeds {MAX_EVENT_BYTES} bytes")]
    EventTooLong {
        /// The file.
        path: PathBuf,
        /// Where it starts.
        offset: u64,
    },
    /// The file grew past [`MAX_LOG_BYTES`].
    #[error("{path}: more than {MAX_LOG_BYTES} bytes of events")]
    LogTooLong {
        /// The file.
        path: PathBuf,
    },
}

/// When an event happened, relative to cloud-hypervisor's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds.
    pub secs: u64,
    /// Nanoseconds.
    pub nanos: u32,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Event {
    /// When.
    pub timestamp: Timestamp,
    /// Who emitted it: `vm`, `vmm`, a device...
    pub source: String,
    /// What happened: `booted`, `shutdown`, `rebooting`...
    pub event: String,
    /// Details, if any.
    #[serde(default)]
    pub properties: Option<BTreeMap<String, String>>,
}

impl Event {
    /// Whether this is `source`/`event`.
    pub fn is(&self, source: &str, event: &str) -> bool {
        self.source == source && self.event == event
    }

    /// The guest started a reboot (or a panic): a single-use VM is over, and cloud-hypervisor
    /// would otherwise boot it a second time inside the same process.
    pub fn ends_the_guest(&self) -> bool {
        self.is("vm", "rebooting") || self.is("vm", "rebooted") || self.is("vm", "panic")
    }
}

/// An event file being followed. Missing counts as empty: cloud-hypervisor creates it.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    /// Bytes of the file consumed so far (read, whether parsed yet or not).
    read: u64,
    /// Read but not yet a complete event.
    pending: Vec<u8>,
}

impl EventLog {
    /// Follows `path` from its start.
    pub fn new(path: &Path) -> Self {
        EventLog {
            path: path.to_owned(),
            read: 0,
            pending: Vec::new(),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete events appended since the last call.
    pub fn read_new(&mut self) -> Result<Vec<Event>, EventError> {
        let read_err = |source| EventError::Read {
            path: self.path.clone(),
            source,
        };
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(read_err(e)),
        };
        file.seek(SeekFrom::Start(self.read)).map_err(read_err)?;
        // One byte over the budget tells "exactly full" from "grew past it".
        let budget = MAX_LOG_BYTES + 1 - self.read;
        let before = self.pending.len();
        file.take(budget)
            .read_to_end(&mut self.pending)
            .map_err(read_err)?;
        self.read += (self.pending.len() - before) as u64;
        if self.read > MAX_LOG_BYTES {
            return Err(EventError::LogTooLong {
                path: self.path.clone(),
            });
        }
        self.parse()
    }

    fn parse(&mut self) -> Result<Vec<Event>, EventError> {
        let start_of_pending = self.read - self.pending.len() as u64;
        let mut events = Vec::new();
        let mut stream = serde_json::Deserializer::from_slice(&self.pending).into_iter::<Event>();
        let mut consumed = 0;
        loop {
            match stream.next() {
                None => {
                    consumed = self.pending.len();
                    break;
                }
                Some(Ok(event)) => {
                    events.push(event);
                    consumed = stream.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(source)) => {
                    return Err(EventError::Malformed {
                        path: self.path.clone(),
                        offset: start_of_pending + consumed as u64,
                        source,
                    })
                }
            }
        }
        self.pending.drain(..consumed);
        if self.pending.len() > MAX_EVENT_BYTES {
            return Err(EventError::EventTooLong {
                path: self.path.clone(),
                offset: start_of_pending + consumed as u64,
            });
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An event as cloud-hypervisor writes it: pretty JSON, then a blank line.
    fn written(secs: u64, source: &str, event: &str) -> String {
        let value = serde_json::json!({
            "timestamp": {"secs": secs, "nanos": 5},
            "source": source,
            "event": event,
            "properties": null,
        });
        format!(
            "{}\n\n",
            serde_json::to_string_pretty(&value).expect("json")
        )
    }

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open");
        f.write_all(text.as_bytes()).expect("write");
    }

    #[test]
    fn follows_a_growing_file_across_partial_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.json");
        let mut log = EventLog::new(&path);
        assert!(log.read_new().expect("missing is empty").is_empty());

        let booting = written(0, "vm", "booting");
        let booted = written(1, "vm", "booted");
        append(&path, &booting);
        // Half of the next object: nothing yet, and nothing lost.
        let (head, tail) = booted.split_at(booted.len() / 2);
        append(&path, head);
        let first = log.read_new().expect("read");
        assert_eq!(first.len(), 1);
        assert!(first[0].is("vm", "booting"));
        assert_eq!(first[0].timestamp, Timestamp { secs: 0, nanos: 5 });
        assert!(log.read_new().expect("read").is_empty());
        append(&path, tail);
        append(&path, &written(2, "vm", "rebooting"));
        let next = log.read_new().expect("read");
        let names: Vec<_> = next.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["booted", "rebooting"]);
        assert!(next[1].ends_the_guest() && !next[0].ends_the_guest());
    }

    #[test]
    fn properties_and_unknown_fields_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.json");
        append(
            &path,
            "{\"timestamp\":{\"secs\":3,\"nanos\":0},\"source\":\"virtio-device\",\
             \"event\":\"activated\",\"properties\":{\"id\":\"fs0\"},\"new\":1}\n\n",
        );
        let events = EventLog::new(&path).read_new().expect("read");
        assert_eq!(
            events[0]
                .properties
                .as_ref()
                .and_then(|p| p.get("id"))
                .map(String::as_str),
            Some("fs0")
        );
    }

    #[test]
    fn garbage_is_an_error_naming_the_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.json");
        let first = written(0, "vm", "booting");
        append(&path, &first);
        append(&path, "{\"timestamp\": 7}\n\n");
        let err = EventLog::new(&path).read_new().expect_err("malformed");
        match err {
            EventError::Malformed { offset, .. } => {
                // The bad object starts after the first event (serde skips the blank line).
                assert!(offset >= first.trim_end().len() as u64, "{offset}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn an_endless_event_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.json");
        append(
            &path,
            &format!("{{\"source\": \"{}", "x".repeat(MAX_EVENT_BYTES)),
        );
        let err = EventLog::new(&path).read_new().expect_err("too long");
        assert!(
            matches!(err, EventError::EventTooLong { offset: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn the_whole_file_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.json");
        let one = written(0, "vm", "rebooting");
        let mut text = String::new();
        while (text.len() as u64) <= MAX_LOG_BYTES {
            text.push_str(&one);
        }
        append(&path, &text);
        let err = EventLog::new(&path).read_new().expect_err("too long");
        assert!(matches!(err, EventError::LogTooLong { .. }), "{err}");
    }
}
