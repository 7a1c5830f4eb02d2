//! One test on a first message, [`Matcher`], and what it makes of the bytes received so
//! far, [`Verdict`].
//!
//! A file of its own, apart from the route table because a matcher is decided alone, on one message, and
//! must never panic whatever the client sent; the table only combines verdicts and
//! orders routes.

use std::fmt;

use super::host::HostPattern;
use super::inspection::Inspection;
use super::path::PathForm;
use super::regex::MessageRegex;

/// One test on a first message. A route holds one or more; all must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// The message starts with these bytes.
    Prefix(Vec<u8>),
    /// These bytes sit at this offset of the message.
    At {
        /// From the start of the message, 0-based.
        offset: usize,
        /// The bytes expected there.
        bytes: Vec<u8>,
    },
    /// The message is `min..=max` bytes long. "Long" means the bytes received when the
    /// route is decided: a client that sends its first message in one write is routed on
    /// that write's length, whatever it sends afterwards.
    Length {
        /// The fewest bytes.
        min: usize,
        /// The most bytes.
        max: usize,
    },
    /// The message is a TLS ClientHello whose server_name (SNI) fits the pattern.
    Sni(HostPattern),
    /// The message is a TLS ClientHello that offers at least one of these ALPN
    /// protocols.
    Alpn(Vec<Vec<u8>>),
    /// The message is an HTTP/1.x request for a host that fits the pattern: the
    /// authority of an absolute-form target, else the Host header, port ignored.
    HttpHost(HostPattern),
    /// The message is an HTTP/1.x request whose path (query included), read as `form`
    /// says, starts with `prefix`. Like `HttpHost`, decided once the whole head has
    /// arrived.
    HttpPathPrefix {
        /// What the path starts with, e.g. `/api/`.
        prefix: String,
        /// Normalized or as sent.
        form: PathForm,
    },
    /// The regex matches somewhere in the message (see [`MessageRegex`]).
    Regex(MessageRegex),
}

/// What one matcher, or one route, makes of the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Matches, whatever else arrives.
    Match,
    /// Can never match, whatever else arrives.
    NoMatch,
    /// Agrees so far; only more bytes can tell.
    NeedMore,
}

impl Verdict {
    /// Both must hold: a `NoMatch` settles it, otherwise a `NeedMore` waits.
    pub(super) fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::NoMatch, _) | (_, Verdict::NoMatch) => Verdict::NoMatch,
            (Verdict::NeedMore, _) | (_, Verdict::NeedMore) => Verdict::NeedMore,
            (Verdict::Match, Verdict::Match) => Verdict::Match,
        }
    }
}

impl Matcher {
    /// What the first message so far, `first`, says about this matcher.
    pub fn check(&self, first: &[u8]) -> Verdict {
        self.verdict(&Inspection::new(first))
    }

    pub(super) fn verdict(&self, inspection: &Inspection<'_>) -> Verdict {
        let first = inspection.bytes;
        match self {
            Matcher::Prefix(prefix) => window_verdict(first, 0, prefix),
            Matcher::At { offset, bytes } => window_verdict(first, *offset, bytes),
            Matcher::Length { min, max } => {
                if first.len() < *min {
                    Verdict::NeedMore
                } else if first.len() <= *max {
                    Verdict::Match
                } else {
                    Verdict::NoMatch
                }
            }
            Matcher::Sni(pattern) => inspection.tls().verdict(|hello| {
                (hello.server_name.as_deref()).is_some_and(|name| pattern.matches(name))
            }),
            Matcher::Alpn(wanted) => inspection
                .tls()
                .verdict(|hello| hello.alpn.iter().any(|offered| wanted.contains(offered))),
            Matcher::HttpHost(pattern) => inspection.http().verdict(|request| {
                (request.host).is_some_and(|host| pattern.matches(host.as_bytes()))
            }),
            Matcher::HttpPathPrefix { prefix, form } => inspection.http().verdict(|request| {
                match form {
                    PathForm::Normalized => inspection.normalized_path(request.path),
                    PathForm::AsSent => request.path,
                }
                .starts_with(prefix.as_str())
            }),
            Matcher::Regex(regex) => regex.check(first),
        }
    }
}

