//! The framed connection to the host: blocking, with a small write buffer so that the many
//! small messages of an output tree do not each cost a syscall. Blocking writes are the
//! back-pressure: a slow host slows the build's log and the harvest down, nothing piles up.

use std::io::{Read, Write};

use tvix_build_vm_agent::frame::{self, Decoder, FrameError, MAX_FRAME_BYTES};
use tvix_build_vm_agent::proto::{guest_message::Msg, AgentFailure, GuestMessage, HostMessage};

use crate::error::Failure;

/// Buffered bytes beyond which `send` writes them out.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Tag of `GuestMessage.file_chunk` (field 6, length-delimited).
const TAG_GUEST_FILE_CHUNK: u8 = (6 << 3) | 2;
/// Tag of `FileChunk.data` (field 1, length-delimited).
const TAG_CHUNK_DATA: u8 = (1 << 3) | 2;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("write to the host")]
    Write(#[source] std::io::Error),
    #[error("read from the host")]
    Read(#[source] std::io::Error),
    #[error("the host closed the connection after {buffered} bytes of a frame")]
    Eof { buffered: usize },
    #[error("bad frame from the host")]
    Frame(#[source] FrameError),
    #[error("encode a message")]
    Encode(#[source] FrameError),
}

/// Where guest messages go: the host connection, or a vector in tests.
pub trait Sink {
    /// Sends one message.
    fn send(&mut self, msg: Msg) -> Result<(), ConnError>;

    /// Sends one `FileChunk`; the connection writes `data` without copying it into a message.
    fn send_chunk(&mut self, data: &[u8]) -> Result<(), ConnError> {
        self.send(Msg::FileChunk(tvix_build_vm_agent::proto::FileChunk {
            data: data.to_vec(),
        }))
    }
}

impl Sink for Vec<Msg> {
    fn send(&mut self, msg: Msg) -> Result<(), ConnError> {
        self.push(msg);
        Ok(())
    }
}

/// A framed connection over any byte stream.
pub struct Conn<S> {
    stream: S,
    wbuf: Vec<u8>,
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            wbuf: Vec::with_capacity(WRITE_BUFFER_BYTES * 2),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Writes out everything buffered.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        if !self.wbuf.is_empty() {
            self.stream
                .write_all(&self.wbuf)
                .map_err(ConnError::Write)?;
            self.wbuf.clear();
        }
        self.stream.flush().map_err(ConnError::Write)
    }

    /// Reads exactly one host message, never more bytes than that message's frame.
    pub fn recv(&mut self) -> Result<HostMessage, ConnError> {
        let mut dec = Decoder::new(MAX_FRAME_BYTES);
        let mut buf = Vec::new();
        loop {
            if let Some(msg) = dec.next::<HostMessage>().map_err(ConnError::Frame)? {
                return Ok(msg);
            }
            let want = dec.wanted().map_err(ConnError::Frame)?;
            buf.resize(want, 0);
            let n = match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(ConnError::Eof {
                        buffered: dec.buffered(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::Read(e)),
            };
            dec.push(&buf[..n]);
        }
    }

    /// Best effort: report an agent failure and flush.
    pub fn send_failure(&mut self, failure: &Failure) {
        let _ = self.send(failure_msg(failure));
        let _ = self.flush();
    }
}

/// The AgentFailure message for `failure`.
pub fn failure_msg(failure: &Failure) -> Msg {
    Msg::Failure(AgentFailure {
        phase: failure.phase.to_owned(),
        message: failure.message.clone(),
    })
}

impl<S: Read + Write> Sink for Conn<S> {
    fn send(&mut self, msg: Msg) -> Result<(), ConnError> {
        let bytes = frame::encode(&GuestMessage { msg: Some(msg) }).map_err(ConnError::Encode)?;
        self.wbuf.extend_from_slice(&bytes);
        if self.wbuf.len() >= WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn send_chunk(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let header = chunk_header(data.len());
        let frame_len = header.len() - 4 + data.len();
        if frame_len > MAX_FRAME_BYTES {
            return Err(ConnError::Encode(FrameError::TooLarge {
                len: frame_len,
                max: MAX_FRAME_BYTES,
            }));
        }
        self.wbuf.extend_from_slice(&header);
        if data.len() < WRITE_BUFFER_BYTES {
            self.wbuf.extend_from_slice(data);
            if self.wbuf.len() >= WRITE_BUFFER_BYTES {
                self.flush()?;
            }
            return Ok(());
        }
        self.flush()?;
        self.stream.write_all(data).map_err(ConnError::Write)
    }
}

/// The frame prefix and protobuf headers that precede `len` bytes of chunk data, so that a
/// frame is `chunk_header(len) ++ data`, byte for byte what prost would encode.
fn chunk_header(len: usize) -> Vec<u8> {
    use prost::encoding::{encode_varint, encoded_len_varint};
    let inner = if len == 0 {
        // proto3 leaves an empty bytes field out.
        0
    } else {
        1 + encoded_len_varint(len as u64) + len
    };
    let outer = 1 + encoded_len_varint(inner as u64) + inner;
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&(outer as u32).to_be_bytes());
    h.push(TAG_GUEST_FILE_CHUNK);
    encode_varint(inner as u64, &mut h);
    if len != 0 {
        h.push(TAG_CHUNK_DATA);
        encode_varint(len as u64, &mut h);
    }
    h
}

/// Sanity check used in tests: the header must agree with prost's own encoding.
#[cfg(test)]
fn prost_frame(data: &[u8]) -> Vec<u8> {
    use prost::Message;
    let msg = GuestMessage {
        msg: Some(Msg::FileChunk(tvix_build_vm_agent::proto::FileChunk {
            data: data.to_vec(),
        })),
    };
    let mut out = (msg.encoded_len() as u32).to_be_bytes().to_vec();
    msg.encode(&mut out).unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use tvix_build_vm_agent::frame::FILE_CHUNK_BYTES;
    use tvix_build_vm_agent::proto::{host_message, Job, Log};

    /// A stream whose reads come from `input` and whose writes land in `output`.
    struct Pipe {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn decode_all(bytes: &[u8]) -> Vec<GuestMessage> {
        let mut dec = Decoder::default();
        dec.push(bytes);
        let mut out = Vec::new();
        while let Some(m) = dec.next::<GuestMessage>().unwrap() {
            out.push(m);
        }
        assert_eq!(dec.buffered(), 0, "trailing bytes");
        out
    }

    #[test]
    fn chunk_header_matches_prost() {
        for len in [0, 1, 127, 128, 16383, 16384, 65536, FILE_CHUNK_BYTES] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut mine = chunk_header(len);
            mine.extend_from_slice(&data);
            assert_eq!(mine, prost_frame(&data), "len {len}");
        }
    }

    #[test]
    fn chunks_and_messages_interleave_in_order() {
        let mut conn = Conn::new(Pipe {
            input: Cursor::new(Vec::new()),
            output: Vec::new(),
        });
        let big = vec![9u8; FILE_CHUNK_BYTES];
        let log = Msg::Log(Log {
            stream: 1,
            data: b"x".to_vec(),
        });
        conn.send(log.clone()).unwrap();
        conn.send_chunk(&big).unwrap();
        conn.send_chunk(b"tail").unwrap();
        conn.send(log.clone()).unwrap();
        conn.flush().unwrap();
        let got: Vec<Msg> = decode_all(&conn.get_ref().output)
            .into_iter()
            .map(|m| m.msg.unwrap())
            .collect();
        let chunk =
            |d: &[u8]| Msg::FileChunk(tvix_build_vm_agent::proto::FileChunk { data: d.to_vec() });
        assert_eq!(got, vec![log.clone(), chunk(&big), chunk(b"tail"), log]);
    }

    #[test]
    fn recv_reads_exactly_one_frame() {
        let job = HostMessage {
            msg: Some(host_message::Msg::Job(Job {
                argv: vec![b"/bin/true".to_vec()],
                ..Default::default()
            })),
        };
        let mut input = frame::encode(&job).unwrap();
        input.extend_from_slice(b"after");
        let mut conn = Conn::new(Pipe {
            input: Cursor::new(input),
            output: Vec::new(),
        });
        assert_eq!(conn.recv().unwrap(), job);
        let mut rest = Vec::new();
        conn.stream.input.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"after");
    }

    #[test]
    fn recv_rejects_oversized_and_truncated_frames() {
        let mut conn = Conn::new(Pipe {
            input: Cursor::new(((MAX_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec()),
            output: Vec::new(),
        });
        assert!(matches!(conn.recv(), Err(ConnError::Frame(_))));
        let mut conn = Conn::new(Pipe {
            input: Cursor::new(vec![0, 0, 0, 9, 1, 2]),
            output: Vec::new(),
        });
        assert!(matches!(conn.recv(), Err(ConnError::Eof { buffered: 6 })));
    }
}
