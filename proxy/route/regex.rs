//! `regex` routes: a regular expression searched for in the first message's bytes.
//!
//! The search is unanchored, as grep's: `foo` matches anywhere in the message, `^foo` only
//! at its start. The syntax is the regex crate's, on bytes: Unicode is on by default, so
//! `.` is one UTF-8 encoded character and `\xff` is U+00FF; `(?-u)` makes them bytes.
//!
//! While the message is still arriving, a regex that matches the bytes so far has
//! matched: later bytes cannot undo it (`$` therefore means "the end of what has arrived",
//! rarely what a route wants). One that does not match yet waits for more bytes, unless
//! it is anchored at the start (every alternative begins with `^` or `\A`) and the bytes
//! so far already rule out any match, which a lazy DFA tells as soon as it happens: then
//! later routes need not wait for the whole first message.

use std::fmt;
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::Arc;

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::nfa::thompson;
use regex_automata::util::pool::Pool;
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, MatchKind};

use super::Verdict;

/// A compiled `regex` matcher. Clones share the compiled forms.
#[derive(Clone)]
pub struct MessageRegex(Arc<Compiled>);

struct Compiled {
    source: String,
    regex: ::regex::bytes::Regex,
    /// For a start-anchored regex: tells when no continuation can match.
    dead_end: Option<DeadEnd>,
}

type CacheFactory = Box<dyn Fn() -> Cache + Send + Sync + UnwindSafe + RefUnwindSafe>;

struct DeadEnd {
    dfa: DFA,
    caches: Pool<Cache, CacheFactory>,
}

/// Why a `regex` was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegexError {
    /// The regex does not parse or compile; the parser's message.
    #[error("not a valid regex: {0}")]
    Invalid(String),
    #[error(
        "this regex matches an empty string anywhere, so it matches every first message; \
         for a catch-all route use default = true"
    )]
    /// The regex matches the empty string, so it would take every message.
    MatchesEverything,
}

impl MessageRegex {
    /// Compiles `pattern` with the regex crate's defaults for byte regexes.
    ///
    /// # Errors
    ///
    /// [`RegexError::Invalid`] with the regex crate's message, and
    /// [`RegexError::MatchesEverything`] for a regex such as `x*` that matches any
    /// message at its start.
    pub fn new(pattern: &str) -> Result<MessageRegex, RegexError> {
        let regex = ::regex::bytes::Regex::new(pattern)
            .map_err(|error| RegexError::Invalid(error.to_string()))?;
        let hir = syntax::parse_with(pattern, &syntax_config())
            .map_err(|error| RegexError::Invalid(error.to_string()))?;
        let properties = hir.properties();
        if properties.minimum_len() == Some(0) && properties.look_set().is_empty() {
            return Err(RegexError::MatchesEverything);
        }
        Ok(MessageRegex(Arc::new(Compiled {
            source: pattern.to_owned(),
            regex,
            dead_end: DeadEnd::build(pattern),
        })))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0.source
    }

    /// What the first message so far says. `NoMatch` only when the regex is anchored
    /// and can no longer match; the route table turns a `NeedMore` into `NoMatch` once
    /// nothing more will arrive.
    pub fn check(&self, first: &[u8]) -> Verdict {
        if self.0.regex.is_match(first) {
            Verdict::Match
        } else if self
            .0
            .dead_end
            .as_ref()
            .is_some_and(|dead_end| dead_end.reached(first))
        {
            Verdict::NoMatch
        } else {
            Verdict::NeedMore
        }
    }
}

fn syntax_config() -> syntax::Config {
    // As regex::bytes::Regex: Unicode on, but a match need not be valid UTF-8.
    syntax::Config::new().utf8(false)
}

impl DeadEnd {
    /// `None` when the regex is not anchored at the start (an unanchored search never
    /// dies) or the lazy DFA cannot be built for it (e.g. a Unicode word boundary): then
    /// the route simply waits.
    fn build(pattern: &str) -> Option<DeadEnd> {
        let nfa = thompson::Compiler::new()
            .syntax(syntax_config())
            .configure(thompson::Config::new().utf8(false))
            .build(pattern)
            .ok()?;
        if !nfa.is_always_start_anchored() {
            return None;
        }
        // MatchKind::All keeps every thread alive until it fails on its own, so that a
        // dead state means that no thread is left.
        let dfa = DFA::builder()
            .configure(DFA::config().match_kind(MatchKind::All))
            .build_from_nfa(nfa)
            .ok()?;
        let for_caches = dfa.clone();
        let factory: CacheFactory = Box::new(move || for_caches.create_cache());
        Some(DeadEnd {
            dfa,
            caches: Pool::new(factory),
        })
    }

