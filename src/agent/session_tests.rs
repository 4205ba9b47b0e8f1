//! Tests of the conversation up to the command's exit, against a fake guest.

use super::*;
use crate::agent::error::{BuildFailure, ErrorClass, Limit, ProtocolError};
use crate::agent::log::{DiscardLog, LogChunk};
use crate::agent::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tvix_build_vm_agent::frame::{self, Decoder, FrameError};
use tvix_build_vm_agent::proto::{host_message, AgentFailure as ProtoFailure, Hello};

const HELLO_DEADLINE: Duration = Duration::from_secs(10);

fn job(outputs: &[&str]) -> Job {
    Job {
        argv: vec![b"/bin/sh".to_vec()],
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn greet(msgs: &[Msg], hold_open: bool) -> Result<Greeted<DuplexStream>, Error> {
    greet_with(msgs, hold_open, SessionLimits::default()).await
}

async fn greet_with(
    msgs: &[Msg],
    hold_open: bool,
    limits: SessionLimits,
) -> Result<Greeted<DuplexStream>, Error> {
    accept_hello(fake_guest(wire(msgs), hold_open), limits, HELLO_DEADLINE).await
}

/// Hello, the job, then `run` over `msgs`; returns the result and the session.
async fn run_with(
    msgs: &[Msg],
    hold_open: bool,
    limits: SessionLimits,
) -> (Result<ExitStatus, Error>, Running<DuplexStream>) {
    let mut all = vec![hello()];
    all.extend_from_slice(msgs);
    let greeted = greet_with(&all, hold_open, limits).await.unwrap();
    let mut running = greeted.send_job(job(&["/nix/store/out"])).await.unwrap();
    let result = running.run(&mut DiscardLog).await;
    (result, running)
}

fn failure(phase: &str, message: &str) -> Msg {
    Msg::Failure(ProtoFailure {
        phase: phase.into(),
        message: message.into(),
    })
}

#[tokio::test]
async fn a_good_hello_is_accepted() {
    let greeted = greet(&[hello()], false).await.unwrap();
    assert_eq!(greeted.hello().agent_version, "test-agent 0");
}

#[tokio::test]
async fn another_protocol_version_is_refused_naming_both() {
    let mut bad = hello();
    if let Msg::Hello(h) = &mut bad {
        h.protocol_version = PROTOCOL_VERSION + 1;
    }
    let err = greet(&[bad], false).await.err().unwrap();
    assert!(matches!(
        err,
        Error::Protocol(ProtocolError::Version { got, want }) if got == PROTOCOL_VERSION + 1 && want == PROTOCOL_VERSION
    ));
    assert!(err.source_chain_contains(&format!("version {}", PROTOCOL_VERSION + 1)));
    assert_eq!(err.class(), ErrorClass::GuestMisbehaved);
}

#[tokio::test(start_paused = true)]
async fn no_hello_fires_the_hello_deadline() {
    let begun = Instant::now();
    let err = greet(&[], true).await.err().unwrap();
    assert!(matches!(
        err,
        Error::Timeout(Timeout { which: DeadlineKind::Hello, after }) if after == HELLO_DEADLINE
    ));
    assert!(begun.elapsed() >= HELLO_DEADLINE);
}

#[tokio::test]
async fn anything_but_hello_first_is_refused() {
    let err = greet(&[log(1, b"hi")], false).await.err().unwrap();
    assert!(matches!(
        err,
        Error::Protocol(ProtocolError::Unexpected {
            phase: Phase::Hello,
            expected: "Hello",
            got: "Log"
        })
    ));
}

#[tokio::test]
async fn a_closed_connection_before_hello_is_reported() {
    let err = greet(&[], false).await.err().unwrap();
    assert!(matches!(
        err,
        Error::Protocol(ProtocolError::Closed {
            phase: Phase::Hello,
            mid_frame: false
        })
    ));
}

#[tokio::test]
async fn a_second_hello_is_refused() {
    let (result, _) = run_with(&[hello()], false, SessionLimits::default()).await;
    assert!(matches!(
        result,
        Err(Error::Protocol(ProtocolError::Unexpected {
            phase: Phase::Run,
            got: "Hello",
            ..
        }))
    ));
}

#[tokio::test]
async fn garbage_bytes_are_a_frame_error() {
    let mut bytes = 5u32.to_be_bytes().to_vec();
    bytes.extend([0xff; 5]);
    let err = accept_hello(
        fake_guest(bytes, false),
        SessionLimits::default(),
        HELLO_DEADLINE,
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(
        err,
        Error::Protocol(ProtocolError::Frame {
            phase: Phase::Hello,
            source: FrameError::Decode(_)
        })
    ));
}

#[tokio::test]
async fn a_length_prefix_over_the_limit_is_refused() {
    let bytes = (frame::MAX_FRAME_BYTES as u32 + 1).to_be_bytes().to_vec();
    let err = accept_hello(
        fake_guest(bytes, true),
        SessionLimits::default(),
        HELLO_DEADLINE,
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(
        err,
        Error::Protocol(ProtocolError::Frame {
            source: FrameError::TooLarge { .. },
            ..
        })
    ));
}

#[tokio::test]
async fn a_long_agent_version_is_refused() {
    let long = Msg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "v".repeat(129),
        timings: None,
    });
    let err = greet(&[long], false).await.err().unwrap();
    assert!(matches!(
        err,
        Error::Limit(LimitExceeded {
            limit: Limit::AgentVersionBytes,
            value: 129,
            max: 128,
            ..
        })
    ));
}

