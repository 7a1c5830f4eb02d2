//! The file as serde sees it: the keys routes.toml may have, each value with its span.
//!
//! A file of its own, apart from the checks (validate.rs) because serde decides only the shape: an unknown
//! key, a missing one or a value of the wrong type is refused here, with serde's words;
//! whether a value that has the right type makes sense is decided after, where the span
//! still tells which line to blame.

use std::fmt;

use serde::Deserialize;
use toml::Spanned;

/// The file as serde sees it: every field spanned so that a value found wrong after
/// parsing can still be reported at its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) first_message_timeout: Option<Spanned<DurationText>>,
    pub(super) first_message_max: Option<Spanned<i64>>,
    pub(super) connect_timeout: Option<Spanned<DurationText>>,
    pub(super) health_interval: Option<Spanned<DurationText>>,
    pub(super) health_fails: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) idle_timeout: Option<Spanned<DurationText>>,
    pub(super) on_unparsed: Option<Spanned<String>>,
    pub(super) http_path_normalize: Option<Spanned<bool>>,
    pub(super) splice_backlog_max: Option<Spanned<i64>>,
    pub(super) splice_backlog_total: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Spanned<String>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) at: Option<Spanned<i64>>,
    pub(super) bytes: Option<Spanned<String>>,
    pub(super) min_length: Option<Spanned<i64>>,
    pub(super) max_length: Option<Spanned<i64>>,
    pub(super) sni: Option<Spanned<String>>,
    pub(super) alpn: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) http_host: Option<Spanned<String>>,
    pub(super) http_path_prefix: Option<Spanned<String>>,
    pub(super) regex: Option<Spanned<String>>,
    pub(super) default: Option<Spanned<bool>>,
    pub(super) backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    pub(super) balance: Option<Spanned<String>>,
    pub(super) health_interval: Option<Spanned<DurationText>>,
    pub(super) health_fails: Option<Spanned<i64>>,
    pub(super) send_proxy: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
}

