//! A server-sent-events parser fed with whatever pieces the network delivers.
//!
//! Written here rather than taken from a crate because the providers need to know more
//! than the events: whether the body was an event stream at all (a proxy's HTML error
//! page is Malformed, not Truncated) and whether the last event was cut off by the end of
//! the body (a half JSON object there means Truncated, not Malformed).

use std::collections::VecDeque;

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, if the server sent one.
    pub(crate) event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub(crate) data: String,
    /// The body ended before the blank line that closes this event.
    pub(crate) at_eof: bool,
}

/// How many bytes of the body's start are kept to quote in a Malformed error.
const HEAD_BYTES: usize = 300;

#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
    ready: VecDeque<SseEvent>,
    /// The start of the body, for error messages.
    head: Vec<u8>,
    bytes_seen: usize,
    /// Lines that only an event stream has (`data:`, `event:`, `id:`, `retry:`, comments).
    sse_lines: usize,
    first_line: bool,
    finished: bool,
}

impl SseParser {
    pub(crate) fn new() -> Self {
        SseParser { first_line: true, ..Default::default() }
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if self.head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.bytes_seen += chunk.len();
        self.buf.extend_from_slice(chunk);
        self.split_lines(false);
    }

    /// The body ended: whatever is pending becomes the last event.
    pub(crate) fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.split_lines(true);
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.line(&rest);
        }
        if self.has_data {
            self.dispatch(true);
        }
    }

    pub(crate) fn pop(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    /// Whether anything seen so far looks like an event stream.
    pub(crate) fn looks_like_sse(&self) -> bool {
        self.sse_lines > 0
    }

    pub(crate) fn bytes_seen(&self) -> usize {
        self.bytes_seen
    }

    /// The start of the body, lossily decoded.
    pub(crate) fn head(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }

    fn split_lines(&mut self, at_eof: bool) {
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            match self.buf[i] {
                b'\n' => {
                    let line = self.buf[start..i].to_vec();
                    self.line(&line);
                    i += 1;
                    start = i;
                }
                b'\r' => {
                    // A CR at the end of what arrived may be the first half of a CRLF.
                    if i + 1 == self.buf.len() && !at_eof {
                        break;
                    }
                    let line = self.buf[start..i].to_vec();
                    self.line(&line);
                    i += if self.buf.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                    start = i;
                }
                _ => i += 1,
            }
        }
        self.buf.drain(..start);
    }

    fn line(&mut self, raw: &[u8]) {
        let mut line = String::from_utf8_lossy(raw);
        if self.first_line {
            self.first_line = false;
            if let Some(rest) = line.strip_prefix('\u{feff}') {
                line = rest.to_owned().into();
            }
        }
        if line.is_empty() {
            if self.has_data {
                self.dispatch(false);
            } else {
                self.event = None;
            }
            return;
        }
        if line.starts_with(':') {
            self.sse_lines += 1;
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*line, ""),
        };
        match field {
            "data" => {
                self.sse_lines += 1;
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => {
                self.sse_lines += 1;
                self.event = Some(value.to_owned());
            }
            "id" | "retry" => self.sse_lines += 1,
            // The spec says to ignore unknown fields; `looks_like_sse` tells the caller
            // when that is all there was.
            _ => {}
        }
    }

    fn dispatch(&mut self, at_eof: bool) {
        self.ready.push_back(SseEvent { event: self.event.take(), data: std::mem::take(&mut self.data), at_eof });
        self.has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser) -> Vec<SseEvent> {
        std::iter::from_fn(|| p.pop()).collect()
    }

    fn ev(event: Option<&str>, data: &str, at_eof: bool) -> SseEvent {
        SseEvent { event: event.map(str::to_owned), data: data.to_owned(), at_eof }
    }

    const BODY: &str = "\u{feff}: keep-alive\r\nevent: a\r\ndata: {\"x\":1}\r\n\r\ndata: line1\ndata:line2\n\nid: 3\nretry: 10\ndata: héllo\r\r";

    #[test]
    fn parses_whole_body() {
        let mut p = SseParser::new();
        p.feed(BODY.as_bytes());
        p.finish();
        assert_eq!(
            all(&mut p),
            vec![ev(Some("a"), "{\"x\":1}", false), ev(None, "line1\nline2", false), ev(None, "héllo", false)]
        );
        assert!(p.looks_like_sse());
    }

    #[test]
    fn same_events_when_fed_byte_by_byte() {
        let mut whole = SseParser::new();
        whole.feed(BODY.as_bytes());
        whole.finish();
        let mut bytes = SseParser::new();
        for b in BODY.as_bytes() {
            bytes.feed(std::slice::from_ref(b));
        }
        bytes.finish();
        assert_eq!(all(&mut whole), all(&mut bytes));
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let mut p = SseParser::new();
        p.feed(b"data: a\r");
        p.feed(b"\n\r");
        p.feed(b"\ndata: b\n\n");
        p.finish();
        assert_eq!(all(&mut p), vec![ev(None, "a", false), ev(None, "b", false)]);
    }

    #[test]
    fn event_cut_by_end_of_body_is_marked() {
        let mut p = SseParser::new();
        p.feed(b"data: {\"a\":1}\n\ndata: {\"b\":");
        p.finish();
        assert_eq!(all(&mut p), vec![ev(None, "{\"a\":1}", false), ev(None, "{\"b\":", true)]);
    }

    #[test]
    fn html_is_not_an_event_stream() {
        let mut p = SseParser::new();
        p.feed(b"<html>\n<body>Bad gateway</body>\n</html>\n");
        p.finish();
        assert!(all(&mut p).is_empty());
        assert!(!p.looks_like_sse());
        assert!(p.head().starts_with("<html>"));
    }
}
