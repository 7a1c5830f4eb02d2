//! One first message as the protocol matchers see it: the TLS and HTTP parses they ask
//! for ([`Parsed`]), whether the message kept the protocol it claimed, and the log of
//! what the parsers found.
//!
//! A file of its own, apart from the matchers because it is shared by all of them for one decision, so that
//! each parser runs at most once however many routes ask; apart from the table because it
//! is about one message, not the routes.

use std::borrow::Cow;
use std::cell::OnceCell;

use super::matcher::Verdict;
use super::router::{Decision, FirstMessage};
use super::{http, path, tls};

/// What a protocol parser made of the first message so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// Enough has arrived to tell what routing needs.
    Done(T),
    /// Agrees with the protocol so far; only more bytes can tell.
    Incomplete,
    /// Another protocol: the bytes so far already rule this one out.
    Other,
    /// Claims to be this protocol but breaks its rules.
    Malformed(&'static str),
}

impl<T> Parsed<T> {
    /// `Match` if what was parsed passes `test`; a message that is not (or not validly)
    /// this protocol never matches.
    pub(super) fn verdict(&self, test: impl FnOnce(&T) -> bool) -> Verdict {
        match self {
            Parsed::Done(parsed) => Verdict::from(test(parsed)),
            Parsed::Incomplete => Verdict::NeedMore,
            Parsed::Other | Parsed::Malformed(_) => Verdict::NoMatch,
        }
    }
}

/// One first message, with the protocol parses the matchers asked for, each done at
/// most once.
pub(super) struct Inspection<'a> {
    pub(super) bytes: &'a [u8],
    tls: OnceCell<Parsed<tls::ClientHello>>,
    http: OnceCell<Parsed<http::Request<'a>>>,
    /// The HTTP request's path after [`path::normalize`].
    normalized_path: OnceCell<Cow<'a, str>>,
}

/// What became of the protocol a first message claimed by its first bytes, for
/// [`OnUnparsed::Reset`](crate::route::OnUnparsed::Reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// It is neither TLS nor HTTP, or a whole and valid ClientHello or request head.
    Kept,
    /// It still reads as the start of one: only more bytes can tell.
    Pending,
    /// It started as TLS or HTTP and then broke the protocol's rules, or stopped short
    /// (at first_message_max, first_message_timeout or the client's FIN).
    Broken,
}

impl Claim {
    fn of<T>(parsed: &Parsed<T>, complete: bool) -> Claim {
        match parsed {
            Parsed::Done(_) | Parsed::Other => Claim::Kept,
            Parsed::Incomplete if !complete => Claim::Pending,
            Parsed::Incomplete | Parsed::Malformed(_) => Claim::Broken,
        }
    }

    /// The worse of the two: one broken protocol is enough.
    fn or(self, other: Claim) -> Claim {
        match (self, other) {
            (Claim::Broken, _) | (_, Claim::Broken) => Claim::Broken,
            (Claim::Pending, _) | (_, Claim::Pending) => Claim::Pending,
            (Claim::Kept, Claim::Kept) => Claim::Kept,
        }
    }
}

