//! A deliberately hostile guest agent, for the adversarial VM tests only (built with the
//! `hostile` feature, never shipped in an initrd of a real service).
//!
//! It runs as PID 1 like the real agent, dials the host over vsock and then breaks the agent
//! protocol in the way the Job's `argv[0]` names (so one initrd serves every scenario);
//! `argv[1..]` are the scenario's numbers where it has any. The scenarios are listed in
//! [`Scenario::parse`]; each is what a compromised guest kernel or agent could send.
//!
//! After misbehaving, most scenarios hold the VM (never power off), the worst case for the
//! host, which must then kill the VM itself. `lying-length-close` and `stop-mid-file` close
//! the stream and power off, as a guest that crashes would; `symlink-escape` powers off after
//! a valid conversation, so that its build succeeds without waiting for the host's deadline.

#[allow(
    dead_code,
    reason = "shared with the real agent, which uses more of it"
)]
#[path = "../cmdline.rs"]
mod cmdline;
#[allow(dead_code, reason = "shared with the real agent")]
#[path = "../vsock.rs"]
mod vsock;

use std::io::{Read, Write};
use std::time::Duration;

use tvix_build_vm_agent::frame::{self, Decoder, FILE_CHUNK_BYTES, MAX_FRAME_BYTES};
use tvix_build_vm_agent::proto::{
    exited, guest_message::Msg, host_message, DirectoryEnd, Entry, EntryKind, Exited, FileChunk,
    GuestMessage, Hello, HostMessage, Job, Log, OutputStart, OutputsDone, Usage,
};
use tvix_build_vm_agent::PROTOCOL_VERSION;

/// What the hostile agent does once the host has sent its Job (or instead of a Hello).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scenario {
    /// A length prefix one byte over the frame limit, then a little of the "body".
    FrameTooLarge,
    /// A prefix announcing 1000 bytes, 10 bytes of body, then the stream is closed.
    LyingLengthClose,
    /// A prefix announcing 1000 bytes, 10 bytes of body, then nothing, forever.
    LyingLengthStall,
    /// A frame of valid length whose body is not protobuf.
    Garbage,
    /// Exit 0, then a directory output whose only (or second) child has a bad name.
    BadName(NameCase),
    /// A directory output holding symlinks to `/etc/shadow` and `../../../../etc/shadow`:
    /// valid castore content that the host must store without following. Powers off.
    SymlinkEscape,
    /// A chain of `n` nested directories.
    DeepTree(u64),
    /// A directory output with `n` empty files named by their zero-padded index.
    ManyFiles(u64),
    /// A directory output with `n` symlinks named by their zero-padded index.
    ManySymlinks(u64),
    /// A single file announced at `n` bytes, sent in full if the host keeps reading.
    BigFile(u64),
    /// `count` files of `size` zero bytes each, sent in full if the host keeps reading.
    ManyBigFiles { count: u64, size: u64 },
    /// A file announcing 10 bytes followed by a 20-byte chunk.
    SizeLieLong,
    /// A file announcing 20 bytes, a 10-byte chunk, then OutputsDone.
    SizeLieShort,
    /// A file announcing 1 MiB, 300 KiB of it, then the stream is closed.
    StopMidFile,
    /// Connects and never says anything.
    NoHello,
    /// Hello, the Job, then Hello again.
    HelloTwice,
    /// A Hello with a protocol version the host does not speak.
    WrongVersion,
    /// Exit 0 and OutputsDone without a single OutputStart.
    SuccessNoOutputs,
    /// A complete, valid conversation, but the VM never powers off afterwards.
    NoPowerOff,
    /// Exit 0 with resource figures no VM can reach (the largest numbers, a negative one
    /// as its two's complement), then one symlink per output. Powers off.
    AbsurdUsage,
}

/// The bad child names of [`Scenario::BadName`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameCase {
    DotDot,
    Dot,
    Slash,
    Empty,
    Nul,
    Duplicate,
    Unsorted,
}