#[tokio::test]
async fn an_agent_failure_instead_of_hello_carries_phase_and_message() {
    let err = greet(&[failure("mount /nix/store", "ENODEV")], false)
        .await
        .err()
        .unwrap();
    assert!(matches!(
        &err,
        Error::Agent(AgentFailure { phase, message }) if phase == "mount /nix/store" && message == "ENODEV"
    ));
}

#[tokio::test]
async fn the_job_arrives_at_the_guest() {
    let (host, mut guest) = tokio::io::duplex(64 * 1024);
    guest.write_all(&wire(&[hello()])).await.unwrap();
    let greeted = accept_hello(host, SessionLimits::default(), HELLO_DEADLINE)
        .await
        .unwrap();
    let sent = job(&["/nix/store/a", "/nix/store/b"]);
    let running = greeted.send_job(sent.clone()).await.unwrap();
    assert_eq!(running.outputs(), ["/nix/store/a", "/nix/store/b"]);

    let mut dec = Decoder::default();
    let got = loop {
        if let Some(m) = dec.next::<HostMessage>().unwrap() {
            break m;
        }
        let mut buf = vec![0u8; dec.wanted().unwrap()];
        guest.read_exact(&mut buf).await.unwrap();
        dec.push(&buf);
    };
    assert_eq!(got.msg, Some(host_message::Msg::Job(sent)));
}

#[tokio::test]
async fn logs_are_forwarded_and_the_tail_kept() {
    let msgs = [
        hello(),
        log(1, b"out 1\n"),
        log(2, b"err 1\n"),
        log(1, b"out 2\n"),
        exited_code(0),
    ];
    let limits = SessionLimits {
        log_tail_bytes: 8,
        ..Default::default()
    };
    let greeted = greet_with(&msgs, false, limits).await.unwrap();
    let mut running = greeted.send_job(job(&[])).await.unwrap();
    let (mut tx, mut rx) = tokio::sync::mpsc::channel::<LogChunk>(16);
    let status = running.run(&mut tx).await.unwrap();
    assert_eq!(status.kind, ExitKind::Code(0));
    assert!(status.check().is_ok());
    drop(tx);
    let mut got = Vec::new();
    while let Some(c) = rx.recv().await {
        got.push((c.stream, c.data.to_vec()));
    }
    assert_eq!(
        got,
        [
            (LogStream::Stdout, b"out 1\n".to_vec()),
            (LogStream::Stderr, b"err 1\n".to_vec()),
            (LogStream::Stdout, b"out 2\n".to_vec()),
        ]
    );
    assert_eq!(running.log_tail().to_vec(), b"1\nout 2\n");
    assert_eq!(running.log_tail().total_bytes(), 18);
}

