//! The answers: the seed layout's `Build`, and the tvix-build-vm extensions of `Build`
//! (exit status, timings, log blob), filled the same way for both wire layouts.

use super::build_host::Finished;
use crate::agent::error::ExitKind;
use crate::proto::build as pb;
use std::time::Duration;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The extension fields (exit status, timings, log) of a finished build, in the types of
/// one layout's `build` module (the layouts share the shape but not the Rust types).
macro_rules! extensions_in {
    ($f:expr, $($m:ident)::+) => {{
        let f: &Finished = $f;
        let exit = &f.outcome.exit;
        let kind = match exit.kind {
            ExitKind::Code(c) => $($m)::+::exit_status::Kind::Code(u32::from(c)),
            ExitKind::Signal(s) => $($m)::+::exit_status::Kind::Signal(u32::from(s)),
        };
        let t = &f.outcome.timings;
        (
            Some($($m)::+::ExitStatus {
                kind: Some(kind),
                oom_killed: exit.oom_killed,
            }),
            Some($($m)::+::Timings {
                queued_us: micros(f.queued),
                boot_us: micros(t.boot),
                exec_us: micros(t.exec),
                harvest_us: micros(t.harvest),
                total_us: micros(f.total),
            }),
            f.log.as_ref().map(|l| $($m)::+::Log {
                digest: bytes::Bytes::copy_from_slice(l.digest.as_bytes()),
                size: l.size,
                truncated: l.truncated,
            }),
        )
    }};
}

/// The seed layout's Build: outputs named by basename and sorted, plus the extensions.
pub fn seed(request: pb::BuildRequest, f: &Finished) -> pb::Build {
    let mut build = crate::cli::build::seed_build(request, &f.outcome);
    let (exit_status, timings, log) = extensions_in!(f, crate::proto::build::build);
    build.exit_status = exit_status;
    build.timings = timings;
    build.log = log;
    build
}

type Extensions2024 = (
    Option<crate::proto::build_2024::build::ExitStatus>,
    Option<crate::proto::build_2024::build::Timings>,
    Option<crate::proto::build_2024::build::Log>,
);

/// The extension fields in the 2024 layout's types.
pub fn extensions_2024(f: &Finished) -> Extensions2024 {
    extensions_in!(f, crate::proto::build_2024::build)
}
