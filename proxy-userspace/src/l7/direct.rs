//! Requests without a body, sent on plain upstream connections without hyper's client.
//!
//! Why: an L7 request spent about 15,000 of its 31,000 user-space instructions in hyper's HTTP/1
//! client (its dispatch channel, the request encode, the response head parse into a header map,
//! its connection state machine), more than hyper's whole server side (docs/userspace.md,
//! "What tokio and hyper cost on their own"). For the requests that make most of a web
//! application's traffic, a GET or HEAD without a body, the exchange is simple enough to do in
//! place: write the head, read and parse the response head (`httparse`, as hyper), and hand the
//! client a body that reads the upstream socket as the client takes it.
//!
//! Scope: only requests the proxy may send again ([`super::Service::handle`]'s `replayable`:
//! idempotent method, no body, no upgrade). Everything else (request bodies, upgrades) keeps
//! hyper's client. Responses are framed as RFC 9112 section 6.3 says: no body for a HEAD
//! request, 1xx, 204 and 304; `Transfer-Encoding` ending in `chunked`: chunked (a
//! `Content-Length` beside it is removed and the connection not reused); other transfer
//! codings: until the upstream closes; `Content-Length`: that many bytes (differing values:
//! an error, 502); neither: until close. Interim 1xx responses are skipped (the client asked for
//! no upgrade, so a 101 is an error). A connection is reused only when the response said so
//! (HTTP/1.1 without `Connection: close`, HTTP/1.0 with `keep-alive`), its body was read to the
//! end, and nothing followed it.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use hyper::body::{Frame, SizeHint};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// The largest response head (or chunk size line, or trailer section) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head or trailer section (hyper's client: 100).
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read, when the buffer has less room than [`READ_MIN`].
const READ_CHUNK: usize = 16 * 1024;
/// Room below which the buffer grows before a read. Above it, the read goes into the room
/// left: no allocation per response (earlier responses' bytes may still be held by hyper,
/// which keeps a buffer from being reused in place).
const READ_MIN: usize = 4 * 1024;

/// Errors of one exchange on an upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// Nothing came back: the connection was closed or reset before the first response byte.
    /// On a reused connection this is the upstream closing an idle connection as the request
    /// went out: the request is sent again on a new one.
    #[error("the upstream closed the connection before answering{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    NoAnswer(Option<io::Error>),
    #[error("writing the request: {0}")]
    Write(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    #[error("the upstream closed the connection in the response head")]
    ClosedInHead,
    #[error("the upstream closed the connection before the end of the body")]
    ClosedInBody,
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed response head: {0}")]
    Malformed(String),
    #[error("a 101 Switching Protocols to a request that asked for no upgrade")]
    UnexpectedSwitch,
    #[error("Content-Length values differ or do not parse")]
    BadLength,
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
}

impl DirectError {
    /// Whether a request that failed so on a reused connection is sent again on a new one.
    #[must_use]
    pub fn retry_on_new_connection(&self) -> bool {
        matches!(self, DirectError::NoAnswer(_) | DirectError::Write(_))
    }
}

/// One upstream connection: its socket and the bytes read but not used yet.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Where the fields of the last parsed head were ([`parse_head`]), kept for the next.
    spans: Vec<Span>,
}

/// Where a header field is in a head: name start and end, value start and end.
type Span = (usize, usize, usize, usize);

impl Conn {
    #[must_use]
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            spans: Vec::new(),
        }
    }

    /// Still usable for a request: no byte and no end of stream waiting (an idle connection
    /// has nothing to say; one that does was closed by the upstream or is out of step).
    #[must_use]
    pub fn idle_ok(&self) -> bool {
        let mut probe = [0u8; 1];
        self.buf.is_empty()
            && matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Read more bytes into the buffer: `Ok(0)` at the end of the stream.
    ///
    /// Through tokio's `AsyncRead` (not `try_read_buf`): a read that fills less than the room
    /// given clears the socket's readiness there, so the next read (or [`Conn::idle_ok`]'s
    /// probe) waits for the reactor instead of making a `recvfrom` that answers EAGAIN (one
    /// such syscall per request otherwise, about a microsecond of system time).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_MIN {
            self.buf.reserve(READ_CHUNK);
        }
        std::pin::pin!(self.stream.read_buf(&mut self.buf)).poll(cx)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// The client a request is forwarded for, and the request's Host: the forwarding headers
