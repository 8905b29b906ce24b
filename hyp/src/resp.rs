//! RESP2, the Redis protocol: requests as arrays of bulk strings (or inline lines, as
//! typed into telnet), replies as simple strings, errors, integers, bulk strings and
//! arrays. Shared by the key-value example (`examples/kv`) and the KVM micro-VM's
//! key-value service front end ([`crate::kvm::kv_server`]).
//!
//! The parser works on a connection's input buffer and never copies: a request is
//! the byte ranges of its arguments. It only scans the short header lines; bulk data
//! is skipped by length, so re-parsing a request that arrives in pieces costs little.

use std::ops::Range;

/// Longest bulk string accepted in a request (a service may accept less and say so
/// in a clear error reply).
pub const MAX_BULK: usize = 4 << 20;
/// Most arguments in one request.
pub const MAX_ARGS: usize = 1 << 20;
/// Longest request, all arguments together.
pub const MAX_REQUEST: usize = 16 << 20;
/// Longest header line (`*N` or `$N`) or inline request.
const MAX_LINE: usize = 64 << 10;

/// The input cannot be a request: the connection must be closed.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// One line from `at`, without its CRLF (an inline request may end in a bare LF),
/// and where the next line starts; `None` if the line is not complete yet.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = &buf[at..];
    match rest.iter().position(|&b| b == b'\n') {
        Some(end) if end > MAX_LINE => Err(ProtocolError("too big line".into())),
        Some(end) => {
            let text = &rest[..end];
            Ok(Some((
                text.strip_suffix(b"\r").unwrap_or(text),
                at + end + 1,
            )))
        }
        None if rest.len() > MAX_LINE => Err(ProtocolError("too big line".into())),
        None => Ok(None),
    }
}

/// A decimal length in `0..=max` (`-1` and other negatives count as zero).
fn length(text: &[u8], max: usize, what: &str) -> Result<usize, ProtocolError> {
    let bad = || ProtocolError(format!("invalid {what} length"));
    let text = std::str::from_utf8(text).map_err(|_| bad())?;
    let value: i64 = text.parse().map_err(|_| bad())?;
    match usize::try_from(value) {
        Ok(v) if v <= max => Ok(v),
        Ok(_) => Err(bad()),
        Err(_) => Ok(0),
    }
}

/// Parses one request from `buf[at..]`, appending its arguments' ranges (positions
/// in `buf`) to `args`. Returns where the next request starts, or `None` if the
/// request is incomplete (then `args` is left as it was).
pub fn parse(
    buf: &[u8],
    at: usize,
    args: &mut Vec<Range<usize>>,
) -> Result<Option<usize>, ProtocolError> {
    if buf.get(at) != Some(&b'*') {
        return parse_inline(buf, at, args);
    }
    let Some((header, mut next)) = line(buf, at)? else {
        return Ok(None);
    };
    let count = length(&header[1..], MAX_ARGS, "multibulk")?;
    let first = args.len();
    let mut total = 0usize;
    for _ in 0..count {
        let Some((header, data)) = line(buf, next)? else {
            args.truncate(first);
            return Ok(None);
        };
        if header.first() != Some(&b'$') {
            return Err(ProtocolError(format!(
                "expected '$', got '{}'",
                header.first().map_or(' ', |&b| char::from(b))
            )));
        }
        let len = length(&header[1..], MAX_BULK, "bulk")?;
        total += len;
        if total > MAX_REQUEST {
            return Err(ProtocolError(format!(
                "request longer than {MAX_REQUEST} bytes"
            )));
        }
        let end = data + len;
        if buf.len() < end + 2 {
            args.truncate(first);
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError("bulk string not followed by CRLF".into()));
        }
        args.push(data..end);
        next = end + 2;
    }
    Ok(Some(next))
}