/// One entry of `backends`: `"ip:port"` or `{ addr = "ip:port", weight = N }`.
pub(super) enum RawBackend {
    Addr(String),
    Table { addr: String, weight: Option<i64> },
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawBackend;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a backend: \"ip:port\" or { addr = \"ip:port\", weight = N }")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Addr(text.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawBackend, A::Error> {
                use serde::de::Error;
                const FIELDS: &[&str] = &["addr", "weight"];
                let (mut addr, mut weight) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "addr" if addr.is_none() => addr = Some(map.next_value::<String>()?),
                        "weight" if weight.is_none() => weight = Some(map.next_value::<i64>()?),
                        "addr" => return Err(A::Error::duplicate_field("addr")),
                        "weight" => return Err(A::Error::duplicate_field("weight")),
                        _ => return Err(A::Error::unknown_field(&key, FIELDS)),
                    }
                }
                let addr = addr.ok_or_else(|| A::Error::missing_field("addr"))?;
                Ok(RawBackend::Table { addr, weight })
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// A duration as written. A string type of its own so that `connect_timeout = 2` is
/// answered with what a duration looks like rather than just "expected a string".
pub(super) struct DurationText(pub(super) String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\", \"3s\" or \"1m\"")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DurationText, E> {
                Ok(DurationText(text.to_owned()))
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_refused, parse};

    #[test]
    fn refuses_unknown_keys() {
        assert_refused(
            &["first_mesage_max = 10", "[[route]]"],
            1,
            r#"key "first_mesage_max": "#,
            "unknown field `first_mesage_max`",
        );
        // The route's name is found even when the typo comes before it.
        assert_refused(
            &[
                "[[route]]",
                r#"prefx = "GET ""#,
                r#"name = "web""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            2,
            r#"route "web": key "prefx": "#,
            "unknown field `prefx`",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                "[route.matcher]",
                r#"prefix = "x""#,
            ],
            3,
            r#"route "web": key "matcher": "#,
            "unknown field `matcher`",
        );
    }

    #[test]
    fn refuses_wrong_types() {
        assert_refused(
            &[r#"first_message_max = "16k""#],
            1,
            r#"key "first_message_max": "#,
            "invalid type: string \"16k\"",
        );
        assert_refused(
            &["[[route]]", r#"name = "web""#, r#"default = "yes""#],
            3,
            r#"route "web": key "default": "#,
            "expected a boolean",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                r#"backends = "127.0.0.1:9001""#,
            ],
            3,
            r#"route "web": key "backends": "#,
            "expected a sequence",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                "backends = [",
                r#"  "127.0.0.1:9001","#,
                "  9002,",
                "]",
            ],
            5,
            r#"route "web": key "backends": "#,
            "invalid type: integer `9002`",
        );
        assert_refused(
            &["[[route]]", "name = 5"],
            2,
            r#"route #1: key "name": "#,
            "expected a string",
        );
        assert_refused(
            &["[route]", r#"name = "web""#],
            1,
            r#"key "route": "#,
            "expected a sequence",
        );
        assert_refused(
            &["connect_timeout = 2"],
            1,
            r#"key "connect_timeout": "#,
            r#"expected a duration string such as "250ms""#,
        );
    }

    #[test]
    fn backends_take_weights_in_either_form() {
        let config = parse(&[
            "[[route]]",
            r#"name = "web""#,
            r#"prefix = "GET ""#,
            r#"backends = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 3 },"#,
            r#"    { addr = "[::1]:9003" }, { weight = 1000, addr = "127.0.0.1:9004" }]"#,
        ])
        .unwrap();
        let weights: Vec<(u16, u32)> = (config.routes[0].backends.iter())
            .map(|b| (b.addr.port(), b.weight))
            .collect();
        assert_eq!(weights, [(9001, 1), (9002, 3), (9003, 1), (9004, 1000)]);
        assert!(
            config.to_string().contains(
                "127.0.0.1:9001, 127.0.0.1:9002 weight 3, [::1]:9003, 127.0.0.1:9004 weight 1000 (round-robin; health off)"
            ),
            "{config}"
        );
    }

    #[test]
    fn refuses_bad_weights_and_backend_tables() {
        let route = |backends: &'static str| {
            [
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001","#,
                backends,
            ]
        };
        for weight in ["0", "1001", "-1"] {
            let line = format!(r#"  {{ addr = "127.0.0.1:9002", weight = {weight} }}]"#);
            let mut lines = route("").to_vec();
            lines[4] = &line;
            assert_refused(
                &lines,
                5,
                r#"route "web": key "weight": "#,
                &format!("{weight} is out of range: must be 1..=1000"),
            );
        }
        assert_refused(
            &route(r#"  { addr = "127.0.0.1:9002", weight = "3" }]"#),
            5,
            r#"route "web": key "backends": "#,
            "invalid type: string \"3\", expected i64",
        );
        assert_refused(
            &route(r#"  { adr = "127.0.0.1:9002" }]"#),
            5,
            r#"route "web": key "backends": "#,
            "unknown field `adr`, expected `addr` or `weight`",
        );
        assert_refused(
            &route(r#"  { weight = 2 }]"#),
            5,
            r#"route "web": key "backends": "#,
            "missing field `addr`",
        );
        assert_refused(
            &route(r#"  { addr = "localhost:9002" }]"#),
            5,
            r#"route "web": key "backends": "#,
            "is not an address",
        );
        assert_refused(
            &route(r#"  { addr = "127.0.0.1:9001", weight = 2 }]"#),
            5,
            r#"route "web": key "backends": "#,
            "127.0.0.1:9001 is listed twice",
        );
        assert_refused(
            &route("  5]"),
            5,
            r#"route "web": key "backends": "#,
            "expected a backend",
        );
    }
}
