//! Framed messages over one stream to the guest agent, built on the guest crate's sans-IO
//! [`Decoder`], so both sides share one definition of a frame.
//!
//! Reads ask the decoder how many bytes the current frame still needs and never read past
//! it, so the host holds at most one frame (bounded by the frame limit, checked on the
//! length prefix before any of the body is read) per connection.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tvix_build_vm_agent::frame::{self, Decoder, FrameError};
use tvix_build_vm_agent::proto::{guest_message::Msg, GuestMessage, HostMessage};

/// Largest single read; frames bigger than this arrive in several reads.
const READ_CHUNK: usize = 64 * 1024;

/// Why no message could be received or sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The bytes from the guest are not a valid frame (too large, or not protobuf).
    #[error("invalid frame from the guest")]
    Frame(#[source] FrameError),
    /// A frame decoded, but carries no message.
    #[error("a frame from the guest carries no message")]
    Empty,
    /// The guest closed the stream; `mid_frame` when it did so inside a frame.
    #[error("the guest closed the connection{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Closed { mid_frame: bool },
    /// Reading from or writing to the stream failed.
    #[error("I/O on the agent connection")]
    Io(#[source] std::io::Error),
    /// A host message could not be framed (it is larger than a frame may be).
    #[error("a message to the guest cannot be framed")]
    Encode(#[source] FrameError),
    /// The deadline passed before a whole message arrived.
    #[error("no message before the deadline")]
    Deadline,
}

/// One connection to the guest agent.
pub struct Connection<S> {
    stream: S,
    decoder: Decoder,
    scratch: Box<[u8]>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps `stream`, accepting guest frames of at most `max_frame_bytes`.
    pub fn new(stream: S, max_frame_bytes: usize) -> Self {
        Self {
            stream,
            decoder: Decoder::new(max_frame_bytes),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The next message from the guest.
    ///
    /// Cancel-safe: the decoder keeps what was read, so a later call continues the frame.
    pub async fn recv(&mut self) -> Result<Msg, ConnectionError> {
        loop {
            if let Some(msg) = self
                .decoder
                .next::<GuestMessage>()
                .map_err(ConnectionError::Frame)?
            {
                return msg.msg.ok_or(ConnectionError::Empty);
            }
            let wanted = self.decoder.wanted().map_err(ConnectionError::Frame)?;
            let n = wanted.min(self.scratch.len());
            let buf = &mut self.scratch[..n];
            let read = self.stream.read(buf).await.map_err(ConnectionError::Io)?;
            if read == 0 {
                return Err(ConnectionError::Closed {
                    mid_frame: self.decoder.buffered() > 0,
                });
            }
            self.decoder.push(&buf[..read]);
        }
    }

    /// [`Connection::recv`], giving up at `deadline`.
    pub async fn recv_until(&mut self, deadline: Instant) -> Result<Msg, ConnectionError> {
        tokio::time::timeout_at(deadline, self.recv())
            .await
            .map_err(|_elapsed| ConnectionError::Deadline)?
    }

    /// Sends one message to the guest.
    pub async fn send(&mut self, msg: &HostMessage) -> Result<(), ConnectionError> {
        let bytes = frame::encode(msg).map_err(ConnectionError::Encode)?;
        self.stream
            .write_all(&bytes)
            .await
            .map_err(ConnectionError::Io)?;
        self.stream.flush().await.map_err(ConnectionError::Io)
    }
}

/// The name of a message kind, for errors that say what came instead of what was expected.
pub fn kind_of(msg: &Msg) -> &'static str {
    match msg {
        Msg::Hello(_) => "Hello",
        Msg::Log(_) => "Log",
        Msg::Exited(_) => "Exited",
        Msg::OutputStart(_) => "OutputStart",
        Msg::Entry(_) => "Entry",
        Msg::FileChunk(_) => "FileChunk",
        Msg::DirectoryEnd(_) => "DirectoryEnd",
        Msg::OutputsDone(_) => "OutputsDone",
        Msg::Failure(_) => "AgentFailure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tvix_build_vm_agent::proto::{Log, OutputsDone};

    fn log(data: &[u8]) -> GuestMessage {
        GuestMessage {
            msg: Some(Msg::Log(Log {
                stream: 1,
                data: data.to_vec(),
            })),
        }
    }

    #[tokio::test]
    async fn receives_frames_split_and_joined_arbitrarily() {
        let (host, mut guest) = tokio::io::duplex(7);
        let mut conn = Connection::new(host, 1024);
        let mut wire = frame::encode(&log(b"one")).unwrap();
        wire.extend(frame::encode(&log(&[9u8; 300])).unwrap());
        wire.extend(
            frame::encode(&GuestMessage {
                msg: Some(Msg::OutputsDone(OutputsDone {})),
            })
            .unwrap(),
        );
        let writer = tokio::spawn(async move {
            guest.write_all(&wire).await.unwrap();
            guest
        });
        assert!(matches!(conn.recv().await.unwrap(), Msg::Log(l) if l.data == b"one"));
        assert!(matches!(conn.recv().await.unwrap(), Msg::Log(l) if l.data.len() == 300));
        assert!(matches!(conn.recv().await.unwrap(), Msg::OutputsDone(_)));
        drop(writer.await.unwrap());
        assert!(matches!(
            conn.recv().await,
            Err(ConnectionError::Closed { mid_frame: false })
        ));
    }

    #[tokio::test]
    async fn oversized_prefix_is_refused_without_reading_the_body() {
        let (host, mut guest) = tokio::io::duplex(64);
        let mut conn = Connection::new(host, 16);
        guest.write_all(&17u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            conn.recv().await,
            Err(ConnectionError::Frame(FrameError::TooLarge {
                len: 17,
                max: 16
            }))
        ));
    }

    #[tokio::test]
    async fn close_inside_a_frame_is_reported() {
        let (host, mut guest) = tokio::io::duplex(64);
        let mut conn = Connection::new(host, 1024);
        let wire = frame::encode(&log(b"abcdef")).unwrap();
        guest.write_all(&wire[..wire.len() - 1]).await.unwrap();
        drop(guest);
        assert!(matches!(
            conn.recv().await,
            Err(ConnectionError::Closed { mid_frame: true })
        ));
    }

    #[tokio::test]
    async fn empty_frame_is_an_empty_message() {
        let (host, mut guest) = tokio::io::duplex(64);
        let mut conn = Connection::new(host, 1024);
        guest.write_all(&0u32.to_be_bytes()).await.unwrap();
        assert!(matches!(conn.recv().await, Err(ConnectionError::Empty)));
    }

    #[tokio::test(start_paused = true)]
    async fn recv_until_gives_up_at_the_deadline() {
        let (host, _guest) = tokio::io::duplex(64);
        let mut conn = Connection::new(host, 1024);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            conn.recv_until(deadline).await,
            Err(ConnectionError::Deadline)
        ));
        assert!(Instant::now() >= deadline);
    }
}