    /// Whether the anchored DFA dies within `first`: no continuation can match.
    fn reached(&self, first: &[u8]) -> bool {
        let mut cache = self.caches.get();
        let input = Input::new(first).anchored(Anchored::Yes);
        let Ok(mut state) = self.dfa.start_state_forward(&mut cache, &input) else {
            return false;
        };
        for &byte in first {
            match self.dfa.next_state(&mut cache, state, byte) {
                Ok(next) if next.is_dead() => return true,
                // A quit byte (say, non-ASCII near a Unicode \b): this DFA cannot tell.
                Ok(next) if next.is_quit() => return false,
                Ok(next) => state = next,
                // The cache gave up: cannot tell either.
                Err(_) => return false,
            }
        }
        false
    }
}

/// Equal when written the same.
impl PartialEq for MessageRegex {
    fn eq(&self, other: &MessageRegex) -> bool {
        self.0.source == other.0.source
    }
}

impl Eq for MessageRegex {}

impl fmt::Debug for MessageRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MessageRegex").field(&self.0.source).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex(pattern: &str) -> MessageRegex {
        MessageRegex::new(pattern).unwrap()
    }

    #[test]
    fn unanchored_search_waits_until_it_matches() {
        let version = regex(r"v[0-9]+\.[0-9]+");
        assert_eq!(version.check(b"hello v1"), Verdict::NeedMore);
        assert_eq!(version.check(b"hello v1.2"), Verdict::Match);
        assert_eq!(version.check(b"hello v1.2 and more"), Verdict::Match);
        // Unanchored: anything may still come, so it never says no by itself.
        assert_eq!(version.check(&[0xff; 1000]), Verdict::NeedMore);
    }

    #[test]
    fn anchored_regex_says_no_as_soon_as_it_cannot_match() {
        let get = regex(r"^(GET|HEAD) /api/");
        assert_eq!(get.check(b"GE"), Verdict::NeedMore);
        assert_eq!(get.check(b"GET /ap"), Verdict::NeedMore);
        assert_eq!(get.check(b"GET /api/x"), Verdict::Match);
        assert_eq!(get.check(b"HEAD /api/"), Verdict::Match);
        assert_eq!(get.check(b"GEX"), Verdict::NoMatch);
        assert_eq!(get.check(b"POST /api/"), Verdict::NoMatch);
        assert_eq!(get.check(b"GET /web/"), Verdict::NoMatch);

        let exact = regex(r"\APING\r\n\z");
        assert_eq!(exact.check(b"PING\r"), Verdict::NeedMore);
        assert_eq!(exact.check(b"PING\r\n"), Verdict::Match);
        assert_eq!(exact.check(b"PING\r\nPING"), Verdict::NoMatch);

        // (?m)^ matches after any newline, so it is not anchored at the start.
        let multiline = regex(r"(?m)^Host: a\r$");
        assert_eq!(multiline.check(b"GET / HTTP/1.1\r\n"), Verdict::NeedMore);
        assert_eq!(
            multiline.check(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Verdict::Match
        );
    }

    #[test]
    fn bytes_and_unicode() {
        let tls = regex(r"(?-u)^\x16\x03[\x00-\x04]");
        assert_eq!(tls.check(b"\x16\x03\x01\x02"), Verdict::Match);
        assert_eq!(tls.check(b"\x16\x03\x05"), Verdict::NoMatch);
        let unicode = regex(r"^é");
        assert_eq!(unicode.check("é".as_bytes()), Verdict::Match);
        assert_eq!(unicode.check(b"\xc3"), Verdict::NeedMore);
        assert_eq!(unicode.check(b"\xe9"), Verdict::NoMatch);
        // A Unicode word boundary is beyond the lazy DFA: it waits instead.
        let word = regex(r"^\bfoo");
        assert_eq!(word.check(b"bar"), Verdict::NeedMore);
        assert_eq!(word.check(b"foo"), Verdict::Match);
    }

    #[test]
    fn refuses_invalid_and_catch_all_regexes() {
        let message = MessageRegex::new("a(").unwrap_err().to_string();
        assert!(message.starts_with("not a valid regex: "), "{message}");
        assert!(message.contains("unclosed group"), "{message}");
        for everything in ["", "x*", "(a|)", "[a-z]*?"] {
            assert_eq!(
                MessageRegex::new(everything).unwrap_err(),
                RegexError::MatchesEverything,
                "{everything}"
            );
        }
        // Empty matches tied to a position are routes, not catch-alls.
        for positional in [r"^$", r"(?m)^$", r"\b"] {
            assert!(MessageRegex::new(positional).is_ok(), "{positional}");
        }
    }

    #[test]
    fn equal_when_written_the_same() {
        assert_eq!(regex("^a"), regex("^a"));
        assert_ne!(regex("^a"), regex("^(a)"));
        assert_eq!(format!("{:?}", regex("^a")), r#"MessageRegex("^a")"#);
    }
}
