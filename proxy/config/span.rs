//! Where in routes.toml a byte offset is: its line, and the route and key whose text
//! holds it.
//!
//! A file of its own, apart from the schema and the checks because it reads the spanned TOML document
//! rather than what serde made of it: a syntax or schema error comes with a byte offset
//! only, and is placed here even when the file could not be read as routes.

use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use super::error::{ConfigError, Invalid, Place, Problem, RouteLabel};

/// The text being parsed and the file it came from, for errors.
pub(super) struct Source<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a Path,
}

impl Source<'_> {
    pub(super) fn invalid(
        &self,
        span: Range<usize>,
        place: Place,
        problem: Problem,
    ) -> ConfigError {
        let line = line_at(self.text, span.start);
        ConfigError::Invalid(Box::new(Invalid {
            file: self.file.to_owned(),
            line,
            place,
            problem,
        }))
    }

    /// A toml or serde error, placed by its span.
    pub(super) fn toml_error(
        &self,
        error: &toml::de::Error,
        document: &Spanned<DeTable<'_>>,
        problem: fn(String) -> Problem,
    ) -> ConfigError {
        let span = error.span().unwrap_or(0..0);
        let mut place = place_of(self.text, document.get_ref(), span.start);
        // toml names a duplicate key only by its span.
        if place.key.is_none() && error.message() == "duplicate key" {
            place.key = self.text.get(span.clone()).map(str::to_owned);
        }
        self.invalid(span, place, problem(error.message().to_owned()))
    }
}

/// The 1-based line that byte `offset` of `text` is on.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    before.iter().filter(|&&byte| byte == b'\n').count() + 1
}

/// The route and key whose text holds byte `offset` of `text`, as far as its parsed
/// `document` tells (after a syntax error it is what toml could recover). A syntax error
/// may lie just past the value toml recovered, so a key also holds the rest of its line.
fn place_of(text: &str, document: &DeTable<'_>, offset: usize) -> Place {
    let holds = |key: &Spanned<DeString<'_>>, value: &Spanned<DeValue<'_>>| {
        let rest_of_key_line = text.get(key.span().start..offset);
        covers(&key.span(), offset)
            || covers(&value.span(), offset)
            || rest_of_key_line.is_some_and(|rest| !rest.contains('\n'))
    };
    let routes = match document.get("route").map(Spanned::get_ref) {
        Some(DeValue::Array(routes)) => &routes[..],
        _ => &[],
    };

    // The span of a `[[route]]` element is its header, so the route whose header last
    // precedes the offset is the one around it.
    let mut enclosing_route = None;
    for (index, route) in routes.iter().enumerate() {
        let label = route_label(route, index + 1);
        if let DeValue::Table(table) = route.get_ref()
            && let Some((key, _)) = table.iter().find(|(key, value)| holds(key, value))
        {
            return Place::route_key(label, key.get_ref());
        }
        if route.span().start <= offset {
            enclosing_route = Some(label);
        }
    }
    let top_level_key = |wanted: fn(&str) -> bool| {
        document
            .iter()
            .find(|(key, value)| wanted(key.get_ref()) && holds(key, value))
            .map(|(key, _)| Place::key(key.get_ref()))
    };
    top_level_key(|key| key != "route")
        .or_else(|| enclosing_route.map(Place::route))
        // Reached when `route` is there but not an array of tables.
        .or_else(|| top_level_key(|key| key == "route"))
        .unwrap_or_default()
}

/// A route by its name if it has a usable one, else by its position.
fn route_label(route: &Spanned<DeValue<'_>>, number: usize) -> RouteLabel {
    match route.get_ref().get("name").map(Spanned::get_ref) {
        Some(DeValue::String(name)) if !name.is_empty() => RouteLabel::Named(name.to_string()),
        _ => RouteLabel::Numbered(number),
    }
}

/// Whether `span` holds `offset`; an empty span holds its start, where toml reports
/// errors at the end of the input.
fn covers(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::assert_refused;

    #[test]
    fn refuses_toml_syntax_errors() {
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                "prefix = GET",
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "web": key "prefix": "#,
            "TOML syntax: ",
        );
        assert_refused(
            &[r#"connect_timeout = "2s""#, "[[route]", r#"name = "web""#],
            2,
            "",
            "TOML syntax: ",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web"#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            2,
            r#"route "web": key "name": "#,
            "TOML syntax: ",
        );
        assert_refused(
            &["[[route]]", r#"name = "web""#, r#"name = "api""#],
            3,
            r#"route "web": key "name": "#,
            "TOML syntax: duplicate key",
        );
    }

    #[test]
    fn refuses_a_route_without_a_name() {
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
                "[[route]]",
                r#"prefix = "PUT ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            5,
            "route #2: ",
            "missing field `name`",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            1,
            "route #1: ",
            "missing field `name`",
        );
        assert_refused(
            &["[[route]]", r#"name = """#],
            2,
            r#"route #1: key "name": "#,
            "cannot be empty",
        );
    }
}