/// ([`super::headers::write_forwarded`]) go into the head as it is written.
pub type Forwarding<'a> = (&'a super::headers::Client, Option<&'a HeaderValue>);

/// Write the request head (`method target HTTP/1.1`, `Host: host` when given (the caller gives
/// one when the headers have none), the headers, the forwarding headers for `forwarding`) into
/// `out`. The parts come from
/// hyper's parser and `http`'s types, which admit no CR or LF: nothing can be injected.
pub fn encode_request(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    host: Option<&str>,
    forwarding: Option<Forwarding<'_>>,
    out: &mut Vec<u8>,
) {
    out.clear();
    // One allocation: the head's size first.
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    out.reserve(
        method.as_str().len()
            + target.len()
            + 13
            + host.map_or(0, |h| h.len() + 8)
            + fields
            + forwarding.map_or(0, |_| 160)
            + 2,
    );
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(h) = host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut forwarded_before = false;
    for (name, value) in headers {
        if forwarding.is_some() && super::headers::is_forwarding(name) {
            forwarded_before = true;
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some((client, host)) = forwarding {
        super::headers::write_forwarded(out, headers, forwarded_before, client, "http", host);
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// The fields as they go to the client: hop-by-hop ones left out (RFC 9110 section 7.6.1,
    /// [`super::headers::remove_hop_by_hop`]'s rules).
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The response lets the connection carry another request after its body.
    pub keep_alive: bool,
}

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, DirectError> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| DirectError::Malformed(format!("header name {:?}", f.name)))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| DirectError::Malformed(format!("value of {name}")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The body length `Content-Length` gives: every value (a field may hold a list) the same
/// number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, DirectError> {
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let b = v.as_bytes();
        // The usual value: one number (at most 19 digits: no overflow).
        if !b.is_empty() && b.len() <= 19 && b.iter().all(u8::is_ascii_digit) {
            let n = b.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err(DirectError::BadLength);
            }
            length = Some(n);
            continue;
        }
        let s = v.to_str().map_err(|_| DirectError::BadLength)?;
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(DirectError::BadLength);
            }
            let n: u64 = part.parse().map_err(|_| DirectError::BadLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(DirectError::BadLength);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// The elements of a comma-separated list field (RFC 9110 section 5.6.1), trimmed. A value with
/// a byte other than visible ASCII, space or tab has none (as `HeaderValue::to_str` refuses it).
fn list_elements(raw: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    let text: &[u8] = if raw
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        raw
    } else {
        &[]
    };
    text.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Parse a response head at the start of `buf` (to a request with `method`) and take it out
/// of `buf`; `None` (and `buf` as it was) when more bytes are needed. The header values share
/// the head's bytes (no copy per field). The fields go into `spare`'s allocation, emptied
/// first: the caller's map (the request's, sent already) is taken only once a complete head is
/// there; an incomplete head leaves it as it was.
///
/// # Errors
/// A malformed head, too many fields, unusable `Content-Length`.
pub fn parse_head(
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
    method: &Method,
    spare: &mut HeaderMap,
) -> Result<Option<Head>, DirectError> {
    spans.clear();
    let (n, code, minor) = {
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let n = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(DirectError::Malformed(e.to_string())),
        };
        let base = buf.as_ptr() as usize;
        spans.extend(resp.headers.iter().map(|h| {
            let name = (h.name.as_ptr() as usize).saturating_sub(base);
            let value = (h.value.as_ptr() as usize).saturating_sub(base);
            (name, name + h.name.len(), value, value + h.value.len())
        }));
        (n, resp.code, resp.version)
    };
    let head = buf.split_to(n).freeze();
    let status = code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| DirectError::Malformed("status code".into()))?;
    let version = if minor == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // The hop-by-hop fields are read here and left out of the map: what framing and reuse
    // need of them is noted on the way.
    let mut headers = std::mem::take(spare);
    headers.clear();
    headers.reserve(spans.len());
    let (mut close, mut keep_alive_token, mut names_others) = (false, false, false);
    let mut transfer_encoding: Option<bool> = None; // Some(last coding is chunked)
    let mut lengths = 0usize;
    for &(ns, ne, vs, ve) in spans.iter() {
        let name = head
            .get(ns..ne)
            .and_then(|b| HeaderName::from_bytes(b).ok())
            .ok_or_else(|| DirectError::Malformed("header name".into()))?;
        let raw = head
            .get(vs..ve)
            .ok_or_else(|| DirectError::Malformed(format!("value of {name}")))?;
        let value = |name: &HeaderName| {
            HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| DirectError::Malformed(format!("value of {name}")))
        };
        // Connection and Transfer-Encoding are read from the head's bytes: no header value is
        // made (and checked) for a field that does not go on.
        if name == header::CONNECTION {
            for t in list_elements(raw) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                } else if !t.is_empty() {
                    names_others = true;
                }
            }
            if names_others {
                // The headers it names go too: kept for remove_hop_by_hop below.
                let v = value(&name)?;
                headers.append(name, v);
            }
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            let last = list_elements(raw).rfind(|t| !t.is_empty());
            if let Some(last) = last {
                transfer_encoding = Some(last.eq_ignore_ascii_case(b"chunked"));
            } else if transfer_encoding.is_none() {
                transfer_encoding = Some(false);
            }
            continue;
        }
        if super::headers::is_hop_by_hop(&name) {
            continue;
        }
        let value = value(&name)?;
        if name == header::CONTENT_LENGTH {
            lengths += 1;
        }
        headers.append(name, value);
    }
    if names_others {
        super::headers::remove_hop_by_hop(&mut headers, None);
    }
    let mut keep_alive = if version == Version::HTTP_10 {
        keep_alive_token
    } else {
        !close
    };
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if let Some(chunked) = transfer_encoding {
        if lengths > 0 {
            // Both: the length is not to be trusted, nor the connection after this response.
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if lengths == 0 {
        Framing::UntilClose
    } else if let Some(len) = content_length(&headers)? {
        Framing::Length(len)
    } else {
        Framing::UntilClose
    };
    if framing == Framing::UntilClose {
        keep_alive = false;
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// Send `request` (a head from [`encode_request`]) on `conn` and read the final response head
/// (interim 1xx responses skipped). The body's first bytes stay in `conn`'s buffer. The
/// response's fields go into `spare`'s allocation ([`parse_head`]): it is taken only once the
/// upstream answered, so after an error that lets the request go again it is still the
/// caller's.
///
/// # Errors
/// See [`DirectError`]; [`DirectError::NoAnswer`] and [`DirectError::Write`] say the request
/// may be sent again on a new connection.
pub async fn exchange(
    conn: &mut Conn,
    request: &[u8],
    method: &Method,
    spare: &mut HeaderMap,
) -> Result<Head, DirectError> {
    conn.stream
        .write_all(request)
        .await
        .map_err(DirectError::Write)?;
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, &mut conn.spans, method, spare)? {
                Some(head) => {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(DirectError::UnexpectedSwitch);
                    }
                    if head.status.is_informational() {
                        continue;
                    }
                    return Ok(head);
                }
                None if conn.buf.len() > MAX_HEAD => return Err(DirectError::HeadTooLarge),
                None => {}
            }
        }
        match conn.fill().await {
            Ok(0) if !answered => return Err(DirectError::NoAnswer(None)),
            Ok(0) => return Err(DirectError::ClosedInHead),
            Ok(_) => answered = true,
            Err(e) if !answered => return Err(DirectError::NoAnswer(Some(e))),
            Err(e) => return Err(DirectError::Read(e)),
        }
    }
}

