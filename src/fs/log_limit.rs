//! A rate limit for log lines a guest can trigger, so a hostile build cannot flood the
//! host's logs through the filesystem daemon.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Admits at most `burst` log lines per `window`, and counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Instant,
    admitted: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new(State {
                window_start: Instant::now(),
                admitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were suppressed since the
    /// last admitted one; `None` if this line must be dropped.
    pub fn admit(&self) -> Option<u64> {
        // A poisoned lock only means another thread panicked while counting; the counts are
        // still usable.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(s.window_start) >= self.window {
            s.window_start = now;
            s.admitted = 0;
        }
        if s.admitted < self.burst {
            s.admitted += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_burst_then_counts_what_it_dropped() {
        let l = LogLimiter::new(2, Duration::from_millis(50));
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.admit(), Some(2));
        assert_eq!(l.admit(), Some(0));
    }
}
