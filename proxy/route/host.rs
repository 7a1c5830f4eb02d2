//! Host name patterns, as `sni` and `http_host` give them: an exact name or a wildcard
//! for its subdomains.

use std::fmt;

/// `a.example.com`, or `*.example.com` for every name that ends in `.example.com` with
/// one or more labels before it (`a.example.com`, `a.b.example.com`, but not
/// `example.com` itself: the way nginx reads `server_name *.example.com`, not the
/// one-label wildcard of certificates). Compared without regard to ASCII case, and a
/// trailing dot on either side is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// Lowercase, without the `*` and without a trailing dot.
    name: String,
    wildcard: bool,
}

/// Why a host pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPatternError {
    /// The pattern is empty.
    #[error("a host name cannot be empty")]
    Empty,
    /// Longer than 253 characters.
    #[error("longer than the 253 characters a host name can have")]
    TooLong,
    /// A `*` anywhere but as the whole first label.
    #[error("a wildcard is only allowed as the whole first label, as in \"*.example.com\"")]
    MisplacedWildcard,
    /// A label is empty or longer than 63 characters.
    #[error("label {label:?} is empty or longer than 63 characters")]
    BadLabelLength {
        /// The label, as written.
        label: String,
    },
    #[error(
        "label {label:?} has a character other than ASCII letters, digits, '-' and '_', \
         or starts or ends with '-' (write internationalised names in their xn-- form)"
    )]
    /// A label has a character a host name cannot have.
    BadLabel {
        /// The label, as written.
        label: String,
    },
}

impl HostPattern {
    /// Parses and validates a pattern; case does not matter.
    ///
    /// # Errors
    ///
    /// When it is not a host name (letters, digits, `-`, `_` in dot-separated labels of
    /// 1 to 63 characters, 253 at most) or a `*.` followed by one.
    pub fn parse(text: &str) -> Result<HostPattern, HostPatternError> {
        let (wildcard, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return Err(if wildcard {
                HostPatternError::MisplacedWildcard
            } else {
                HostPatternError::Empty
            });
        }
        if name.len() > 253 {
            return Err(HostPatternError::TooLong);
        }
        for label in name.split('.') {
            if label.contains('*') {
                return Err(HostPatternError::MisplacedWildcard);
            }
            if label.is_empty() || label.len() > 63 {
                let label = label.to_owned();
                return Err(HostPatternError::BadLabelLength { label });
            }
            let allowed = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
            if !label.bytes().all(allowed) || label.starts_with('-') || label.ends_with('-') {
                let label = label.to_owned();
                return Err(HostPatternError::BadLabel { label });
            }
        }
        Ok(HostPattern {
            name: name.to_ascii_lowercase(),
            wildcard,
        })
    }

    /// Whether the host name a client sent (no port) fits the pattern.
    pub fn matches(&self, host: &[u8]) -> bool {
        let host = host.strip_suffix(b".").unwrap_or(host);
        if !self.wildcard {
            return host.eq_ignore_ascii_case(self.name.as_bytes());
        }
        // At least one label, then a dot, then the name.
        host.len() > self.name.len() + 1 && {
            let (front, suffix) = host.split_at(host.len() - self.name.len());
            suffix.eq_ignore_ascii_case(self.name.as_bytes())
                && front.ends_with(b".")
                && !front.starts_with(b".")
                && !front.ends_with(b"..")
        }
    }
}

/// The pattern as it is matched: lowercase, `*.` kept, no trailing dot.
impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> HostPattern {
        HostPattern::parse(text).unwrap()
    }

    #[test]
    fn exact_names_match_regardless_of_case_and_trailing_dot() {
        let exact = pattern("A.Example.com");
        assert_eq!(exact.to_string(), "a.example.com");
        for host in ["a.example.com", "A.EXAMPLE.COM", "a.example.com."] {
            assert!(exact.matches(host.as_bytes()), "{host}");
        }
        for host in ["b.example.com", "x.a.example.com", "example.com", "", "."] {
            assert!(!exact.matches(host.as_bytes()), "{host}");
        }
        assert!(pattern("a.example.com.").matches(b"a.example.com"));
    }

    #[test]
    fn wildcards_match_one_or_more_labels() {
        let wildcard = pattern("*.Example.com");
        assert_eq!(wildcard.to_string(), "*.example.com");
        for host in [
            "a.example.com",
            "A.B.EXAMPLE.COM",
            "a.example.com.",
            "x-1.example.com",
        ] {
            assert!(wildcard.matches(host.as_bytes()), "{host}");
        }
        for host in [
            "example.com",
            ".example.com",
            "a..example.com",
            "aexample.com",
            "a.example.com.evil",
            "a.example.org",
            "",
        ] {
            assert!(!wildcard.matches(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_host_name() {
        use HostPatternError::*;
        let refused = |text: &str| HostPattern::parse(text).unwrap_err();
        assert_eq!(refused(""), Empty);
        assert_eq!(refused("."), Empty);
        assert_eq!(refused("*."), MisplacedWildcard);
        assert_eq!(refused("*"), MisplacedWildcard);
        assert_eq!(refused("a.*.com"), MisplacedWildcard);
        assert_eq!(refused("*a.example.com"), MisplacedWildcard);
        assert_eq!(refused("**.example.com"), MisplacedWildcard);
        assert_eq!(refused("a..com"), BadLabelLength { label: "".into() });
        assert_eq!(
            refused(&format!("{}.com", "a".repeat(64))),
            BadLabelLength {
                label: "a".repeat(64)
            }
        );
        assert_eq!(refused(&"a.".repeat(128)), TooLong);
        for bad in ["-a.com", "a-.com", "a b.com", "a:443", "ä.com", "a/b"] {
            assert!(matches!(refused(bad), BadLabel { .. }), "{bad}");
        }
        assert!(HostPattern::parse("under_score.example.com").is_ok());
        assert!(HostPattern::parse("xn--bcher-kva.example").is_ok());
        assert!(HostPattern::parse("127.0.0.1").is_ok());
    }
}