/// Where a connection goes when its response body was read to the end and it may carry
/// another request.
pub trait Keep: Send + Sync {
    fn keep(&self, up: SocketAddr, conn: Conn);
}

/// Where a chunked body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// At a chunk size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    /// The trailer fields were handed out: the body ends.
    Done,
}

/// One step of decoding a chunked body.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    More,
}

/// Position of the first CRLF in `buf`.
fn crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Decode what `buf` holds of a chunked body from `state`; consumed bytes are taken out.
fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, DirectError> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = crlf(buf) else {
                    if buf.len() > MAX_HEAD {
                        return Err(DirectError::Chunked("size line too long"));
                    }
                    return Ok(Step::More);
                };
                let line = &buf[..end];
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 || digits > 16 {
                    return Err(DirectError::Chunked("chunk size"));
                }
                // After the size: nothing, or an extension (`;...`, whitespace before it).
                if !matches!(line.get(digits), None | Some(b';' | b' ' | b'\t')) {
                    return Err(DirectError::Chunked("chunk size"));
                }
                let text = std::str::from_utf8(&line[..digits])
                    .map_err(|_| DirectError::Chunked("chunk size"))?;
                let size = u64::from_str_radix(text, 16)
                    .map_err(|_| DirectError::Chunked("chunk size"))?;
                buf.advance(end + 2);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(take).freeze();
                let left = left - take as u64;
                *state = if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                };
                return Ok(Step::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(DirectError::Chunked("no CRLF after chunk data"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Done => return Ok(Step::End),
            Chunk::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Step::End);
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((n, fields))) => {
                        let trailers = header_map(fields)?;
                        buf.advance(n);
                        *state = Chunk::Done;
                        return Ok(Step::Trailers(trailers));
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                        return Err(DirectError::Chunked("trailer section too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Step::More),
                    Err(_) => return Err(DirectError::Chunked("trailer fields")),
                }
            }
        }
    }
}

