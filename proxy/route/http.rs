//! The head of an HTTP/1.x request: the path and the host it is for, read from the first
//! message with httparse (hyper's HTTP/1 parser).

use super::Parsed;

/// Headers read at most; a request with more is malformed here.
const MAX_HEADERS: usize = 100;

/// What routing reads from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method, e.g. `GET`.
    pub method: &'a str,
    /// The request target as sent.
    pub target: &'a str,
    /// The path of the target, query included, as sent (not decoded or normalised): the
    /// target itself in origin form (`/a/b?c`), the part after the authority in absolute
    /// form (`http://host/a/b?c`, `/` if there is none), and empty for the authority form
    /// of CONNECT and the asterisk form of `OPTIONS *`.
    pub path: &'a str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// The host the request is for, without port, user info or surrounding whitespace,
    /// case as sent: the authority of an absolute-form or authority-form target, which
    /// takes precedence as RFC 9112 section 3.2.2 says, else the Host header. `None` if
    /// the request names none.
    pub host: Option<&'a str>,
}

/// Reads the request head at the start of `first`, which may hold only part of it.
///
/// [`Parsed::Done`] once the whole head (request line and headers, up to the empty line)
/// has arrived; what follows is not read. [`Parsed::Other`] as soon as the bytes cannot
/// be the start of a request line; [`Parsed::Malformed`] when they start one (a method,
/// blanks, and a target starting with `/` or `scheme://`) but it is not a strict
/// HTTP/1.0 or 1.1 one, or the headers break the grammar, or name two hosts;
/// [`Parsed::Incomplete`] before any of that can be told. Once the answer is not
/// `Incomplete`, more bytes never change it. Never panics, whatever the bytes.
pub fn parse_request(first: &[u8]) -> Parsed<Request<'_>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let status = request.parse(first);
    let (method, target, version) = match (request.method, request.path, request.version) {
        (Some(method), Some(target), Some(version)) => (method, target, version),
        // httparse reads the request line from the start and fails at the first byte
        // that cannot continue a strict one. A line that never looked like a request is
        // another protocol that happens to start with a word ("SSH-2.0-...", "SET key
        // value"); one that did is HTTP that lenient servers still take (nginx reads
        // "GET  /admin/ HTTP/1.1" with two spaces, and HTTP/0.9's "GET /admin/"), so
        // it must not pass for "not HTTP" and slip past the HTTP routes.
        _ => {
            return match (status, request_line_start(first)) {
                (Ok(_), _) | (Err(_), LineStart::NotYet) => Parsed::Incomplete,
                (Err(_), LineStart::No) => Parsed::Other,
                (Err(error), LineStart::Yes) => Parsed::Malformed(describe(error)),
            };
        }
    };
    match status {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(error) => return Parsed::Malformed(describe(error)),
    }
    let (authority, path) = split_target(method, target);
    let host = match authority {
        Some(authority) => host_of_authority(authority),
        None => {
            let mut hosts = request
                .headers
                .iter()
                .filter(|header| header.name.eq_ignore_ascii_case("host"));
            match (hosts.next(), hosts.next()) {
                (Some(_), Some(_)) => return Parsed::Malformed("more than one Host header"),
                (Some(header), None) => match std::str::from_utf8(header.value) {
                    Ok(value) => host_of_authority(value),
                    Err(_) => return Parsed::Malformed("Host header is not UTF-8"),
                },
                (None, _) => None,
            }
        }
    };
    Parsed::Done(Request {
        method,
        target,
        path,
        version,
        host,
    })
}

/// How far the bytes go towards the start of a request line as the most lenient servers
/// read one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineStart {
    /// A method, one or more blanks, and a target that starts with `/` or `scheme://`.
    Yes,
    /// Something else.
    No,
    /// Agrees so far.
    NotYet,
}

/// Whether `first` starts like a request line, after the empty lines servers skip
/// before one: decided at the first byte that tells, so more bytes never change a `Yes`
/// or a `No`. `*` targets (`OPTIONS *`, HTTP/2's `PRI *` preface) are `No`: they carry
/// no path to route on.
fn request_line_start(first: &[u8]) -> LineStart {
    let start = first
        .iter()
        .position(|&byte| byte != b'\r' && byte != b'\n')
        .unwrap_or(first.len());
    let line = first.get(start..).unwrap_or_default();
    let method_len = line.iter().take_while(|&&byte| is_token(byte)).count();
    let blanks = line.get(method_len..).unwrap_or_default();
    let blanks_len = (blanks.iter())
        .take_while(|&&byte| byte == b' ' || byte == b'\t')
        .count();
    let target = blanks.get(blanks_len..).unwrap_or_default();
    match (method_len, blanks_len, target.first()) {
        (_, _, _) if method_len == line.len() => LineStart::NotYet,
        (0, _, _) | (_, 0, _) => LineStart::No,
        (_, _, None) => LineStart::NotYet,
        (_, _, Some(b'/')) => LineStart::Yes,
        (_, _, Some(_)) => absolute_form_start(target),
    }
}