impl Scenario {
    fn parse(argv: &[Vec<u8>]) -> Result<Self, String> {
        let arg = |i: usize| -> Result<u64, String> {
            let text = argv
                .get(i)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .ok_or_else(|| format!("argv[{i}] is missing"))?;
            text.parse()
                .map_err(|_| format!("argv[{i}] {text:?} is not a number"))
        };
        let name = argv
            .first()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_default();
        Ok(match name.as_str() {
            "frame-too-large" => Self::FrameTooLarge,
            "lying-length-close" => Self::LyingLengthClose,
            "lying-length-stall" => Self::LyingLengthStall,
            "garbage" => Self::Garbage,
            "name-dotdot" => Self::BadName(NameCase::DotDot),
            "name-dot" => Self::BadName(NameCase::Dot),
            "name-slash" => Self::BadName(NameCase::Slash),
            "name-empty" => Self::BadName(NameCase::Empty),
            "name-nul" => Self::BadName(NameCase::Nul),
            "name-duplicate" => Self::BadName(NameCase::Duplicate),
            "name-unsorted" => Self::BadName(NameCase::Unsorted),
            "symlink-escape" => Self::SymlinkEscape,
            "deep-tree" => Self::DeepTree(arg(1)?),
            "many-files" => Self::ManyFiles(arg(1)?),
            "many-symlinks" => Self::ManySymlinks(arg(1)?),
            "big-file" => Self::BigFile(arg(1)?),
            "many-big-files" => Self::ManyBigFiles {
                count: arg(1)?,
                size: arg(2)?,
            },
            "size-lie-long" => Self::SizeLieLong,
            "size-lie-short" => Self::SizeLieShort,
            "stop-mid-file" => Self::StopMidFile,
            "no-hello" => Self::NoHello,
            "hello-twice" => Self::HelloTwice,
            "wrong-version" => Self::WrongVersion,
            "success-no-outputs" => Self::SuccessNoOutputs,
            "no-power-off" => Self::NoPowerOff,
            "absurd-usage" => Self::AbsurdUsage,
            other => return Err(format!("unknown scenario {other:?}")),
        })
    }
}

/// The framed connection to the host.
struct Conn {
    stream: ::vsock::VsockStream,
}

impl Conn {
    fn raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes) {
            say(&format!("write to the host: {e}"));
            hold();
        }
    }

    fn send(&mut self, msg: Msg) {
        match frame::encode(&GuestMessage { msg: Some(msg) }) {
            Ok(bytes) => self.raw(&bytes),
            Err(e) => {
                say(&format!("encode: {e}"));
                hold()
            }
        }
    }

    fn recv(&mut self) -> HostMessage {
        let mut dec = Decoder::new(MAX_FRAME_BYTES);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match dec.next::<HostMessage>() {
                Ok(Some(msg)) => return msg,
                Ok(None) => {}
                Err(e) => {
                    say(&format!("bad frame from the host: {e}"));
                    hold()
                }
            }
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    say("the host closed the connection");
                    power_off()
                }
                Ok(n) => dec.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    say(&format!("read from the host: {e}"));
                    hold()
                }
            }
        }
    }

    /// Ends our side of the stream, lets the host read what is queued, powers off.
    fn close(&mut self) -> ! {
        let _ = self.stream.flush();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        std::thread::sleep(Duration::from_millis(200));
        power_off()
    }
}

fn say(text: &str) {
    eprintln!("hostile-agent: {text}");
}

/// Keeps the VM running forever: the host has to end it.
fn hold() -> ! {
    say("holding the VM");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    say(&format!("power off failed: {err:?}"));
    std::process::exit(1)
}

fn hello(version: u32) -> Msg {
    Msg::Hello(Hello {
        protocol_version: version,
        agent_version: "hostile".to_owned(),
        timings: None,
    })
}

fn exited_ok() -> Msg {
    Msg::Exited(Exited {
        status: Some(exited::Status::Code(0)),
        oom_killed: false,
        duration_us: 1,
        usage: None,
    })
}

fn entry(name: &[u8], kind: EntryKind, size: u64, target: &[u8]) -> Msg {
    Msg::Entry(Entry {
        name: name.to_vec(),
        kind: kind as i32,
        executable: false,
        size,
        target: target.to_vec(),
    })
}

fn dir(name: &[u8]) -> Msg {
    entry(name, EntryKind::Directory, 0, b"")
}

fn symlink(name: &[u8], target: &[u8]) -> Msg {
    entry(name, EntryKind::Symlink, 0, target)
}

fn end() -> Msg {
    Msg::DirectoryEnd(DirectoryEnd {})
}

fn start(index: u32) -> Msg {
    Msg::OutputStart(OutputStart {
        index,
        missing: false,
    })
}

fn chunk(data: &[u8]) -> Msg {
    Msg::FileChunk(FileChunk {
        data: data.to_vec(),
    })
}

