//! How the agent's own failures are described to the host (as `AgentFailure`) and on the
//! console: a phase naming what the agent was doing, and the whole error chain.

use std::error::Error;
use std::fmt;

/// A failure of the agent itself, as opposed to a failed build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What the agent was doing, e.g. `sandbox`, `exec`, `outputs`.
    pub phase: &'static str,
    /// The error and all its causes, outermost first, joined by `: `.
    pub message: String,
}

impl Failure {
    /// A failure in `phase` described by `err` and its causes.
    pub fn new(phase: &'static str, err: &(dyn Error + 'static)) -> Self {
        Self {
            phase,
            message: chain(err),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.phase, self.message)
    }
}

/// Renders an error and its `source()` chain on one line.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// Attaches a phase to a module's error.
pub trait InPhase<T> {
    /// Turns the error into a [`Failure`] of `phase`.
    fn phase(self, phase: &'static str) -> Result<T, Failure>;
}

impl<T, E: Error + 'static> InPhase<T> for Result<T, E> {
    fn phase(self, phase: &'static str) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(phase, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("mount /nix/store")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_joins_causes() {
        let err = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        let f = Failure::new("sandbox", &err);
        assert_eq!(f.phase, "sandbox");
        assert!(
            f.message
                .starts_with("mount /nix/store: No such file or directory"),
            "{}",
            f.message
        );
    }
}