/// What is left of a body.
#[derive(Clone, Copy, Debug)]
enum Left {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

/// A response body read from the upstream connection as the client takes it. At its end the
/// connection goes to `keep` (when the response allows and nothing followed the body);
/// dropped before (the client went away), the connection is closed.
pub struct DirectBody {
    conn: Option<Conn>,
    left: Left,
    keep_alive: bool,
    keep: Option<(Arc<dyn Keep>, SocketAddr)>,
}

impl std::fmt::Debug for DirectBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectBody")
            .field("left", &self.left)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

impl DirectBody {
    /// The body of `head`, read from `conn`. A response without a body gives its connection
    /// back at once (the returned body is empty).
    pub fn new(conn: Conn, head: &Head, keep: Arc<dyn Keep>, up: SocketAddr) -> Self {
        let left = match head.framing {
            Framing::Empty => Left::Length(0),
            Framing::Length(n) => Left::Length(n),
            Framing::Chunked => Left::Chunked(Chunk::Size),
            Framing::UntilClose => Left::UntilClose,
        };
        let mut body = Self {
            conn: Some(conn),
            left,
            keep_alive: head.keep_alive,
            keep: Some((keep, up)),
        };
        if matches!(body.left, Left::Length(0)) {
            body.finish();
        }
        body
    }

    /// The body was read to its end: the connection goes back, or is closed.
    fn finish(&mut self) {
        let conn = self.conn.take();
        if let (Some(conn), Some((keep, up))) = (conn, self.keep.take())
            && self.keep_alive
            && conn.buf.is_empty()
        {
            keep.keep(up, conn);
        }
    }