impl From<bool> for Verdict {
    fn from(matches: bool) -> Verdict {
        if matches {
            Verdict::Match
        } else {
            Verdict::NoMatch
        }
    }
}

/// Whether `expected` sits at `offset` of `first`. A disagreeing byte is a `NoMatch` as soon
/// as it arrives, even before the whole window has, so that later routes need not wait
/// for bytes that cannot change the answer.
fn window_verdict(first: &[u8], offset: usize, expected: &[u8]) -> Verdict {
    if offset.checked_add(expected.len()).is_none() {
        // The window ends beyond any buffer that can exist.
        return Verdict::NoMatch;
    }
    let arrived = first.get(offset..).unwrap_or_default();
    if arrived
        .iter()
        .zip(expected)
        .any(|(got, wanted)| got != wanted)
    {
        Verdict::NoMatch
    } else if arrived.len() < expected.len() {
        Verdict::NeedMore
    } else {
        Verdict::Match
    }
}

/// Shows the matcher the way `splice-proxy --check` prints it, bytes escaped.
impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Prefix(prefix) => write!(f, "prefix \"{}\"", prefix.escape_ascii()),
            Matcher::At { offset, bytes } => {
                write!(f, "at {offset} = \"{}\"", bytes.escape_ascii())
            }
            Matcher::Length { min, max } if min == max => write!(f, "length {min}"),
            Matcher::Length {
                min,
                max: usize::MAX,
            } => write!(f, "length >= {min}"),
            Matcher::Length { min: 0, max } => write!(f, "length <= {max}"),
            Matcher::Length { min, max } => write!(f, "length {min}..={max}"),
            Matcher::Sni(pattern) => write!(f, "sni \"{pattern}\""),
            Matcher::Alpn(protocols) => {
                let quoted: Vec<String> = protocols
                    .iter()
                    .map(|name| format!("\"{}\"", name.escape_ascii()))
                    .collect();
                write!(f, "alpn [{}]", quoted.join(", "))
            }
            Matcher::HttpHost(pattern) => write!(f, "http_host \"{pattern}\""),
            Matcher::HttpPathPrefix { prefix, form } => {
                write!(f, "http_path_prefix \"{}\"", prefix.escape_default())?;
                match form {
                    PathForm::Normalized => Ok(()),
                    PathForm::AsSent => write!(f, " ({form})"),
                }
            }
            Matcher::Regex(regex) => {
                let pattern = regex.as_str();
                if pattern.contains(|c: char| c == '\'' || c.is_control()) {
                    write!(f, "regex {pattern:?}")
                } else {
                    // As a TOML literal string, the way a regex is best written.
                    write!(f, "regex '{pattern}'")
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::route) fn prefix(bytes: &[u8]) -> Matcher {
        Matcher::Prefix(bytes.to_vec())
    }

    pub(in crate::route) fn at(offset: usize, bytes: &[u8]) -> Matcher {
        Matcher::At {
            offset,
            bytes: bytes.to_vec(),
        }
    }

    pub(in crate::route) fn sni(pattern: &str) -> Matcher {
        Matcher::Sni(HostPattern::parse(pattern).unwrap())
    }

    pub(in crate::route) fn alpn(protocols: &[&str]) -> Matcher {
        Matcher::Alpn(protocols.iter().map(|p| p.as_bytes().to_vec()).collect())
    }

    pub(in crate::route) fn http_host(pattern: &str) -> Matcher {
        Matcher::HttpHost(HostPattern::parse(pattern).unwrap())
    }

    pub(in crate::route) fn path_prefix(prefix: &str) -> Matcher {
        Matcher::HttpPathPrefix {
            prefix: prefix.to_owned(),
            form: PathForm::Normalized,
        }
    }

    pub(in crate::route) fn path_prefix_as_sent(prefix: &str) -> Matcher {
        Matcher::HttpPathPrefix {
            prefix: prefix.to_owned(),
            form: PathForm::AsSent,
        }
    }

    pub(in crate::route) fn regex(pattern: &str) -> Matcher {
        Matcher::Regex(MessageRegex::new(pattern).unwrap())
    }

    #[test]
    fn prefix_edges() {
        let matcher = prefix(b"GET ");
        assert_eq!(matcher.check(b""), Verdict::NeedMore);
        assert_eq!(matcher.check(b"GE"), Verdict::NeedMore);
        assert_eq!(matcher.check(b"GET "), Verdict::Match);
        assert_eq!(matcher.check(b"GET /index.html"), Verdict::Match);
        assert_eq!(matcher.check(b"P"), Verdict::NoMatch);
        assert_eq!(matcher.check(b"GEX"), Verdict::NoMatch);
        assert_eq!(matcher.check(b"POST /"), Verdict::NoMatch);
    }

    #[test]
    fn at_edges() {
        let matcher = at(4, b"600");
        assert_eq!(matcher.check(b""), Verdict::NeedMore);
        assert_eq!(matcher.check(b"xxxx"), Verdict::NeedMore);
        assert_eq!(matcher.check(b"xxxx60"), Verdict::NeedMore);
        assert_eq!(matcher.check(b"xxxx600"), Verdict::Match);
        assert_eq!(matcher.check(b"xxxx600 and more"), Verdict::Match);
        assert_eq!(matcher.check(b"xxxx601"), Verdict::NoMatch);
        // A disagreeing byte settles it before the window is complete.
        assert_eq!(matcher.check(b"xxxx7"), Verdict::NoMatch);
    }

    #[test]
    fn at_huge_offsets_do_not_panic() {
        assert_eq!(at(usize::MAX, b"x").check(b"abc"), Verdict::NoMatch);
        assert_eq!(at(usize::MAX - 1, b"x").check(b"abc"), Verdict::NeedMore);
        assert_eq!(at(usize::MAX, b"").check(b"abc"), Verdict::Match);
    }

    #[test]
    fn length_edges() {
        let matcher = Matcher::Length { min: 290, max: 294 };
        assert_eq!(matcher.check(&[0; 0]), Verdict::NeedMore);
        assert_eq!(matcher.check(&[0; 289]), Verdict::NeedMore);
        assert_eq!(matcher.check(&[0; 290]), Verdict::Match);
        assert_eq!(matcher.check(&[0; 294]), Verdict::Match);
        assert_eq!(matcher.check(&[0; 295]), Verdict::NoMatch);
        let at_most = Matcher::Length { min: 0, max: 3 };
        assert_eq!(at_most.check(b"abc"), Verdict::Match);
        assert_eq!(at_most.check(b"abcd"), Verdict::NoMatch);
        let at_least = Matcher::Length {
            min: 3,
            max: usize::MAX,
        };
        assert_eq!(at_least.check(b"ab"), Verdict::NeedMore);
        assert_eq!(at_least.check(&[0; 100_000]), Verdict::Match);
    }

    #[test]
    fn matchers_display_escaped() {
        assert_eq!(prefix(b"*").to_string(), r#"prefix "*""#);
        assert_eq!(at(20, b"600").to_string(), r#"at 20 = "600""#);
        assert_eq!(
            prefix(b"\x16\x03\"\\\n").to_string(),
            r#"prefix "\x16\x03\"\\\n""#
        );
        assert_eq!(
            Matcher::Length { min: 290, max: 294 }.to_string(),
            "length 290..=294"
        );
        assert_eq!(Matcher::Length { min: 5, max: 5 }.to_string(), "length 5");
        assert_eq!(
            Matcher::Length {
                min: 5,
                max: usize::MAX
            }
            .to_string(),
            "length >= 5"
        );
        assert_eq!(
            Matcher::Length { min: 0, max: 9 }.to_string(),
            "length <= 9"
        );
    }

    #[test]
    fn protocol_matchers_display() {
        assert_eq!(sni("*.Example.com").to_string(), r#"sni "*.example.com""#);
        assert_eq!(
            alpn(&["h2", "http/1.1"]).to_string(),
            r#"alpn ["h2", "http/1.1"]"#
        );
        assert_eq!(
            http_host("B.example.com").to_string(),
            r#"http_host "b.example.com""#
        );
        assert_eq!(
            path_prefix("/api").to_string(),
            r#"http_path_prefix "/api""#
        );
        assert_eq!(regex(r"^GET /\d+").to_string(), r"regex '^GET /\d+'");
        assert_eq!(regex(r"it's").to_string(), r#"regex "it's""#);
    }
}