#[tokio::test]
async fn exit_statuses_map_to_build_failures() {
    let code = |c| exited_code(c);
    let (status, _) = run_with(&[code(3)], false, SessionLimits::default()).await;
    let status = status.unwrap();
    assert_eq!(status.check(), Err(BuildFailure::ExitCode(3)));
    assert_eq!(
        Error::from(status.check().unwrap_err()).class(),
        ErrorClass::BuildFailed
    );

    let signal = Msg::Exited(Exited {
        status: Some(exited::Status::Signal(9)),
        oom_killed: true,
        duration_us: 5,
        usage: None,
    });
    let (status, _) = run_with(&[signal], false, SessionLimits::default()).await;
    let status = status.unwrap();
    assert!(status.oom_killed);
    assert_eq!(
        status.check(),
        Err(BuildFailure::OutOfMemory(ExitKind::Signal(9)))
    );
    assert!(status.check().unwrap_err().to_string().contains("OOM"));

    let plain_signal = Msg::Exited(Exited {
        status: Some(exited::Status::Signal(15)),
        oom_killed: false,
        duration_us: 5,
        usage: None,
    });
    let (status, _) = run_with(&[plain_signal], false, SessionLimits::default()).await;
    assert_eq!(status.unwrap().check(), Err(BuildFailure::Signal(15)));
}

#[tokio::test]
async fn the_guests_figures_are_bounded_never_refused() {
    let absurd = Msg::Exited(Exited {
        status: Some(exited::Status::Code(0)),
        oom_killed: false,
        duration_us: u64::MAX,
        usage: Some(tvix_build_vm_agent::proto::Usage {
            cpu_user_us: Some(u64::MAX),
            cpu_system_us: Some(-1i64 as u64),
            memory_peak_bytes: Some(u64::MAX),
            pids_peak: Some(u64::MAX),
        }),
    });
    let before = std::time::Instant::now();
    let (status, _) = run_with(&[absurd], false, SessionLimits::default()).await;
    let status = status.unwrap();
    assert_eq!(status.check(), Ok(()));
    let u = &status.usage;
    assert_eq!(
        u.clamped,
        ["cpu_user", "cpu_system", "memory_peak", "pids_peak"]
    );
    // At most the time the session took, on every vCPU a VM can have.
    let most = before.elapsed() * crate::vm::MAX_VCPUS;
    assert!(u.cpu().unwrap() <= most, "{:?} > {most:?}", u.cpu());
    assert!(u.memory_peak_bytes.unwrap() <= u64::from(crate::vm::MAX_MEMORY_MIB) << 20);
    assert!(u.pids_peak.unwrap() <= 4 << 20);

    // An agent that reports nothing leaves every figure absent.
    let (status, _) = run_with(&[exited_code(0)], false, SessionLimits::default()).await;
    assert_eq!(status.unwrap().usage, crate::agent::GuestUsage::default());
}

#[tokio::test]
async fn invalid_exit_statuses_are_refused() {
    let exited = |status| {
        Msg::Exited(Exited {
            status,
            oom_killed: false,
            duration_us: 0,
            usage: None,
        })
    };
    type Check = fn(&Error) -> bool;
    let cases: [(Msg, Check); 5] = [
        (exited(None), |e| {
            matches!(e, Error::Protocol(ProtocolError::ExitStatusMissing))
        }),
        (exited(Some(exited::Status::Signal(0))), |e| {
            matches!(e, Error::Protocol(ProtocolError::SignalOutOfRange(0)))
        }),
        (exited(Some(exited::Status::Signal(65))), |e| {
            matches!(e, Error::Protocol(ProtocolError::SignalOutOfRange(65)))
        }),
        (exited(Some(exited::Status::Code(256))), |e| {
            matches!(e, Error::Protocol(ProtocolError::ExitCodeOutOfRange(256)))
        }),
        (exited(Some(exited::Status::Code(-1))), |e| {
            matches!(e, Error::Protocol(ProtocolError::ExitCodeOutOfRange(-1)))
        }),
    ];
    for (msg, check) in cases {
        let (result, _) =
            run_with(std::slice::from_ref(&msg), false, SessionLimits::default()).await;
        let err = result.err().unwrap();
        assert!(check(&err), "{msg:?} gave {err:?}");
    }
}

#[tokio::test]
async fn a_log_on_an_unknown_stream_is_refused() {
    let (result, _) = run_with(&[log(0, b"x")], false, SessionLimits::default()).await;
    assert!(matches!(
        result,
        Err(Error::Protocol(ProtocolError::LogStream(0)))
    ));
}