/// Whether `target` starts `scheme://` (RFC 3986: a letter, then letters, digits, `+`,
/// `-` or `.`).
fn absolute_form_start(target: &[u8]) -> LineStart {
    let is_scheme = |byte: u8| byte.is_ascii_alphanumeric() || b"+-.".contains(&byte);
    if !target.first().is_some_and(u8::is_ascii_alphabetic) {
        return LineStart::No;
    }
    let scheme_len = target.iter().take_while(|&&byte| is_scheme(byte)).count();
    let after = target.get(scheme_len..).unwrap_or_default();
    let wanted = b"://";
    let compared = after.len().min(wanted.len());
    if after.get(..compared) != wanted.get(..compared) {
        LineStart::No
    } else if compared < wanted.len() {
        LineStart::NotYet
    } else {
        LineStart::Yes
    }
}

/// An RFC 9110 token character, what a method is made of.
fn is_token(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The authority (if the target has one) and the path of a request target.
fn split_target<'a>(method: &str, target: &'a str) -> (Option<&'a str>, &'a str) {
    if method == "CONNECT" {
        return (Some(target), "");
    }
    if target.starts_with('/') || target == "*" {
        return (None, if target == "*" { "" } else { target });
    }
    // Absolute form: scheme "://" authority path-abempty [ "?" query ].
    let Some((_scheme, rest)) = target.split_once("://") else {
        return (None, "");
    };
    match rest.find(['/', '?']) {
        Some(end) => (Some(&rest[..end]), &rest[end..]),
        None => (Some(rest), "/"),
    }
}

/// The host of `[userinfo@]host[:port]`, trimmed; `None` if nothing is left.
fn host_of_authority(authority: &str) -> Option<&str> {
    let authority = authority.trim_matches([' ', '\t']);
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, rest)| rest);
    let host = if host_port.starts_with('[') {
        // An IPv6 literal keeps its brackets; the port follows the "]".
        host_port
            .find(']')
            .map_or(host_port, |end| &host_port[..=end])
    } else {
        host_port
            .split_once(':')
            .map_or(host_port, |(host, _)| host)
    };
    (!host.is_empty()).then_some(host)
}

