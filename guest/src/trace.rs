//! Phase stamps for finding where the guest's time goes: `tvix.agent_trace` on the kernel
//! command line makes the agent print CLOCK_BOOTTIME stamps of its phases on the console.
//! Off by default: under TCG every byte to the serial port is a slow I/O exit.

use std::cell::RefCell;

/// The most stamps kept; later ones are dropped (the agent makes a fixed, small number).
const MAX_STAMPS: usize = 64;

thread_local! {
    static STAMPS: RefCell<Option<Vec<(&'static str, u64)>>> = const { RefCell::new(None) };
}

/// Starts recording stamps (only the agent's main thread records).
pub fn enable() {
    STAMPS.with(|s| *s.borrow_mut() = Some(Vec::with_capacity(MAX_STAMPS)));
}

/// Records `what` happening now, if tracing is on.
pub fn mark(what: &'static str) {
    mark_at(what, crate::sys::boottime_us());
}

/// Records `what` having happened at `at_us` (CLOCK_BOOTTIME), if tracing is on.
pub fn mark_at(what: &'static str, at_us: u64) {
    STAMPS.with(|s| {
        if let Some(v) = s.borrow_mut().as_mut() {
            if v.len() < MAX_STAMPS {
                v.push((what, at_us));
            }
        }
    });
}

/// Prints `text` on the console if tracing is on.
pub fn note(text: &str) {
    if STAMPS.with(|s| s.borrow().is_some()) {
        eprintln!("tvix-build-vm-agent trace: {text}");
    }
}

/// Prints the stamps recorded so far on the console (one line each: absolute time, time
/// since the previous stamp, label) and forgets them.
pub fn flush() {
    let stamps = STAMPS.with(|s| s.borrow_mut().as_mut().map(std::mem::take));
    if let Some(stamps) = stamps {
        eprint!("{}", render(&stamps));
    }
}

fn render(stamps: &[(&str, u64)]) -> String {
    let mut out = String::new();
    let mut prev = stamps.first().map_or(0, |s| s.1);
    for (what, at) in stamps {
        out.push_str(&format!(
            "tvix-build-vm-agent trace: {:>10.3} ms  +{:>8.3} ms  {what}\n",
            *at as f64 / 1000.0,
            at.saturating_sub(prev) as f64 / 1000.0,
        ));
        prev = *at;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_deltas() {
        let text = render(&[("a", 1_000), ("b", 3_500)]);
        assert_eq!(
            text,
            "tvix-build-vm-agent trace:      1.000 ms  +   0.000 ms  a\n\
             tvix-build-vm-agent trace:      3.500 ms  +   2.500 ms  b\n"
        );
    }

    #[test]
    fn marks_only_when_enabled() {
        mark("ignored");
        assert!(STAMPS.with(|s| s.borrow().is_none()));
        enable();
        mark("kept");
        let n = STAMPS.with(|s| s.borrow().as_ref().map(Vec::len));
        assert_eq!(n, Some(1));
    }
}
