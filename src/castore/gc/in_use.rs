//! Roots held by running work in this process (the inputs of a running build), from
//! registration until the guard is dropped.
//!
//! Registering also touches the [`super::barrier`]: a GC already past its mark still keeps
//! what is registered from its next batch on.

use crate::castore::B3Digest;
use std::collections::HashMap;
use std::sync::Mutex;

static IN_USE: Mutex<Option<HashMap<B3Digest, usize>>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut HashMap<B3Digest, usize>) -> T) -> T {
    // A panic while holding the lock leaves counts at worst too high: keep going.
    let mut guard = IN_USE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(guard.get_or_insert_with(HashMap::new))
}

/// Keeps `digests` (with their closures) from every GC until the guard is dropped.
pub fn hold(digests: impl IntoIterator<Item = B3Digest>) -> InUse {
    let digests: Vec<B3Digest> = digests.into_iter().collect();
    with(|m| {
        for d in &digests {
            *m.entry(*d).or_default() += 1;
        }
    });
    super::touch(&digests);
    InUse { digests }
}

/// What is held now.
pub(super) fn current() -> Vec<B3Digest> {
    with(|m| m.keys().copied().collect())
}

/// Releases its digests when dropped.
#[must_use = "the digests are held only while the guard lives"]
pub struct InUse {
    digests: Vec<B3Digest>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        with(|m| {
            for d in &self.digests {
                if let Some(n) = m.get_mut(d) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(d);
                    }
                }
            }
        });
    }
}