    fn frame(data: Bytes) -> Poll<Option<Result<Frame<Bytes>, DirectError>>> {
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl hyper::body::Body for DirectBody {
    type Data = Bytes;
    type Error = DirectError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DirectError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.left {
                Left::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Left::Length(n) => {
                    if !conn.buf.is_empty() {
                        let take = usize::try_from(*n)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        let data = conn.buf.split_to(take).freeze();
                        *n -= take as u64;
                        if *n == 0 {
                            this.finish();
                        }
                        return Self::frame(data);
                    }
                }
                Left::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Self::frame(data);
                    }
                }
                Left::Chunked(state) => match decode_chunked(state, &mut conn.buf) {
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Ok(Step::Data(data)) => return Self::frame(data),
                    Ok(Step::Trailers(t)) => {
                        // The last frame of a body: hyper asks for nothing after it.
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Step::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {}
                },
            }
            // The buffer is used up: read more.
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.left, Left::UntilClose) => {
                    // The end of the body; the connection ends with it.
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(DirectError::ClosedInBody)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(DirectError::Read(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, self.left) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Left::Length(n)) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use hyper::body::Body as _;
    use tokio::io::AsyncReadExt as _;

    use super::*;

    fn parse(text: &[u8], method: &Method) -> Result<Option<Head>, DirectError> {
        parse_head(
            &mut BytesMut::from(text),
            &mut Vec::new(),
            method,
            &mut HeaderMap::new(),
        )
    }

    fn head(text: &str, method: &Method) -> Head {
        let mut buf = BytesMut::from(text.as_bytes());
        match parse_head(&mut buf, &mut Vec::new(), method, &mut HeaderMap::new()) {
            Ok(Some(h)) => {
                assert!(buf.is_empty(), "{text:?}: the head was not taken out");
                h
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn request_head_is_the_method_target_headers_and_host_fallback() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        encode_request(
            &Method::GET,
            "/p?q=1",
            &h,
            Some("10.0.0.1:80"),
            None,
            &mut out,
        );
        assert_eq!(
            out,
            b"GET /p?q=1 HTTP/1.1\r\nhost: 10.0.0.1:80\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        encode_request(&Method::HEAD, "/", &h, None, None, &mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HEAD / HTTP/1.1\r\n"), "{text}");
        assert_eq!(text.matches("host:").count(), 1, "{text}");
        assert!(text.contains("host: example.com\r\n"), "{text}");
        // Forwarding: the client's own X-Forwarded-For line replaced by the appended one.
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.9"));
        let client = super::super::headers::Client::new([10, 0, 0, 7].into(), "http", false);
        let host = h.get(header::HOST).cloned();
        encode_request(
            &Method::GET,
            "/",
            &h,
            None,
            Some((&client, host.as_ref())),
            &mut out,
        );
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("x-forwarded-for:").count(), 1, "{text}");
        assert!(
            text.contains("x-forwarded-for: 192.0.2.9, 10.0.0.7\r\n"),
            "{text}"
        );
        assert!(text.contains("x-forwarded-proto: http\r\n"), "{text}");
        assert!(
            text.contains("forwarded: for=10.0.0.7;proto=http;host=example.com\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = Method::GET;
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &get);
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", &get);
        assert_eq!(h.framing, Framing::Length(5));
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            &get,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, true));
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            &get,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH));
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", &get);
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", &get);
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
        for status in ["204 No Content", "304 Not Modified", "103 Early Hints"] {
            let h = head(
                &format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n"),
                &get,
            );
            assert_eq!(h.framing, Framing::Empty, "{status}");
        }
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n",
            &get,
        );
        assert!(!h.keep_alive);
        // Hop-by-hop fields, and those Connection names, do not reach the client.
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Connection: x\r\nUpgrade: h2c\r\nX-Keep: 2\r\nContent-Length: 0\r\n\r\n",
            &get,
        );
        let names: Vec<&str> = h.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-keep", "content-length"]);
        assert!(h.keep_alive);
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            &get,
        );
        assert!(h.keep_alive && !h.headers.contains_key(header::CONNECTION));
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &get,
        );
        assert!(h.headers.is_empty(), "{:?}", h.headers);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", &get);
        assert_eq!((h.version, h.keep_alive), (Version::HTTP_10, false));
        let h = head(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            &get,
        );
        assert!(h.keep_alive);
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
        ] {
            assert!(parse(bad.as_bytes(), &get).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Le", &get),
            Ok(None)
        ));
        // A head and the body's first bytes: the head is taken out, the body stays.
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-Y: z\r\nContent-Length: 2\r\n\r\nok"[..]);
        let h = parse_head(&mut buf, &mut Vec::new(), &get, &mut HeaderMap::new())
            .expect("valid")
            .expect("complete");
        assert_eq!(&buf[..], b"ok");
        assert_eq!(
            h.headers.get("x-y").map(HeaderValue::as_bytes),
            Some(&b"z"[..])
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(parse(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes(), &get).is_err());
    }

    /// Decode `wire` handed over in pieces of `step` bytes.
    fn decode_in_pieces(
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), DirectError> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut pieces = wire.chunks(step);
        loop {
            match decode_chunked(&mut state, &mut buf)? {
                Step::Data(d) => data.extend_from_slice(&d),
                Step::Trailers(t) => trailers = Some(t),
                Step::End => {
                    assert!(buf.is_empty(), "bytes after the body");
                    return Ok((data, trailers));
                }
                Step::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err(DirectError::ClosedInBody),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let wire =
            b"5\r\nhello\r\n7;name=value\r\n, world\r\nA \r\n0123456789\r\n0\r\nX-Check: 1\r\n\r\n";
        for step in 1..=wire.len() {
            let (data, trailers) = decode_in_pieces(wire, step).expect("valid body");
            assert_eq!(data, b"hello, world0123456789", "step {step}");
            let trailers = trailers.expect("trailers");
            assert_eq!(
                trailers.get("x-check").map(HeaderValue::as_bytes),
                Some(&b"1"[..])
            );
        }
        let (data, trailers) = decode_in_pieces(b"0\r\n\r\n", 1).expect("empty body");
        assert!(data.is_empty() && trailers.is_none());
        for bad in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
            b"z\r\n",
            b"5x\r\nhello\r\n",
            b"11111111111111111\r\n",
            b"\r\n",
        ] {
            assert!(decode_in_pieces(bad, 3).is_err(), "{bad:?} accepted");
        }
        // Cut short: more is asked for, and the end of the stream is an error.
        assert!(matches!(
            decode_in_pieces(b"5\r\nhel", 2),
            Err(DirectError::ClosedInBody)
        ));
    }

    /// A deterministic property runner (fixed seed: the same cases every run).
    fn runner(cases: u32) -> proptest::test_runner::TestRunner {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        TestRunner::new_with_rng(
            config,
            TestRng::from_seed(RngAlgorithm::ChaCha, &[0x5e; 32]),
        )
    }

    /// Any bytes, any method: the head parser answers (complete, more, or an error) without
    /// panicking, and takes out of the buffer exactly what it parsed.
    #[test]
    fn any_bytes_parse_or_fail_cleanly() {
        use proptest::prelude::*;
        let head_like = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            // Mostly well-formed heads with random fields, to reach past the status line.
            (
                100u16..600,
                proptest::collection::vec(("[a-zA-Z-]{1,12}", "[ -~]{0,20}"), 0..8),
                proptest::collection::vec(any::<u8>(), 0..20),
            )
                .prop_map(|(code, fields, tail)| {
                    let mut t = format!("HTTP/1.1 {code} X\r\n").into_bytes();
                    for (n, v) in fields {
                        t.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
                    }
                    t.extend_from_slice(b"\r\n");
                    t.extend_from_slice(&tail);
                    t
                }),
        ];
        runner(3000)
            .run(&(head_like, any::<bool>()), |(bytes, head_request)| {
                let method = if head_request {
                    Method::HEAD
                } else {
                    Method::GET
                };
                let mut buf = BytesMut::from(&bytes[..]);
                match parse_head(&mut buf, &mut Vec::new(), &method, &mut HeaderMap::new()) {
                    Ok(Some(h)) => {
                        prop_assert!(buf.len() < bytes.len());
                        prop_assert!(bytes.ends_with(&buf[..]));
                        prop_assert!(!h.headers.contains_key(header::TRANSFER_ENCODING));
                    }
                    Ok(None) | Err(_) => prop_assert_eq!(buf.len(), bytes.len()),
                }
                Ok(())
            })
            .expect("parse_head on arbitrary input");
    }

    /// Chunked bodies with random chunk sizes, extensions and trailers decode to their data
    /// whatever the reads' sizes; random bytes end in data, an error or a wait for more, never
    /// a panic or an endless loop.
    #[test]
    fn chunked_bodies_round_trip_and_garbage_fails_cleanly() {
        use proptest::prelude::*;
        let body = (
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            any::<bool>(),
            any::<bool>(),
            1usize..17,
        );
        runner(2000)
            .run(&body, |(chunks, ext, trailer, step)| {
                let mut wire = Vec::new();
                for c in &chunks {
                    wire.extend_from_slice(format!("{:x}", c.len()).as_bytes());
                    if ext {
                        wire.extend_from_slice(b";n=v");
                    }
                    wire.extend_from_slice(b"\r\n");
                    wire.extend_from_slice(c);
                    wire.extend_from_slice(b"\r\n");
                }
                wire.extend_from_slice(b"0\r\n");
                if trailer {
                    wire.extend_from_slice(b"x-t: 1\r\n");
                }
                wire.extend_from_slice(b"\r\n");
                let (data, trailers) = decode_in_pieces(&wire, step).expect("valid body");
                prop_assert_eq!(data, chunks.concat());
                prop_assert_eq!(trailers.is_some(), trailer);
                Ok(())
            })
            .expect("chunked round trip");
        runner(3000)
            .run(
                &(proptest::collection::vec(any::<u8>(), 0..200), 1usize..9),
                |(bytes, step)| {
                    // Bounded: each step either consumes bytes, hands out data, or asks for
                    // more (and the input runs out).
                    let _ = decode_in_pieces(&bytes, step);
                    Ok(())
                },
            )
            .expect("chunked decoding of arbitrary input");
    }

    #[derive(Default)]
    struct Kept(Mutex<Vec<SocketAddr>>);

    impl Keep for Kept {
        fn keep(&self, up: SocketAddr, _conn: Conn) {
            if let Ok(mut k) = self.0.lock() {
                k.push(up);
            }
        }
    }

    /// One exchange against a loopback "upstream" that answers `response` and then, when
    /// `close`, closes: the body as collected, and whether the connection was kept.
    async fn through(
        response: &'static [u8],
        close: bool,
        method: Method,
    ) -> Result<(Vec<u8>, bool), DirectError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            s.write_all(response).await.expect("answer");
            if !close {
                // Hold the connection until the client is done.
                let _ = s.read(&mut req).await;
            }
        });
        let mut conn = Conn::new(TcpStream::connect(addr).await.expect("connect"));
        let mut req = Vec::new();
        encode_request(&method, "/", &HeaderMap::new(), Some("x"), None, &mut req);
        let head = exchange(&mut conn, &req, &method, &mut HeaderMap::new()).await?;
        let kept = Arc::new(Kept::default());
        let mut body = DirectBody::new(conn, &head, kept.clone(), addr);
        let mut data = Vec::new();
        // As hyper's server: frames until the end, or until trailers (always the last frame).
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(_) => break,
            }
        }
        assert!(body.is_end_stream());
        drop(body);
        server.abort();
        let kept = kept.0.lock().map(|k| k.len()).unwrap_or(0);
        Ok((data, kept == 1))
    }

    #[test]
    fn list_fields_are_read_from_the_heads_bytes() {
        let got: Vec<&[u8]> = list_elements(b" close ,keep-alive,, x\t").collect();
        assert_eq!(got, [&b"close"[..], b"keep-alive", b"", b"x"]);
        // Not visible ASCII: no element (as HeaderValue::to_str refuses it).
        let got: Vec<&[u8]> = list_elements(b"close\xff").collect();
        assert_eq!(got, [&b""[..]]);
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: \tClose \r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(!h.keep_alive);
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: closeé\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(h.keep_alive, "a value that is not ASCII names no option");
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip ,  Chunked\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.headers.get(header::TRANSFER_ENCODING).is_none());
    }

    /// An upstream on loopback that reads one request and answers `response` (nothing: closes).
    async fn answering(response: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            let _ = s.write_all(response).await;
        });
        addr
    }

    #[tokio::test]
    async fn the_request_map_stays_the_callers_until_a_head_comes_back_then_holds_its_fields() {
        let mut request_map = HeaderMap::new();
        request_map.insert("x-request", HeaderValue::from_static("1"));
        let mut req = Vec::new();
        encode_request(&Method::GET, "/", &request_map, Some("x"), None, &mut req);

        // No answer (the request may go again): the map is untouched, ready to be encoded again.
        let silent = answering(b"").await;
        let mut conn = Conn::new(TcpStream::connect(silent).await.expect("connect"));
        let e = exchange(&mut conn, &req, &Method::GET, &mut request_map)
            .await
            .expect_err("closed without an answer");
        assert!(e.retry_on_new_connection(), "{e}");
        assert_eq!(
            request_map.get("x-request").map(HeaderValue::as_bytes),
            Some(&b"1"[..])
        );

        // An incomplete head leaves it as well.
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-Resp"[..]);
        let none = parse_head(
            &mut partial,
            &mut Vec::new(),
            &Method::GET,
            &mut request_map,
        )
        .expect("a prefix of a head");
        assert!(none.is_none());
        assert_eq!(request_map.len(), 1);

        // An answer: its fields, and only those, in the map's allocation.
        let up = answering(b"HTTP/1.1 200 OK\r\nX-Response: 2\r\nContent-Length: 0\r\n\r\n").await;
        let mut conn = Conn::new(TcpStream::connect(up).await.expect("connect"));
        let head = exchange(&mut conn, &req, &Method::GET, &mut request_map)
            .await
            .expect("answered");
        assert!(head.headers.get("x-request").is_none());
        assert_eq!(
            head.headers.get("x-response").map(HeaderValue::as_bytes),
            Some(&b"2"[..])
        );
        assert_eq!(head.headers.len(), 2, "{:?}", head.headers);
        assert!(request_map.is_empty());
    }

    #[tokio::test]
    async fn bodies_are_read_to_their_end_and_connections_kept_when_allowed() {
        // Response, upstream closes after it, method, body the client gets, connection kept.
        type Case = (&'static [u8], bool, Method, &'static [u8], bool);
        let cases: [Case; 8] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false, Method::GET, b"hello", true),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                false,
                Method::GET,
                b"ok",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                false,
                Method::GET,
                b"abc",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
                false,
                Method::GET,
                b"abc",
                true,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true, Method::GET, b"until the end", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", false, Method::HEAD, b"", true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, Method::GET, b"", true),
            (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
                true,
                Method::GET,
                b"x",
                false,
            ),
        ];
        for (response, close, method, want, kept) in cases {
            let got = through(response, close, method).await.expect("exchange");
            assert_eq!(
                got,
                (want.to_vec(), kept),
                "{}",
                String::from_utf8_lossy(response)
            );
        }
        // Bytes after the body: the connection is not reused.
        let got = through(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy",
            false,
            Method::GET,
        )
        .await
        .expect("exchange");
        assert_eq!(got, (b"x".to_vec(), false));
        // Closed mid-body, before any byte, with a 101.
        assert!(matches!(
            through(
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
                true,
                Method::GET
            )
            .await,
            Err(DirectError::ClosedInBody)
        ));
        let none = through(b"", true, Method::GET).await;
        assert!(
            matches!(&none, Err(e) if e.retry_on_new_connection()),
            "{none:?}"
        );
        assert!(matches!(
            through(
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                true,
                Method::GET
            )
            .await,
            Err(DirectError::UnexpectedSwitch)
        ));
        assert!(matches!(
            through(b"HTTP/1.1 200 OK\r\nContent-Le", true, Method::GET).await,
            Err(DirectError::ClosedInHead)
        ));
    }
}