fn describe(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "invalid HTTP header name",
        httparse::Error::HeaderValue => "invalid HTTP header value",
        httparse::Error::NewLine => "invalid HTTP line ending",
        httparse::Error::Status => "invalid HTTP status",
        httparse::Error::Token => "invalid HTTP request line",
        httparse::Error::TooManyHeaders => "more than 100 HTTP headers",
        httparse::Error::Version => "not HTTP/1.0 or HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(first: &[u8]) -> Request<'_> {
        match parse_request(first) {
            Parsed::Done(request) => request,
            other => panic!("{:?}: {other:?}", first.escape_ascii().to_string()),
        }
    }

    fn host(first: &[u8]) -> Option<&str> {
        done(first).host
    }

    #[test]
    fn reads_method_path_version_and_host() {
        let request =
            done(b"GET /api/v1?x=1 HTTP/1.1\r\nHost: b.example.com\r\nAccept: */*\r\n\r\n");
        assert_eq!(
            request,
            Request {
                method: "GET",
                target: "/api/v1?x=1",
                path: "/api/v1?x=1",
                version: 1,
                host: Some("b.example.com"),
            }
        );
        // A body after the head is not read.
        let post = done(b"POST /upload HTTP/1.0\r\nhOsT:\tB.Example.COM:8080 \r\n\r\n\x00\x01\x02");
        assert_eq!((post.method, post.version), ("POST", 0));
        assert_eq!(post.host, Some("B.Example.COM"));
    }

    #[test]
    fn host_variants() {
        for (head, expected) in [
            (
                &b"GET / HTTP/1.1\r\nHost: b.example.com:443\r\n\r\n"[..],
                Some("b.example.com"),
            ),
            (b"GET / HTTP/1.1\r\nHOST: [::1]:8080\r\n\r\n", Some("[::1]")),
            (
                b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
                Some("127.0.0.1"),
            ),
            (b"GET / HTTP/1.0\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", None),
            // Absolute form: the target's authority wins over the Host header.
            (
                b"GET http://user:pw@a.example.com:8080/x HTTP/1.1\r\nHost: b.example.com\r\n\r\n",
                Some("a.example.com"),
            ),
            (
                b"CONNECT c.example.com:443 HTTP/1.1\r\n\r\n",
                Some("c.example.com"),
            ),
        ] {
            assert_eq!(host(head), expected, "{}", head.escape_ascii());
        }
    }

    #[test]
    fn paths_of_each_target_form() {
        for (head, path) in [
            (&b"GET /a/b?c HTTP/1.1\r\n\r\n"[..], "/a/b?c"),
            (b"GET http://h.example/a/b?c HTTP/1.1\r\n\r\n", "/a/b?c"),
            (b"GET https://h.example HTTP/1.1\r\n\r\n", "/"),
            (b"GET http://h.example?q HTTP/1.1\r\n\r\n", "?q"),
            (b"OPTIONS * HTTP/1.1\r\n\r\n", ""),
            (b"CONNECT h.example:443 HTTP/1.1\r\n\r\n", ""),
            (b"GET /%61pi HTTP/1.1\r\n\r\n", "/%61pi"),
        ] {
            assert_eq!(done(head).path, path, "{}", head.escape_ascii());
        }
    }

    #[test]
    fn split_across_reads() {
        let head = b"GET /api HTTP/1.1\r\nUser-Agent: curl\r\nHost: b.example.com\r\n\r\n";
        for len in 0..head.len() {
            assert_eq!(parse_request(&head[..len]), Parsed::Incomplete, "{len}");
        }
        assert_eq!(host(head), Some("b.example.com"));
        // A body that follows does not matter.
        let with_body = [&head[..], b"POST-like body bytes \x00\xff"].concat();
        assert_eq!(done(&with_body), done(head));
    }

    #[test]
    fn other_protocols() {
        for other in [
            &b"\x16\x03\x01\x02\x00\x01"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"PING\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"SET key value\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"OPTIONS  * HTTP/1.1\r\n",
            b"\x00",
            b"hello world\n",
            b"GET\r\n",
            b"GET  ftp:/x HTTP/1.1\r\n",
            b"GET  1http://x/ HTTP/1.1\r\n",
        ] {
            assert_eq!(
                parse_request(other),
                Parsed::Other,
                "{}",
                other.escape_ascii()
            );
        }
        for so_far in [
            &b""[..],
            b"G",
            b"GET",
            b"GET ",
            b"GET /a",
            b"GET /a HTTP/1.",
            b"\r\n",
            // httparse has refused these already, but whether they are HTTP a lenient
            // server would take, or another protocol, the next bytes tell.
            b"GET  ",
            b"GET\t",
            b"GET  http:/",
        ] {
            assert_eq!(
                parse_request(so_far),
                Parsed::Incomplete,
                "{}",
                so_far.escape_ascii()
            );
        }
    }

    #[test]
    fn malformed_heads() {
        for (head, reason) in [
            (
                &b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"[..],
                "more than one Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
                "invalid HTTP header name",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n",
                "invalid HTTP header value",
            ),
            (b"GET / HTTP/1.1\rX", "invalid HTTP line ending"),
            (
                b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
                "Host header is not UTF-8",
            ),
            (
                b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
                "invalid HTTP header name",
            ),
            (
                b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
                "invalid HTTP header name",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
                "invalid HTTP header value",
            ),
            // Request lines lenient servers take (nginx: several blanks, HTTP/0.9) and
            // httparse does not: HTTP all the same, and broken.
            (b"GET  /admin/ HTTP/1.1\r\n", "invalid HTTP request line"),
            (b"GET\t/admin/ HTTP/1.1\r\n", "invalid HTTP request line"),
            (
                b"GET \thttp://a.example/ HTTP/1.1\r\n",
                "invalid HTTP request line",
            ),
            (b"\r\nGET /\r\n", "invalid HTTP request line"),
            (b"GET / HTTP/2\r\n", "not HTTP/1.0 or HTTP/1.1"),
            (b"get /a\x01 HTTP/1.1\r\n", "invalid HTTP request line"),
        ] {
            assert_eq!(
                parse_request(head),
                Parsed::Malformed(reason),
                "{}",
                head.escape_ascii()
            );
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(
            parse_request(&many),
            Parsed::Malformed("more than 100 HTTP headers")
        );
    }
}