#[tokio::test]
async fn the_log_limit_ends_the_build() {
    let limits = SessionLimits {
        max_log_bytes: 10,
        ..Default::default()
    };
    let (result, running) = run_with(
        &[log(1, b"123456"), log(2, b"789012"), exited_code(0)],
        false,
        limits,
    )
    .await;
    assert!(matches!(
        result,
        Err(Error::Limit(LimitExceeded {
            limit: Limit::LogBytes,
            value: 12,
            max: 10,
            at: None
        }))
    ));
    assert_eq!(running.log_tail().to_vec(), b"123456789012");
}

#[tokio::test(start_paused = true)]
async fn the_silence_deadline_fires_and_says_so() {
    let limits = SessionLimits {
        silence: Some(Duration::from_secs(30)),
        wall: Some(Duration::from_secs(3600)),
        ..Default::default()
    };
    let begun = Instant::now();
    let (result, running) = run_with(&[log(1, b"last words")], true, limits).await;
    let err = result.err().unwrap();
    assert!(matches!(
        err,
        Error::Timeout(Timeout {
            which: DeadlineKind::Silence,
            after
        }) if after == Duration::from_secs(30)
    ));
    assert_eq!(err.class(), ErrorClass::BuildFailed);
    assert!(begun.elapsed() >= Duration::from_secs(30));
    assert!(begun.elapsed() < Duration::from_secs(3600));
    assert_eq!(running.log_tail().to_vec(), b"last words");
}

#[tokio::test(start_paused = true)]
async fn the_wall_deadline_fires_even_while_logs_flow() {
    let limits = SessionLimits {
        silence: Some(Duration::from_secs(5)),
        wall: Some(Duration::from_secs(20)),
        ..Default::default()
    };
    // A guest that logs every second, forever.
    let (host, mut guest) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        guest.write_all(&wire(&[hello()])).await?;
        loop {
            guest.write_all(&wire(&[log(1, b"tick\n")])).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    });
    let begun = Instant::now();
    let greeted = accept_hello(host, limits, HELLO_DEADLINE).await.unwrap();
    let mut running = greeted.send_job(job(&[])).await.unwrap();
    let err = running.run(&mut DiscardLog).await.err().unwrap();
    assert!(matches!(
        err,
        Error::Timeout(Timeout {
            which: DeadlineKind::Wall,
            after
        }) if after == Duration::from_secs(20)
    ));
    assert!(begun.elapsed() >= Duration::from_secs(20));
    assert!(running.log_tail().total_bytes() >= 5 * 19);
}

#[tokio::test]
async fn an_agent_failure_while_running_is_cut_to_the_limits() {
    let limits = SessionLimits {
        max_failure_message_bytes: 5,
        ..Default::default()
    };
    let (result, _) = run_with(&[failure("exec", "no such file")], false, limits).await;
    assert!(matches!(
        result,
        Err(Error::Agent(AgentFailure { phase, message })) if phase == "exec" && message == "no su"
    ));
}

#[tokio::test]
async fn outputs_before_exited_are_refused() {
    let (result, _) = run_with(&[start(0)], false, SessionLimits::default()).await;
    assert!(matches!(
        result,
        Err(Error::Protocol(ProtocolError::Unexpected {
            phase: Phase::Run,
            expected: "Log or Exited",
            got: "OutputStart"
        }))
    ));
}

/// Whether the error or one of its sources mentions `needle`.
trait ChainContains {
    fn source_chain_contains(&self, needle: &str) -> bool;
}

impl ChainContains for Error {
    fn source_chain_contains(&self, needle: &str) -> bool {
        let mut cur: Option<&dyn std::error::Error> = Some(self);
        while let Some(e) = cur {
            if e.to_string().contains(needle) {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

#[tokio::test]
async fn a_huge_limit_does_not_overflow() {
    let limits = SessionLimits {
        silence: Some(Duration::MAX),
        wall: Some(Duration::MAX),
        ..Default::default()
    };
    let (result, _) = run_with(&[exited_code(0)], false, limits).await;
    assert_eq!(result.unwrap().kind, ExitKind::Code(0));
    let greeted = accept_hello(
        fake_guest(wire(&[hello()]), false),
        SessionLimits::default(),
        Duration::MAX,
    )
    .await;
    assert!(greeted.is_ok());
}
