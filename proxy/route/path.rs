//! The request path as `http_path_prefix` compares it: normalized the way RFC 3986
//! (section 6.2.2) and nginx's `location` read a path, so that the spellings of one path
//! that a backend serves alike (`/%61dmin/`, `//admin/`, `/./admin/`, `/api/../admin/`)
//! are routed alike. Only the comparison uses it: the bytes sent on are the client's.

use std::borrow::Cow;
use std::fmt;

/// How `http_path_prefix` reads a request's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathForm {
    /// After [`normalize`]: what the backend most likely serves.
    #[default]
    Normalized,
    /// Byte for byte as sent.
    AsSent,
}

/// `path` (query included, as [`Request::path`](super::http::Request::path) holds it)
/// normalized as RFC 3986 section 6 and HAProxy's `normalize-uri` do, in this order:
///
/// 1. Percent-encoded unreserved characters (letters, digits, `-`, `.`, `_`, `~`) are
///    decoded, and the hex digits of the other escapes put in upper case (`%2f` is
///    `%2F`). Other escapes stay escaped: `%2F` is data, not a separator, to RFC 3986.
///    A `%` not followed by two hex digits is a percent sign as data, `%25`: left bare,
///    it could make an escape with the digits a decoded escape puts after it (`%%62`
///    would be `%b`), and a second normalization would read it differently.
/// 2. In the path (not the query), repeated slashes are merged, as nginx's
///    `merge_slashes` does (so `/a//../b` is `/b`, as nginx reads it).
/// 3. Dot segments are resolved (RFC 3986 section 5.2.4): `.` goes, `..` takes the
///    segment before it, never above the root; a path that ends in one ends in `/`.
///
/// A path that does not start with `/` (the asterisk and authority forms have none) only
/// gets step 1. Linear in the path's length, and at most three times as long (only a
/// bare `%` grows); borrowed when nothing changes, which is the usual case.
pub fn normalize(path: &str) -> Cow<'_, str> {
    let (path_part, query) = match path.find('?') {
        Some(at) => path.split_at(at),
        None => (path, ""),
    };
    let dot_or_slash = path_part.contains("//") || path_part.contains("/.");
    if !dot_or_slash && !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let decoded = normalize_escapes(path_part);
    let mut normalized = if decoded.starts_with('/') {
        resolve_segments(&decoded)
    } else {
        decoded
    };
    normalized.push_str(&normalize_escapes(query));
    if normalized == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normalized)
    }
}

/// Step 1 of [`normalize`].
fn normalize_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        let (before, escape) = rest.split_at(at);
        out.push_str(before);
        match escape.as_bytes() {
            [_, high, low, ..] if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() => {
                let byte = hex_value(*high) << 4 | hex_value(*low);
                if is_unreserved(byte) {
                    out.push(char::from(byte));
                } else {
                    out.push('%');
                    out.push(char::from(high.to_ascii_uppercase()));
                    out.push(char::from(low.to_ascii_uppercase()));
                }
                // Three ASCII bytes: the rest starts on a character boundary.
                rest = escape.get(3..).unwrap_or_default();
            }
            _ => {
                out.push_str("%25");
                rest = escape.get(1..).unwrap_or_default();
            }
        }
    }
    out.push_str(rest);
    out
}

/// Steps 2 and 3 of [`normalize`], on a path that starts with `/`.
fn resolve_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    // A path whose last segment is empty or a dot segment names a directory.
    let mut ends_in_slash = false;
    for segment in path.split('/').skip(1) {
        ends_in_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            name => kept.push(name),
        }
    }
    let mut resolved = String::with_capacity(path.len());
    for segment in &kept {
        resolved.push('/');
        resolved.push_str(segment);
    }
    if ends_in_slash || kept.is_empty() {
        resolved.push('/');
    }
    resolved
}

/// RFC 3986's unreserved characters: what an escape may be decoded to without changing
/// what the URI means.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)
}

/// The value of an ASCII hex digit (0 for anything else, which callers rule out).
fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// As the `--check` output and the docs name the setting.
impl fmt::Display for PathForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathForm::Normalized => "normalized",
            PathForm::AsSent => "as sent",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_admin_are_admin() {
        for path in [
            "/admin/",
            "/%61dmin/",
            "/%61%64%6D%69%6e/",
            "//admin/",
            "///admin//",
            "/./admin/",
            "/api/../admin/",
            "/api/%2e%2E/admin/",
            "/../admin/",
            "/admin/x/..",
            "/admin/.",
            "/a//../admin/",
        ] {
            assert_eq!(normalize(path), "/admin/", "{path}");
        }
    }

    #[test]
    fn rfc_3986_dot_segments() {
        // RFC 3986 section 5.2.4's examples, and the edges of the root.
        for (path, normalized) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/", "/"),
            ("/.", "/"),
            ("/..", "/"),
            ("/../..", "/"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/...", "/a/..."),
            ("/a/.b", "/a/.b"),
            ("/.well-known/acme", "/.well-known/acme"),
            ("/a/b.", "/a/b."),
        ] {
            assert_eq!(normalize(path), normalized, "{path}");
        }
    }

    #[test]
    fn escapes() {
        for (path, normalized) in [
            // Reserved and other characters stay escaped, in upper case.
            ("/a%2fb", "/a%2Fb"),
            ("/a%2F..%2Fb", "/a%2F..%2Fb"),
            ("/%25%36%31", "/%2561"),
            ("/%e2%82%ac", "/%E2%82%AC"),
            ("/%7e%5F%2D%2e", "/~_-."),
            // Not escapes: percent signs.
            ("/%", "/%25"),
            ("/%4", "/%254"),
            ("/%zz/%4g", "/%25zz/%254g"),
            // Found by fuzzing: a bare % and a decoded digit must not make an escape.
            ("/a%a%62", "/a%25ab"),
            ("/%%36%31", "/%2561"),
            ("/é%41", "/éA"),
        ] {
            assert_eq!(normalize(path), normalized, "{path}");
        }
    }

    #[test]
    fn the_query_is_decoded_but_not_resolved() {
        for (path, normalized) in [
            ("/a/../b?x=/../y", "/b?x=/../y"),
            ("//a?%71=1", "/a?q=1"),
            ("/a?b//c", "/a?b//c"),
            ("?q", "?q"),
            ("", ""),
            ("*", "*"),
        ] {
            assert_eq!(normalize(path), normalized, "{path}");
        }
    }

    #[test]
    fn borrows_what_is_already_normal() {
        for path in ["/", "/api/v1?x=1", "/a/.b/c", "/a%2Fb"] {
            assert!(matches!(normalize(path), Cow::Borrowed(_)), "{path}");
        }
    }

    #[test]
    fn idempotent_and_bounded_on_garbage() {
        // xorshift over an alphabet that makes escapes, dots and slashes likely.
        const ALPHABET: &[u8] = b"/.%2eEfF6a?%";
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            let path: String = (0..len)
                .map(|i| {
                    let pick = (state >> (i * 2 % 60)) as usize % ALPHABET.len();
                    char::from(ALPHABET[pick])
                })
                .collect();
            let once = normalize(&path);
            assert!(once.len() <= 3 * path.len().max(1), "{path:?} -> {once:?}");
            assert_eq!(normalize(&once), once, "{path:?}");
            if path.starts_with('/') {
                let path_part = once.split('?').next().unwrap_or_default();
                assert!(!path_part.contains("//"), "{path:?} -> {once:?}");
                assert!(!path_part.contains("/./"), "{path:?} -> {once:?}");
                assert!(!path_part.contains("/../"), "{path:?} -> {once:?}");
            }
        }
    }
}
