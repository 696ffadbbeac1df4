//! The two protobuf messages of CRIU's `images/img-streamer.proto` and their framing
//! (u32 little-endian length, then the message; no image magic).

use std::io::{self, Read, Write};

use prost::Message;

use crate::error::{CriuError, Result};

/// `message img_streamer_request_entry { required string filename = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestEntry {
    /// Image file name, without a directory.
    #[prost(string, required, tag = "1")]
    pub filename: String,
}

/// `message img_streamer_reply_entry { required bool exists = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReplyEntry {
    /// Whether the file exists in the image set.
    #[prost(bool, required, tag = "1")]
    pub exists: bool,
}

/// Largest message accepted; requests carry only a file name.
const MAX_MESSAGE: u32 = 64 << 10;

/// Reads exactly `buf.len()` bytes, never more: the byte after a request carries the
/// pipe fd as ancillary data and must be read with `recvmsg`.
fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads one framed message; `None` at a clean end of stream.
///
/// # Errors
/// [`CriuError::Protocol`] for oversized or undecodable messages and for a stream that
/// ends inside a frame; I/O errors.
pub fn read_message<M: Message + Default>(r: &mut impl Read) -> Result<Option<M>> {
    let truncated = |what: &str| CriuError::Protocol(format!("stream ended inside {what}"));
    let failed = |e: io::Error, what: &str| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            truncated(what)
        } else {
            CriuError::io("reading from CRIU", e)
        }
    };
    let mut len = [0u8; 4];
    if !read_exact_or_eof(r, &mut len).map_err(|e| failed(e, "a message length"))? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(CriuError::Protocol(format!("message of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    if !read_exact_or_eof(r, &mut buf).map_err(|e| failed(e, "a message"))? && len > 0 {
        return Err(truncated("a message"));
    }
    M::decode(buf.as_slice())
        .map(Some)
        .map_err(|e| CriuError::Protocol(format!("bad message: {e}")))
}

/// Writes one framed message.
///
/// # Errors
/// I/O errors.
pub fn write_message<M: Message>(w: &mut impl Write, msg: &M) -> Result<()> {
    let body = msg.encode_to_vec();
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)
        .map_err(|e| CriuError::io("writing to CRIU", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trip() {
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &RequestEntry {
                filename: "pages-1.img".into(),
            },
        )
        .unwrap();
        // Same bytes CRIU's pb_write_one produces: length, then field 1 (tag 0x0a).
        assert_eq!(&buf[..6], &[13, 0, 0, 0, 0x0a, 11]);
        let mut r = buf.as_slice();
        let m: RequestEntry = read_message(&mut r).unwrap().unwrap();
        assert_eq!(m.filename, "pages-1.img");
        assert!(read_message::<RequestEntry>(&mut r).unwrap().is_none());
        let mut huge = &[0xff, 0xff, 0xff, 0x7f][..];
        assert!(read_message::<RequestEntry>(&mut huge).is_err());
        // A frame cut anywhere is a protocol error, not an I/O error.
        for cut in 1..buf.len() {
            let mut r = &buf[..cut];
            match read_message::<RequestEntry>(&mut r) {
                Err(CriuError::Protocol(m)) => assert!(m.starts_with("stream ended inside")),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }
}