impl<'a> Inspection<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Inspection<'a> {
        Inspection {
            bytes,
            tls: OnceCell::new(),
            http: OnceCell::new(),
            normalized_path: OnceCell::new(),
        }
    }

    pub(super) fn tls(&self) -> &Parsed<tls::ClientHello> {
        self.tls.get_or_init(|| tls::parse_client_hello(self.bytes))
    }

    pub(super) fn http(&self) -> &Parsed<http::Request<'a>> {
        self.http.get_or_init(|| http::parse_request(self.bytes))
    }

    /// `path` (the parsed request's) normalized, once however many routes compare it.
    pub(super) fn normalized_path(&self, path: &'a str) -> &str {
        self.normalized_path.get_or_init(|| path::normalize(path))
    }

    /// Whether the message kept the TLS or HTTP it claimed. Runs both parsers, whether
    /// a route asked for them or not: a route table without TLS routes must still not
    /// hand a broken ClientHello to the default route in reset mode.
    pub(super) fn claim(&self, complete: bool) -> Claim {
        Claim::of(self.tls(), complete).or(Claim::of(self.http(), complete))
    }

    /// Logs, once the route is decided, what the protocol parsers found: at info a
    /// message that claimed a protocol but was malformed, or stopped short of a whole
    /// ClientHello or request head; at debug what a good one asked for, and that a
    /// message no route took was not the protocol at all.
    pub(super) fn log(&self, first: &FirstMessage<'_>, decision: &Decision, matched: bool) {
        let client = first.client;
        let bytes = first.bytes.len();
        let route = match decision {
            Decision::Forward(forward) => &*forward.route,
            Decision::Reject | Decision::Reset | Decision::NeedMore => "(none)",
        };
        let other = |protocol: &str| {
            if !matched {
                tracing::debug!(%client, %route, "first message is not {protocol}");
            }
        };
        match self.tls.get() {
            None | Some(Parsed::Incomplete) if !first.complete => {}
            None => {}
            Some(Parsed::Done(hello)) => {
                let server_name = (hello.server_name.as_deref()).map_or_else(
                    || "(none)".to_owned(),
                    |name| name.escape_ascii().to_string(),
                );
                let alpn: Vec<String> = (hello.alpn.iter())
                    .map(|name| name.escape_ascii().to_string())
                    .collect();
                tracing::debug!(
                    %client, %route, %server_name, alpn = %alpn.join(","),
                    "first message is a TLS ClientHello"
                );
            }
            Some(Parsed::Malformed(reason)) => tracing::info!(
                %client, %route, bytes, "first message is a malformed TLS ClientHello: {reason}"
            ),
            Some(Parsed::Incomplete) => tracing::info!(
                %client, %route, bytes, "first message is an incomplete TLS ClientHello"
            ),
            Some(Parsed::Other) => other("a TLS ClientHello"),
        }
        match self.http.get() {
            None | Some(Parsed::Incomplete) if !first.complete => {}
            None => {}
            Some(Parsed::Done(request)) => tracing::debug!(
                %client, %route, host = request.host.unwrap_or("(none)"), path = request.path,
                "first message is an HTTP/1.{} request", request.version
            ),
            Some(Parsed::Malformed(reason)) => tracing::info!(
                %client, %route, bytes, "first message is a malformed HTTP request: {reason}"
            ),
            Some(Parsed::Incomplete) => tracing::info!(
                %client, %route, bytes, "first message is an incomplete HTTP request head"
            ),
            Some(Parsed::Other) => other("an HTTP/1.x request"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::route::matcher::tests::{http_host, sni};
    use crate::route::table::tests::{default_route, fed_in_steps, route, table};
    use crate::route::tls::tests::client_hello;

    /// Collects what a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The log lines written while `run` runs, at debug level and up.
    fn logs_of(run: impl FnOnce()) -> Vec<String> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    fn at_info(lines: &[String]) -> Vec<&String> {
        lines.iter().filter(|line| line.contains("INFO")).collect()
    }

    #[test]
    fn logs_bad_first_messages_once_with_the_client() {
        let routes = table(vec![
            route("a", vec![sni("a.example.com")], &[9001]),
            route("web", vec![http_host("b.example.com")], &[9002]),
            default_route("fallback", &[9009]),
        ]);
        let hello = client_hello(Some("a.example.com"), &["h2"]);
        let mut garbled = hello.clone();
        garbled[43] = 0xff; // the session id's length
        let truncated = &hello[..hello.len() - 3];

        let lines = logs_of(|| assert_eq!(fed_in_steps(&routes, &garbled, 1).0, "fallback"));
        let info = at_info(&lines);
        assert_eq!(info.len(), 1, "{lines:#?}");
        assert!(info[0].contains("malformed TLS ClientHello"), "{}", info[0]);
        assert!(info[0].contains("client=127.0.0.1:40000"), "{}", info[0]);
        assert!(info[0].contains("fallback"), "{}", info[0]);

        let lines = logs_of(|| assert_eq!(fed_in_steps(&routes, truncated, 1).0, "fallback"));
        let info = at_info(&lines);
        assert_eq!(info.len(), 1, "{lines:#?}");
        assert!(
            info[0].contains("incomplete TLS ClientHello"),
            "{}",
            info[0]
        );

        let head = b"GET / HTTP/1.1\r\nHost: b.example.com\r\nBad Header: x\r\n\r\n";
        let lines = logs_of(|| assert_eq!(fed_in_steps(&routes, head, 1).0, "fallback"));
        let info = at_info(&lines);
        assert_eq!(info.len(), 1, "{lines:#?}");
        assert!(info[0].contains("malformed HTTP request"), "{}", info[0]);

        // Good messages and other protocols: debug only, once each, and that a message
        // is not TLS only when no route took it.
        let head = b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n";
        let lines = logs_of(|| {
            assert_eq!(fed_in_steps(&routes, &hello, 1).0, "a");
            assert_eq!(fed_in_steps(&routes, b"SSH-2.0-x\r\n", 1).0, "fallback");
            assert_eq!(fed_in_steps(&routes, head, 1).0, "web");
        });
        assert!(at_info(&lines).is_empty(), "{lines:#?}");
        let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
        assert_eq!(count("is a TLS ClientHello"), 1, "{lines:#?}");
        assert_eq!(count("server_name=a.example.com alpn=h2"), 1, "{lines:#?}");
        assert_eq!(count("is an HTTP/1.1 request"), 1, "{lines:#?}");
        assert_eq!(count("not a TLS ClientHello"), 1, "{lines:#?}");
        assert_eq!(count("not an HTTP/1.x request"), 1, "{lines:#?}");
    }
}
