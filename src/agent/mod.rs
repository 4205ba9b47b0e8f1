//! The host side of the conversation with the guest agent, and the harvest of outputs.
//!
//! The runner drives one [`session`] per VM: [`accept_hello`] on the stream the guest
//! dialed, [`Greeted::send_job`], [`Running::run`] until the command exits, then
//! [`Running::harvest`] into the castore. Every byte from the guest is hostile: frames,
//! logs, counts, sizes, names and depth are bounded by [`SessionLimits`] and
//! [`HarvestLimits`], and the host computes every digest itself.
//!
//! - [`connection`]: framed messages over any async stream.
//! - [`session`]: the conversation, its stages in the types.
//! - [`harvest`]: outputs into the castore.
//! - [`log`]: the live log sink and the bounded log tail.
//! - [`limits`]: every bound, with defaults.
//! - [`usage`]: the guest's resource figures, bounded.
//! - [`error`]: the error taxonomy (build failed / guest misbehaved / infrastructure).

pub mod connection;
pub mod error;
pub mod harvest;
pub mod limits;
pub mod log;
pub mod session;
#[cfg(test)]
mod testing;
pub mod usage;

pub use error::{Error, ErrorClass};
pub use harvest::HarvestedOutput;
pub use limits::{HarvestLimits, SessionLimits};
pub use log::{DiscardLog, LogChunk, LogRef, LogSink, LogStream, LogTail};
pub use session::{accept_hello, AgentHello, ExitStatus, Greeted, Running};
pub use usage::GuestUsage;
