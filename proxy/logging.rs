//! How log lines are written: in colour only for a person at a terminal, and as JSON
//! that carries no character a reader could take for a line break or a terminal control.
//! The binary and the examples share it, so that they decide alike.

use std::borrow::Cow;
use std::io::{self, IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Whether lines written to `stream` should be coloured: only when it is a terminal (a
/// file, a pipe or journald would keep the escape codes in every line), and unless
/// NO_COLOR is set and not empty.
pub fn colors_wanted(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Makes writers for JSON log lines that escape, as `\u` and four hex digits, the
/// characters serde_json leaves raw inside strings though they are not harmless: the C1
/// controls U+0080 to U+009F (U+009B is a terminal's CSI, as `ESC [` is) and U+2028 and
/// U+2029, which JavaScript and some log viewers take for line breaks. Values from clients (a Host
/// header, a path) reach the log at debug level, so a client could otherwise split a
/// line or drive the terminal of whoever reads it. The text format escapes them already
/// (`\u{9b}`). A JSON reader gets the same strings either way.
#[derive(Debug, Clone, Copy)]
pub struct JsonEscaped<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for JsonEscaped<M> {
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter(self.0.make_writer())
    }
}

/// See [`JsonEscaped`].
#[derive(Debug)]
pub struct EscapingWriter<W>(W);

impl<W: Write> Write for EscapingWriter<W> {
    /// tracing-subscriber formats a whole line and writes it with one `write_all`, so a
    /// character never arrives split across two writes.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.write_all(&escape_line_breaks_and_controls(bytes))?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `json` (UTF-8, as serde_json writes it) with every C1 control, U+2028 and U+2029 as
/// a `\u` escape with four hex digits (`\u2028`). Those characters only occur inside
/// JSON strings, where the escape means the same character, so the result is the same
/// JSON value. Borrowed when there is nothing to escape.
fn escape_line_breaks_and_controls(json: &[u8]) -> Cow<'_, [u8]> {
    // In UTF-8, C1 controls are C2 80..=9F, and U+2028/9 are E2 80 A8/A9.
    let escaped = |rest: &[u8]| -> Option<(u32, usize)> {
        match rest {
            [0xc2, low @ 0x80..=0x9f, ..] => Some((u32::from(*low), 2)),
            [0xe2, 0x80, low @ (0xa8 | 0xa9), ..] => Some((0x2000 | u32::from(*low & 0x3f), 3)),
            _ => None,
        }
    };
    let Some(first) = (0..json.len()).find(|&at| escaped(&json[at..]).is_some()) else {
        return Cow::Borrowed(json);
    };
    let mut out = Vec::with_capacity(json.len() + 16);
    out.extend_from_slice(&json[..first]);
    let mut at = first;
    while at < json.len() {
        match escaped(&json[at..]) {
            Some((code_point, len)) => {
                out.extend_from_slice(format!("\\u{code_point:04x}").as_bytes());
                at += len;
            }
            None => {
                out.push(json[at]);
                at += 1;
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(text: &str) -> String {
        String::from_utf8(escape_line_breaks_and_controls(text.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn escapes_c1_controls_and_unicode_line_breaks() {
        assert_eq!(
            escaped("{\"host\":\"a\u{9b}31mb\u{2028}c\u{2029}d\u{80}\u{9f}\"}"),
            r#"{"host":"a\u009b31mb\u2028c\u2029d\u0080\u009f"}"#
        );
        // Their neighbours in UTF-8 stay as they are.
        for kept in [
            "\u{7f}",
            "\u{a0}",
            "é",
            "\u{2027}",
            "\u{202a}",
            "€",
            "\u{10ffff}",
        ] {
            let json = format!("{{\"a\":\"{kept}\"}}");
            assert_eq!(escaped(&json), json, "{kept:?}");
        }
        assert!(matches!(
            escape_line_breaks_and_controls(br#"{"a":"b"}"#),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn the_value_read_back_is_the_one_written() {
        let value = "x\u{85}y\u{2028}\u{9b}[2J\\\u{2029}\"";
        let json = serde_json::to_string(&serde_json::json!({ "host": value })).unwrap();
        let line = escaped(&json);
        assert!(line.is_ascii(), "{line}");
        let read: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(read["host"], value);
    }

    #[test]
    fn the_writer_escapes_what_it_is_given() {
        let mut written = Vec::new();
        let mut writer = EscapingWriter(&mut written);
        writer.write_all("\"\u{9b}\"\n".as_bytes()).unwrap();
        writer.flush().unwrap();
        assert_eq!(written, b"\"\\u009b\"\n");
    }
}
