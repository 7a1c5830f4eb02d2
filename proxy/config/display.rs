//! A [`Config`] as `splice-proxy --check` prints it, one line per route.
//!
//! A file of its own, apart from the types because it is the one place that writes them back in words:
//! an operator reads it to see what the proxy will do with the file it was given.

use std::fmt;

use crate::route::Matcher;

use super::{Config, DEFAULT_SPLICE_BACKLOG_MAX, DEFAULT_SPLICE_BACKLOG_TOTAL, RouteConfig};

/// What `splice-proxy --check` prints: the timeouts, then one line per route in file
/// order, every line ending in a newline.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "first_message_timeout {}, first_message_max {} bytes, connect_timeout {}, {}",
            humantime::format_duration(self.first_message_timeout),
            self.first_message_max,
            humantime::format_duration(self.connect_timeout),
            self.health,
        )?;
        if let Some(max) = self.max_connections {
            writeln!(f, "max_connections {max}")?;
        }
        if self.splice_backlog_max != DEFAULT_SPLICE_BACKLOG_MAX {
            writeln!(f, "splice_backlog_max {} bytes", self.splice_backlog_max)?;
        }
        if self.splice_backlog_total != DEFAULT_SPLICE_BACKLOG_TOTAL {
            writeln!(
                f,
                "splice_backlog_total {} bytes",
                self.splice_backlog_total
            )?;
        }
        if let Some(idle) = self.idle_timeout {
            writeln!(f, "idle_timeout {}", humantime::format_duration(idle))?;
        }
        writeln!(f, "on_unparsed {}", self.on_unparsed)?;
        for route in &self.routes {
            writeln!(f, "{route}")?;
        }
        Ok(())
    }
}

/// `route "tag-600": at 20 = "600", length 290..=294 -> 127.0.0.1:5001, 127.0.0.1:5002
/// weight 3 (round-robin; health_interval 2s, health_fails 3)`
impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "route {:?}: ", self.name)?;
        let mut tests = Vec::with_capacity(self.matchers.len() + 1);
        if self.default {
            tests.push("default".to_owned());
        }
        tests.extend(self.matchers.iter().map(Matcher::to_string));
        f.write_str(&tests.join(", "))?;
        let backends: Vec<String> = self.backends.iter().map(|b| b.to_string()).collect();
        write!(
            f,
            " -> {} ({}; {}",
            backends.join(", "),
            self.balance,
            self.health
        )?;
        match self.send_proxy {
            Some(version) => write!(f, "; send_proxy {version})"),
            None => f.write_str(")"),
        }?;
        if let Some(max) = self.max_connections {
            write!(f, ", max_connections {max}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

    #[test]
    fn describes_itself_for_check() {
        let config = parse(&[
            "first_message_max = 512",
            "max_connections = 1000",
            r#"idle_timeout = "10m""#,
            "[[route]]",
            r#"name = "tag-600""#,
            "at = 20",
            r#"bytes = "600""#,
            "min_length = 290",
            "max_length = 294",
            "max_connections = 10",
            r#"backends = ["127.0.0.1:5001"]"#,
            "[[route]]",
            r#"name = "tls""#,
            r#"prefix = "\u0016\u0003\"""#,
            r#"backends = ["127.0.0.1:9001", "127.0.0.1:9002"]"#,
            "[[route]]",
            r#"name = "fallback""#,
            "default = true",
            r#"backends = ["127.0.0.1:9009"]"#,
        ])
        .unwrap();
        assert_eq!(
            config.to_string(),
            [
                "first_message_timeout 3s, first_message_max 512 bytes, connect_timeout 2s, health off",
                "max_connections 1000",
                "idle_timeout 10m",
                "on_unparsed default",
                r#"route "tag-600": at 20 = "600", length 290..=294 -> 127.0.0.1:5001 (round-robin; health off), max_connections 10"#,
                r#"route "tls": prefix "\x16\x03\"" -> 127.0.0.1:9001, 127.0.0.1:9002 (round-robin; health off)"#,
                r#"route "fallback": default -> 127.0.0.1:9009 (round-robin; health off)"#,
                "",
            ]
            .join("\n")
        );
    }
}
