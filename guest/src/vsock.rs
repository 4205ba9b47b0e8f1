//! Dialing the host over AF_VSOCK.

use std::time::{Duration, Instant};

use vsock::VsockStream;

/// The host's CID.
pub const HOST_CID: u32 = vsock::VMADDR_CID_HOST;

/// How long the agent keeps trying: the host listens before it starts the VM, so this only
/// covers a device that is still coming up.
const DIAL_DEADLINE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
#[error("connect to vsock CID {HOST_CID} port {port} ({attempts} attempts in {elapsed:?})")]
pub struct DialError {
    port: u32,
    attempts: u32,
    elapsed: Duration,
    #[source]
    source: std::io::Error,
}

/// Connects to the host on `port`, retrying with backoff until [`DIAL_DEADLINE`].
pub fn dial(port: u32) -> Result<VsockStream, DialError> {
    let start = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match VsockStream::connect_with_cid_port(HOST_CID, port) {
            Ok(s) => return Ok(s),
            Err(source) => {
                let elapsed = start.elapsed();
                if elapsed + backoff > DIAL_DEADLINE {
                    return Err(DialError {
                        port,
                        attempts,
                        elapsed,
                        source,
                    });
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
