//! A route's matcher keys (prefix, at + bytes, min_length/max_length, sni, alpn,
//! http_host, http_path_prefix, regex), checked and turned into [`Matcher`]s.
//!
//! A file of its own, apart from the other route checks (validate.rs) because each kind of matcher has its
//! own parse (host patterns, ALPN names, path normalization, regexes) and its own ways
//! of never matching, and together they outweigh the rest of a route.

use std::ops::Range;

use toml::Spanned;

use crate::route::path::normalize;
use crate::route::{HostPattern, Matcher, MessageRegex, PathForm};

use super::error::{ConfigError, Problem};
use super::raw::RawRoute;
use super::validate::RouteCheck;

/// A matcher with the key that gave it, so a default route can be told which key to drop.
pub(super) struct FoundMatcher {
    pub(super) matcher: Matcher,
    pub(super) key: &'static str,
    pub(super) span: Range<usize>,
}

impl RouteCheck<'_> {
    pub(super) fn matchers(&self, raw: &RawRoute) -> Result<Vec<FoundMatcher>, ConfigError> {
        let mut found = Vec::new();
        if let Some(prefix) = &raw.prefix {
            let bytes = self.nonempty_bytes(prefix, "prefix")?;
            self.within_first_message_max(bytes.len(), prefix.span(), "prefix")?;
            found.push(FoundMatcher {
                matcher: Matcher::Prefix(bytes),
                key: "prefix",
                span: prefix.span(),
            });
        }

        match (&raw.at, &raw.bytes) {
            (Some(at), Some(bytes)) => {
                let offset = self.integer_in(at, "at", 0, self.first_message_max)?;
                let bytes = self.nonempty_bytes(bytes, "bytes")?;
                self.within_first_message_max(offset.saturating_add(bytes.len()), at.span(), "at")?;
                found.push(FoundMatcher {
                    matcher: Matcher::At { offset, bytes },
                    key: "at",
                    span: at.span(),
                });
            }
            (Some(at), None) => return Err(self.fail(at.span(), "at", Problem::AtWithoutBytes)),
            (None, Some(bytes)) => {
                return Err(self.fail(bytes.span(), "bytes", Problem::BytesWithoutAt));
            }
            (None, None) => {}
        }

        found.extend(self.length(raw)?);
        found.extend(self.protocol_matchers(raw)?);
        Ok(found)
    }

    fn length(&self, raw: &RawRoute) -> Result<Option<FoundMatcher>, ConfigError> {
        let min = (raw.min_length.as_ref())
            .map(|min| self.integer_in(min, "min_length", 0, self.first_message_max))
            .transpose()?;
        let max = (raw.max_length.as_ref())
            .map(|max| self.integer_in(max, "max_length", 1, self.first_message_max))
            .transpose()?;
        let (key, given) = match (&raw.min_length, &raw.max_length) {
            (Some(min_length), _) => ("min_length", min_length),
            (None, Some(max_length)) => ("max_length", max_length),
            (None, None) => return Ok(None),
        };
        if let (Some(min), Some(max)) = (min, max)
            && min > max
        {
            return Err(self.fail(given.span(), key, Problem::MinAboveMax { min, max }));
        }
        Ok(Some(FoundMatcher {
            matcher: Matcher::Length {
                min: min.unwrap_or(0),
                max: max.unwrap_or(usize::MAX),
            },
            key,
            span: given.span(),
        }))
    }

    /// sni, alpn, http_host, http_path_prefix and regex, in that order: after the byte
    /// matchers, which are cheaper and so tried first.
    fn protocol_matchers(&self, raw: &RawRoute) -> Result<Vec<FoundMatcher>, ConfigError> {
        let mut found = Vec::new();
        let mut push = |matcher, key, span| found.push(FoundMatcher { matcher, key, span });
        if let Some(sni) = &raw.sni {
            push(
                Matcher::Sni(self.host_pattern(sni, "sni")?),
                "sni",
                sni.span(),
            );
        }
        if let Some(alpn) = &raw.alpn {
            push(Matcher::Alpn(self.alpn(alpn)?), "alpn", alpn.span());
        }
        if let Some(host) = &raw.http_host {
            let pattern = self.host_pattern(host, "http_host")?;
            push(Matcher::HttpHost(pattern), "http_host", host.span());
        }
        if let Some(prefix) = &raw.http_path_prefix {
            let text = prefix.get_ref();
            if !text.starts_with('/') || text.contains(|c: char| c == ' ' || c.is_control()) {
                let problem = Problem::NotAPathPrefix { text: text.clone() };
                return Err(self.fail(prefix.span(), "http_path_prefix", problem));
            }
            if self.path_form == PathForm::Normalized {
                let normalized = normalize(text);
                if normalized != text.as_str() {
                    let problem = Problem::PathPrefixNotNormalized {
                        text: text.clone(),
                        normalized: normalized.into_owned(),
                    };
                    return Err(self.fail(prefix.span(), "http_path_prefix", problem));
                }
            }
            let matcher = Matcher::HttpPathPrefix {
                prefix: text.clone(),
                form: self.path_form,
            };
            push(matcher, "http_path_prefix", prefix.span());
        }
        if let Some(regex) = &raw.regex {
            let compiled = MessageRegex::new(regex.get_ref())
                .map_err(|error| self.fail(regex.span(), "regex", Problem::Regex(error)))?;
            push(Matcher::Regex(compiled), "regex", regex.span());
        }

        let tls_key = found
            .iter()
            .map(|m| m.key)
            .find(|k| ["sni", "alpn"].contains(k));
        let http = (found.iter()).find(|m| ["http_host", "http_path_prefix"].contains(&m.key));
        if let (Some(tls), Some(http)) = (tls_key, http) {
            let problem = Problem::TlsAndHttp {
                tls,
                http: http.key,
            };
            return Err(self.fail(http.span.clone(), http.key, problem));
        }
        Ok(found)
    }

    fn host_pattern(&self, text: &Spanned<String>, key: &str) -> Result<HostPattern, ConfigError> {
        HostPattern::parse(text.get_ref()).map_err(|reason| {
            let text_value = text.get_ref().clone();
            let problem = Problem::NotAHostPattern {
                text: text_value,
                reason,
            };
            self.fail(text.span(), key, problem)
        })
    }

    fn alpn(&self, list: &Spanned<Vec<Spanned<String>>>) -> Result<Vec<Vec<u8>>, ConfigError> {
        if list.get_ref().is_empty() {
            return Err(self.fail(list.span(), "alpn", Problem::EmptyAlpn));
        }
        (list.get_ref().iter())
            .map(|name| {
                let bytes = name.get_ref().as_bytes();
                if (1..=255).contains(&bytes.len()) {
                    Ok(bytes.to_vec())
                } else {
                    let text = name.get_ref().clone();
                    Err(self.fail(name.span(), "alpn", Problem::NotAnAlpnName { text }))
                }
            })
            .collect()
    }

    fn nonempty_bytes(&self, text: &Spanned<String>, key: &str) -> Result<Vec<u8>, ConfigError> {
        if text.get_ref().is_empty() {
            return Err(self.fail(text.span(), key, Problem::EmptyBytes));
        }
        Ok(text.get_ref().as_bytes().to_vec())
    }

    /// A matcher that needs more bytes than are ever read could never match.
    fn within_first_message_max(
        &self,
        needed: usize,
        span: Range<usize>,
        key: &str,
    ) -> Result<(), ConfigError> {
        if needed > self.first_message_max {
            let problem = Problem::BeyondFirstMessageMax {
                needed,
                max: self.first_message_max,
            };
            return Err(self.fail(span, key, problem));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_refused, parse};
    use crate::route::{Matcher, PathForm};

    #[test]
    fn length_alone() {
        let route = |length: &str| {
            parse(&[
                "[[route]]",
                r#"name = "short""#,
                length,
                r#"backends = ["127.0.0.1:9001"]"#,
            ])
            .unwrap()
            .routes
            .remove(0)
            .matchers
        };
        assert_eq!(
            route("min_length = 3"),
            [Matcher::Length {
                min: 3,
                max: usize::MAX
            }]
        );
        assert_eq!(
            route("max_length = 3"),
            [Matcher::Length { min: 0, max: 3 }]
        );
    }

    #[test]
    fn refuses_a_default_route_with_matchers() {
        assert_refused(
            &[
                "[[route]]",
                r#"name = "fallback""#,
                "default = true",
                "min_length = 4",
                r#"backends = ["127.0.0.1:9009"]"#,
            ],
            4,
            r#"route "fallback": key "min_length": "#,
            "a default route takes what no other route matched",
        );
    }

    #[test]
    fn refuses_at_and_bytes_apart() {
        let route = |matcher: &'static str| {
            [
                "[[route]]",
                r#"name = "tag""#,
                matcher,
                r#"backends = ["127.0.0.1:9001"]"#,
            ]
        };
        assert_refused(
            &route("at = 20"),
            3,
            r#"route "tag": key "at": "#,
            r#""at" needs "bytes""#,
        );
        assert_refused(
            &route(r#"bytes = "600""#),
            3,
            r#"route "tag": key "bytes": "#,
            r#""bytes" needs "at""#,
        );
    }

    #[test]
    fn refuses_empty_prefix_and_bytes() {
        let route = |matcher: &'static str| {
            [
                "[[route]]",
                r#"name = "web""#,
                matcher,
                r#"backends = ["127.0.0.1:9001"]"#,
            ]
        };
        assert_refused(
            &route(r#"prefix = """#),
            3,
            r#"route "web": key "prefix": "#,
            "empty string",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                "at = 2",
                r#"bytes = """#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            4,
            r#"route "web": key "bytes": "#,
            "empty string",
        );
    }

    #[test]
    fn refuses_matchers_that_could_never_match() {
        assert_refused(
            &[
                "first_message_max = 4",
                "[[route]]",
                r#"name = "hello""#,
                r#"prefix = "HELLO""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            4,
            r#"route "hello": key "prefix": "#,
            "needs the first 5 bytes of the message but first_message_max is 4",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "tag""#,
                "at = 16383",
                r#"bytes = "60""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "tag": key "at": "#,
            "needs the first 16385 bytes",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "tag""#,
                "at = -1",
                r#"bytes = "60""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "tag": key "at": "#,
            "-1 is out of range: must be 0..=16384",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "long""#,
                "min_length = 20000",
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "long": key "min_length": "#,
            "20000 is out of range: must be 0..=16384",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "none""#,
                "max_length = 0",
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "none": key "max_length": "#,
            "0 is out of range: must be 1..=16384",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "tag""#,
                "min_length = 294",
                "max_length = 290",
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "tag": key "min_length": "#,
            "min_length 294 is more than max_length 290",
        );
    }

    #[test]
    fn accepts_the_protocol_matchers() {
        let config = parse(&[
            "[[route]]",
            r#"name = "tls-a""#,
            r#"sni = "A.Example.com""#,
            r#"alpn = ["h2", "http/1.1"]"#,
            r#"backends = ["127.0.0.1:9001"]"#,
            "[[route]]",
            r#"name = "web""#,
            r#"http_host = "*.example.com""#,
            r#"http_path_prefix = "/api/""#,
            r#"backends = ["127.0.0.1:9002"]"#,
            "[[route]]",
            r#"name = "hello""#,
            r#"prefix = "HELLO ""#,
            r#"regex = '^HELLO v\d+\r\n'"#,
            r#"backends = ["127.0.0.1:9003"]"#,
        ])
        .unwrap();
        let matchers: Vec<Vec<String>> = (config.routes.iter())
            .map(|route| route.matchers.iter().map(Matcher::to_string).collect())
            .collect();
        assert_eq!(
            matchers,
            [
                vec![r#"sni "a.example.com""#, r#"alpn ["h2", "http/1.1"]"#],
                vec![
                    r#"http_host "*.example.com""#,
                    r#"http_path_prefix "/api/""#
                ],
                vec![r#"prefix "HELLO ""#, r"regex '^HELLO v\d+\r\n'"],
            ]
        );
        assert_eq!(
            config.to_string().lines().nth(2),
            Some(
                r#"route "tls-a": sni "a.example.com", alpn ["h2", "http/1.1"] -> 127.0.0.1:9001 (round-robin; health off)"#
            )
        );
    }

    /// A one-route file with `lines` between the name and the backends.
    fn route_with(lines: &[&str]) -> Vec<String> {
        let mut file = vec!["[[route]]".to_owned(), r#"name = "r""#.to_owned()];
        file.extend(lines.iter().map(|line| (*line).to_owned()));
        file.push(r#"backends = ["127.0.0.1:9001"]"#.to_owned());
        file
    }

    #[track_caller]
    fn assert_route_refused(lines: &[&str], line: usize, key: &str, says: &str) {
        let file = route_with(lines);
        let file: Vec<&str> = file.iter().map(String::as_str).collect();
        assert_refused(&file, line, &format!(r#"route "r": key "{key}": "#), says);
    }

    #[test]
    fn refuses_bad_host_patterns() {
        for key in ["sni", "http_host"] {
            for (pattern, says) in [
                ("", "a host name cannot be empty"),
                ("*", "a wildcard is only allowed as the whole first label"),
                ("a.*.com", "a wildcard is only allowed"),
                (
                    "a..com",
                    r#"label "" is empty or longer than 63 characters"#,
                ),
                (
                    "a.example.com:443",
                    r#"label "com:443" has a character other than"#,
                ),
                ("-a.com", r#"label "-a" has a character"#),
            ] {
                let line = format!("{key} = {pattern:?}");
                assert_route_refused(
                    &[&line],
                    3,
                    key,
                    &format!("{pattern:?} is not a host name or \"*.\" and a host name: {says}"),
                );
            }
        }
    }

    #[test]
    fn refuses_bad_alpn_lists() {
        assert_route_refused(&["alpn = []"], 3, "alpn", "an empty list matches no client");
        assert_route_refused(
            &[r#"alpn = ["h2", ""]"#],
            3,
            "alpn",
            r#""" is not an ALPN protocol name: those are 1 to 255 bytes"#,
        );
        let long = format!("alpn = [{:?}]", "x".repeat(256));
        assert_route_refused(&[&long], 3, "alpn", "is not an ALPN protocol name");
        assert_route_refused(&[r#"alpn = "h2""#], 3, "alpn", "expected a sequence");
    }

    #[test]
    fn refuses_bad_path_prefixes() {
        for prefix in ["api", "", "*", "/a b", "/a\\n"] {
            let line = format!("http_path_prefix = \"{prefix}\"");
            assert_route_refused(
                &[&line],
                3,
                "http_path_prefix",
                r#"is not the start of a request path: it must start with "/""#,
            );
        }
    }

    #[test]
    fn refuses_bad_regexes() {
        let file = route_with(&["regex = 'a('"]);
        let file: Vec<&str> = file.iter().map(String::as_str).collect();
        let message = parse(&file).unwrap_err().to_string();
        assert!(
            message.starts_with(r#"routes.toml:3: route "r": key "regex": not a valid regex: "#),
            "{message}"
        );
        // The regex crate's own words, which point at the spot.
        assert!(message.contains("unclosed group"), "{message}");
        assert_route_refused(
            &["regex = 'x*'"],
            3,
            "regex",
            "matches every first message; for a catch-all route use default = true",
        );
    }

    #[test]
    fn refuses_tls_and_http_in_one_route() {
        assert_route_refused(
            &[r#"sni = "a.example.com""#, r#"http_path_prefix = "/""#],
            4,
            "http_path_prefix",
            r#"a first message cannot be both a TLS ClientHello ("sni") and an HTTP request ("http_path_prefix")"#,
        );
        assert_route_refused(
            &[r#"http_host = "a.example.com""#, r#"alpn = ["h2"]"#],
            3,
            "http_host",
            r#"("alpn") and an HTTP request ("http_host")"#,
        );
    }

    #[test]
    fn refuses_a_default_route_with_protocol_matchers() {
        for line in [
            r#"sni = "a.example.com""#,
            r#"alpn = ["h2"]"#,
            r#"http_host = "a.example.com""#,
            r#"http_path_prefix = "/""#,
            "regex = '^a'",
        ] {
            let key = line.split(' ').next().unwrap();
            assert_route_refused(
                &["default = true", line],
                4,
                key,
                "a default route takes what no other route matched",
            );
        }
    }

    #[test]
    fn path_prefixes_compare_normalized_paths_unless_told_not_to() {
        let route = [
            "[[route]]",
            r#"name = "deny""#,
            r#"http_path_prefix = "/admin/""#,
            r#"backends = ["127.0.0.1:9001"]"#,
        ];
        let normalized = parse(&route).unwrap();
        let matcher = &normalized.routes[0].matchers[0];
        let expected = Matcher::HttpPathPrefix {
            prefix: "/admin/".to_owned(),
            form: PathForm::Normalized,
        };
        assert_eq!(*matcher, expected);
        assert_eq!(matcher.to_string(), r#"http_path_prefix "/admin/""#);

        let as_sent = parse(&[&["http_path_normalize = false"][..], &route].concat()).unwrap();
        let matcher = &as_sent.routes[0].matchers[0];
        let expected = Matcher::HttpPathPrefix {
            prefix: "/admin/".to_owned(),
            form: PathForm::AsSent,
        };
        assert_eq!(*matcher, expected);
        assert_eq!(
            matcher.to_string(),
            r#"http_path_prefix "/admin/" (as sent)"#
        );
        // As sent, a prefix is compared as it is written, however it is written.
        let dotted = [
            "http_path_normalize = false",
            "[[route]]",
            r#"name = "deny""#,
            r#"http_path_prefix = "/a/../%61dmin/""#,
            r#"backends = ["127.0.0.1:9001"]"#,
        ];
        assert!(parse(&dotted).is_ok());
    }

    #[test]
    fn refuses_prefixes_no_normalized_path_can_start_with() {
        assert_refused(
            &[
                r#"http_path_normalize = "yes""#,
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            1,
            r#"key "http_path_normalize": "#,
            "invalid type",
        );
        for (prefix, normalized) in [
            ("/%61dmin/", "/admin/"),
            ("//admin/", "/admin/"),
            ("/api/../admin/", "/admin/"),
            ("/admin/.", "/admin/"),
            ("/a%2fb", "/a%2Fb"),
        ] {
            let lines = [
                "[[route]]",
                r#"name = "deny""#,
                &format!("http_path_prefix = {prefix:?}"),
                r#"backends = ["127.0.0.1:9001"]"#,
            ];
            assert_refused(
                &lines,
                3,
                r#"route "deny": key "http_path_prefix": "#,
                &format!("{prefix:?} can never match: paths are compared normalized"),
            );
            let message = parse(&lines).unwrap_err().to_string();
            assert!(
                message.contains(&format!("normalizes to {normalized:?}")),
                "{message}"
            );
        }
    }
}