fn done() -> Msg {
    Msg::OutputsDone(OutputsDone {})
}

/// Sends `size` zero bytes in chunks, as a file's contents.
fn zeros(conn: &mut Conn, size: u64) {
    let block = vec![0u8; FILE_CHUNK_BYTES];
    let mut left = size;
    while left > 0 {
        let n = left.min(FILE_CHUNK_BYTES as u64);
        conn.send(chunk(&block[..n as usize]));
        left -= n;
    }
}

/// Zero-padded so that byte order is numeric order.
fn index_name(i: u64) -> Vec<u8> {
    format!("{i:010}").into_bytes()
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("tvix-build-vm-hostile-agent: a test guest's init; it must run as PID 1");
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        say(&format!("panic: {info}"));
        power_off()
    }));
    let _ = nix::mount::mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    let port = cmdline::BootConfig::from_proc()
        .map(|c| c.agent_port)
        .unwrap_or(tvix_build_vm_agent::DEFAULT_AGENT_PORT);
    let stream = match vsock::dial(port) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("{e}"));
            power_off()
        }
    };
    let mut conn = Conn { stream };
    run(&mut conn)
}

/// Hello, the Job, then the scenario the Job names; or a scenario that acts before the Job.
fn run(conn: &mut Conn) -> ! {
    if let Some(scenario) = hello_scenario() {
        misbehave_before_job(conn, scenario)
    }
    conn.send(hello(PROTOCOL_VERSION));
    let job = match conn.recv().msg {
        Some(host_message::Msg::Job(job)) => job,
        None => {
            say("the host's message holds no Job");
            hold()
        }
    };
    match Scenario::parse(&job.argv) {
        Ok(scenario) => {
            say(&format!("scenario {scenario:?}"));
            misbehave(conn, &job, scenario)
        }
        Err(e) => {
            say(&e);
            conn.send(Msg::Failure(tvix_build_vm_agent::proto::AgentFailure {
                phase: "hostile".into(),
                message: e,
            }));
            hold()
        }
    }
}

/// Scenarios that act before (or instead of) the Hello cannot wait for the Job to name
/// them, and the host builds the initrd from the agent binary alone (as `/init`, so its file
/// name is lost too). What survives is the binary's contents: such a scenario is named by a
/// trailer the test appends to a copy of this executable (the kernel's ELF loader ignores
/// bytes after the last segment). See [`trailer`].
fn hello_scenario() -> Option<Scenario> {
    match trailer().as_deref() {
        Some("no-hello") => Some(Scenario::NoHello),
        Some("wrong-version") => Some(Scenario::WrongVersion),
        _ => None,
    }
}

/// Marker that precedes a scenario name appended to this executable.
const TRAILER_MARK: &[u8] = b"\nTVIX-HOSTILE-SCENARIO:";

/// The scenario name appended to `/init` after [`TRAILER_MARK`], if any.
fn trailer() -> Option<String> {
    let bytes = std::fs::read("/proc/self/exe").ok()?;
    let tail = &bytes[bytes.len().saturating_sub(256)..];
    let at = tail
        .windows(TRAILER_MARK.len())
        .rposition(|w| w == TRAILER_MARK)?;
    let name = &tail[at + TRAILER_MARK.len()..];
    Some(String::from_utf8_lossy(name).trim().to_owned())
}

fn misbehave_before_job(conn: &mut Conn, scenario: Scenario) -> ! {
    say(&format!("scenario {scenario:?}"));
    match scenario {
        Scenario::NoHello => hold(),
        Scenario::WrongVersion => {
            conn.send(hello(PROTOCOL_VERSION + 1));
            hold()
        }
        _ => hold(),
    }
}

