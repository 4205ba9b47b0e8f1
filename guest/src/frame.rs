//! Length-prefixed protobuf frames: a 4-byte big-endian length, then that many bytes.
//!
//! The decoder checks the announced length against the limit before it buffers anything, so
//! a peer cannot make the other side allocate more than `max_frame` bytes per frame.

use prost::Message;

/// The largest frame either side sends or accepts. File contents travel in chunks well
/// below this (see [`FILE_CHUNK_BYTES`]).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The size of the FileChunk pieces the agent sends output files in.
pub const FILE_CHUNK_BYTES: usize = 256 * 1024;

const PREFIX: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame does not decode as a protobuf message")]
    Decode(#[source] prost::DecodeError),
}

/// Encodes one message as a frame.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    let mut buf = Vec::with_capacity(PREFIX + len);
    // len <= MAX_FRAME_BYTES, so it fits in u32.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode_raw(&mut buf);
    Ok(buf)
}

/// Incremental decoder: feed it bytes as they arrive and take out whole messages.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max_frame: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES)
    }
}

impl Decoder {
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_frame,
        }
    }

    /// Appends received bytes. Never buffers more than one frame plus its prefix beyond what
    /// [`Decoder::next`] has consumed, provided the caller drains with `next` in between.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// How many more bytes are needed before `next` can yield, given what is buffered. Lets
    /// a reader ask for exactly the rest of a frame instead of over-reading.
    pub fn wanted(&self) -> Result<usize, FrameError> {
        match self.announced()? {
            None => Ok(PREFIX - self.buf.len()),
            Some(len) => Ok((PREFIX + len).saturating_sub(self.buf.len())),
        }
    }

    /// Bytes received but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn announced(&self) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = self.buf.get(..PREFIX) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; PREFIX];
        len_bytes.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        Ok(Some(len))
    }

    /// The next whole message, or `None` if more bytes are needed.
    #[expect(
        clippy::should_implement_trait,
        reason = "fallible and generic over the message type, so not an Iterator; the host uses this name"
    )]
    pub fn next<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let Some(len) = self.announced()? else {
            return Ok(None);
        };
        if self.buf.len() < PREFIX + len {
            return Ok(None);
        }
        let msg = M::decode(&self.buf[PREFIX..PREFIX + len]).map_err(FrameError::Decode)?;
        self.buf.drain(..PREFIX + len);
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{guest_message::Msg, GuestMessage, Log};

    fn log(data: &[u8]) -> GuestMessage {
        GuestMessage {
            msg: Some(Msg::Log(Log {
                stream: 1,
                data: data.to_vec(),
            })),
        }
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = [log(b"hello"), log(b""), log(&[7u8; 5000])];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode(m).unwrap());
        }
        let mut dec = Decoder::default();
        let mut out = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(m) = dec.next::<GuestMessage>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_prefix_is_rejected_before_buffering() {
        let mut dec = Decoder::new(16);
        dec.push(&17u32.to_be_bytes());
        assert!(matches!(
            dec.next::<GuestMessage>(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        ));
        assert!(matches!(dec.wanted(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let mut dec = Decoder::default();
        dec.push(&3u32.to_be_bytes());
        dec.push(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            dec.next::<GuestMessage>(),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn wanted_asks_for_exactly_the_rest() {
        let frame = encode(&log(b"abc")).unwrap();
        let mut dec = Decoder::default();
        assert_eq!(dec.wanted().unwrap(), 4);
        dec.push(&frame[..2]);
        assert_eq!(dec.wanted().unwrap(), 2);
        dec.push(&frame[2..6]);
        assert_eq!(dec.wanted().unwrap(), frame.len() - 6);
    }

    #[test]
    fn encode_refuses_oversized_message() {
        let big = log(&vec![0u8; MAX_FRAME_BYTES + 1]);
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
    }
}
