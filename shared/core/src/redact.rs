//! Redaction of credentials in text that leaves the process: log lines, start-up hints and
//! error messages. Connection URLs carry their password in the user-info part
//! (`postgres://orbit:secret@db/orbit`); every such password is replaced by `***`, wherever in
//! the text the URL appears, so an error that quotes a URL is as safe as the URL itself.

use std::borrow::Cow;

/// What a password is replaced by.
pub const MASK: &str = "***";

/// `text` with the password of every `scheme://user:password@host` in it replaced by [`MASK`].
/// Borrowed when there is nothing to hide, which is almost always.
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut search_from = 0;
    while let Some(found) = text[search_from..].find("://") {
        let authority_start = search_from + found + 3;
        let authority_len = text[authority_start..]
            .find(|c: char| is_authority_end(c))
            .unwrap_or(text.len() - authority_start);
        let authority = &text[authority_start..authority_start + authority_len];
        search_from = authority_start + authority_len;
        // The user info ends at the last `@`: a password may itself contain one unescaped.
        let Some(at) = authority.rfind('@') else {
            continue;
        };
        let Some(colon) = authority[..at].find(':') else {
            continue;
        };
        let password_start = authority_start + colon + 1;
        let password_end = authority_start + at;
        if text[password_start..password_end] == *MASK {
            continue;
        }
        let buffer = out.get_or_insert_with(|| String::with_capacity(text.len()));
        buffer.push_str(&text[copied..password_start]);
        buffer.push_str(MASK);
        copied = password_end;
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut buffer) => {
            buffer.push_str(&text[copied..]);
            Cow::Owned(buffer)
        }
    }
}

/// Characters that cannot be part of a URL's authority, so the user info of a URL quoted in a
/// sentence, a JSON string or a Debug dump ends there.
fn is_authority_end(c: char) -> bool {
    matches!(
        c,
        '/' | '?' | '#' | '"' | '\'' | '`' | '\\' | '<' | '>' | ',' | ';'
    ) || c.is_whitespace()
        || c.is_control()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(
            redact("postgres://orbit:s3cret@db:5432/orbit"),
            "postgres://orbit:***@db:5432/orbit"
        );
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        // A password with an unescaped `@` and no path after the host.
        assert_eq!(redact("amqp://u:p@ss@host"), "amqp://u:***@host");
    }

    #[test]
    fn every_url_in_a_sentence_is_masked() {
        let text = "cannot open database \"postgres://a:one@h/d\" (via amqps://b:two@q:5671), {\"url\":\"s3://k:three@x\"}";
        let redacted = redact(text);
        for secret in ["one", "two", "three"] {
            assert!(!redacted.contains(&format!(":{secret}@")), "{redacted}");
        }
        assert_eq!(
            redacted,
            "cannot open database \"postgres://a:***@h/d\" (via amqps://b:***@q:5671), {\"url\":\"s3://k:***@x\"}"
        );
    }

    #[test]
    fn text_without_passwords_is_borrowed_unchanged() {
        for text in [
            "sqlite://./data/orbit.db",
            "postgres://postgres@127.0.0.1:5432/postgres",
            "http://127.0.0.1:8080/readyz?x=a:b@c",
            "no url at all: user@example.com",
            "ends with ://",
            "postgres://orbit:***@db/orbit",
        ] {
            assert!(
                matches!(redact(text), Cow::Borrowed(t) if t == text),
                "{text}"
            );
        }
    }
}