fn misbehave(conn: &mut Conn, job: &Job, scenario: Scenario) -> ! {
    match scenario {
        Scenario::FrameTooLarge => {
            conn.send(Msg::Log(Log {
                stream: 1,
                data: b"about to send an oversized frame\n".to_vec(),
            }));
            let len = (MAX_FRAME_BYTES as u32) + 1;
            conn.raw(&len.to_be_bytes());
            conn.raw(&[0xaa; 16]);
            hold()
        }
        Scenario::LyingLengthClose | Scenario::LyingLengthStall => {
            conn.raw(&1000u32.to_be_bytes());
            conn.raw(&[0x12; 10]);
            if scenario == Scenario::LyingLengthClose {
                conn.close()
            }
            hold()
        }
        Scenario::Garbage => {
            conn.raw(&64u32.to_be_bytes());
            conn.raw(&[0xff; 64]);
            hold()
        }
        Scenario::BadName(case) => {
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(dir(b""));
            match case {
                NameCase::DotDot => conn.send(symlink(b"..", b"t")),
                NameCase::Dot => conn.send(symlink(b".", b"t")),
                NameCase::Slash => conn.send(symlink(b"a/b", b"t")),
                NameCase::Empty => conn.send(symlink(b"", b"t")),
                NameCase::Nul => conn.send(symlink(b"a\0b", b"t")),
                NameCase::Duplicate => {
                    conn.send(symlink(b"a", b"t"));
                    conn.send(symlink(b"a", b"t"));
                }
                NameCase::Unsorted => {
                    conn.send(symlink(b"b", b"t"));
                    conn.send(symlink(b"a", b"t"));
                }
            }
            conn.send(end());
            conn.send(done());
            hold()
        }
        Scenario::AbsurdUsage => {
            conn.send(Msg::Exited(Exited {
                status: Some(exited::Status::Code(0)),
                oom_killed: false,
                duration_us: u64::MAX,
                usage: Some(Usage {
                    cpu_user_us: Some(u64::MAX),
                    cpu_system_us: Some(-5i64 as u64),
                    memory_peak_bytes: Some(u64::MAX),
                    pids_peak: Some(1 << 40),
                }),
            }));
            for i in 0..job.outputs.len() {
                let Ok(index) = u32::try_from(i) else { hold() };
                conn.send(start(index));
                conn.send(entry(b"", EntryKind::Symlink, 0, b"target"));
            }
            conn.send(done());
            conn.close()
        }
        Scenario::SymlinkEscape => {
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(dir(b""));
            conn.send(symlink(b"escape", b"../../../../etc/shadow"));
            conn.send(symlink(b"shadow", b"/etc/shadow"));
            conn.send(end());
            conn.send(done());
            conn.close()
        }
        Scenario::DeepTree(n) => {
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(dir(b""));
            for _ in 0..n {
                conn.send(dir(b"d"));
            }
            for _ in 0..=n {
                conn.send(end());
            }
            conn.send(done());
            hold()
        }
        Scenario::ManyFiles(n) | Scenario::ManySymlinks(n) => {
            let files = matches!(scenario, Scenario::ManyFiles(_));
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(dir(b""));
            for i in 0..n {
                let name = index_name(i);
                if files {
                    conn.send(entry(&name, EntryKind::File, 0, b""));
                } else {
                    conn.send(symlink(&name, b"t"));
                }
            }
            conn.send(end());
            conn.send(done());
            hold()
        }
        Scenario::BigFile(size) => {
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(entry(b"", EntryKind::File, size, b""));
            zeros(conn, size);
            conn.send(done());
            hold()
        }
        Scenario::ManyBigFiles { count, size } => {
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(dir(b""));
            for i in 0..count {
                conn.send(entry(&index_name(i), EntryKind::File, size, b""));
                zeros(conn, size);
            }
            conn.send(end());
            conn.send(done());
            hold()
        }
        Scenario::SizeLieLong => {
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(entry(b"", EntryKind::File, 10, b""));
            conn.send(chunk(&[b'x'; 20]));
            conn.send(done());
            hold()
        }
        Scenario::SizeLieShort => {
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(entry(b"", EntryKind::File, 20, b""));
            conn.send(chunk(&[b'x'; 10]));
            conn.send(done());
            hold()
        }
        Scenario::StopMidFile => {
            conn.send(exited_ok());
            conn.send(start(0));
            conn.send(entry(b"", EntryKind::File, 1 << 20, b""));
            zeros(conn, 300 << 10);
            conn.close()
        }
        Scenario::HelloTwice => {
            conn.send(hello(PROTOCOL_VERSION));
            hold()
        }
        Scenario::SuccessNoOutputs => {
            conn.send(exited_ok());
            conn.send(done());
            hold()
        }
        Scenario::NoPowerOff => {
            conn.send(exited_ok());
            for i in 0..job.outputs.len() {
                let Ok(index) = u32::try_from(i) else { hold() };
                conn.send(start(index));
                conn.send(entry(b"", EntryKind::Symlink, 0, b"target"));
            }
            conn.send(done());
            hold()
        }
        Scenario::NoHello | Scenario::WrongVersion => misbehave_before_job(conn, scenario),
    }
}