/// An inline request: arguments separated by spaces, ending at a newline.
fn parse_inline(
    buf: &[u8],
    at: usize,
    args: &mut Vec<Range<usize>>,
) -> Result<Option<usize>, ProtocolError> {
    let Some((text, next)) = line(buf, at)? else {
        return Ok(None);
    };
    let mut start = None;
    for (i, &b) in text.iter().enumerate() {
        match (b.is_ascii_whitespace(), start) {
            (true, Some(s)) => {
                args.push(at + s..at + i);
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        args.push(at + s..at + text.len());
    }
    Ok(Some(next))
}

/// Appends replies to a connection's output buffer.
pub struct Reply<'a>(pub &'a mut Vec<u8>);

impl Reply<'_> {
    /// `+text`
    pub fn simple(&mut self, text: &str) {
        self.line(b'+', text.as_bytes());
    }

    /// `-ERR message` (or another error prefix given in `message`).
    pub fn error(&mut self, message: &str) {
        // An error is one line: a newline would end it early.
        let flat = message.replace(['\r', '\n'], " ");
        self.line(b'-', flat.as_bytes());
    }

    /// `:value`
    pub fn integer(&mut self, value: i64) {
        self.line(b':', value.to_string().as_bytes());
    }

    /// `$len` and the bytes, or the null bulk string for `None`.
    pub fn bulk(&mut self, value: Option<&[u8]>) {
        match value {
            Some(bytes) => {
                self.line(b'$', bytes.len().to_string().as_bytes());
                self.0.extend_from_slice(bytes);
                self.0.extend_from_slice(b"\r\n");
            }
            None => self.0.extend_from_slice(b"$-1\r\n"),
        }
    }

    /// `*len`: the header of an array whose `len` elements follow.
    pub fn array(&mut self, len: usize) {
        self.line(b'*', len.to_string().as_bytes());
    }

    fn line(&mut self, kind: u8, text: &[u8]) {
        self.0.push(kind);
        self.0.extend_from_slice(text);
        self.0.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed request: its arguments and where the next one starts.
    type Parsed<'a> = Option<(Vec<&'a [u8]>, usize)>;

    fn args_of(buf: &[u8]) -> Result<Parsed<'_>, ProtocolError> {
        let mut ranges = Vec::new();
        Ok(parse(buf, 0, &mut ranges)?
            .map(|next| (ranges.into_iter().map(|r| &buf[r]).collect(), next)))
    }

    #[test]
    fn requests_parse_whole_and_in_pieces() {
        let request = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\nv\r\n\0\r\n";
        let (args, next) = args_of(request).unwrap().unwrap();
        assert_eq!(args, [&b"SET"[..], b"k", b"v\r\n\0"]);
        assert_eq!(next, request.len());
        for cut in 0..request.len() {
            assert_eq!(args_of(&request[..cut]), Ok(None), "cut at {cut}");
        }
        let (args, next) = args_of(b"PING  hello\r\nGET").unwrap().unwrap();
        assert_eq!((args, next), (vec![&b"PING"[..], b"hello"], 13));
    }

    #[test]
    fn malformed_requests_are_errors() {
        for bad in [
            &b"*1\r\n$999999999999\r\n"[..],
            b"*1\r\n:3\r\n",
            b"*x\r\n",
            b"*1\r\n$3\r\nGETXX",
            b"*99999999\r\n",
        ] {
            assert!(args_of(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(args_of(&vec![b'a'; MAX_LINE + 2]).is_err());
    }

    #[test]
    fn replies_are_framed() {
        let mut out = Vec::new();
        let mut reply = Reply(&mut out);
        reply.simple("OK");
        reply.error("ERR two\r\nlines");
        reply.integer(-3);
        reply.array(2);
        reply.bulk(Some(b"ab"));
        reply.bulk(None);
        assert_eq!(
            out,
            b"+OK\r\n-ERR two  lines\r\n:-3\r\n*2\r\n$2\r\nab\r\n$-1\r\n"
        );
    }
}
