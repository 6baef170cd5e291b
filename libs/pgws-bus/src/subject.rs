//! Subjects and patterns, as NATS reads them: tokens separated by `.`, none empty and none
//! holding whitespace; in a pattern a token `*` matches any one token and a last token `>`
//! matches one or more.

/// Whether `subject` can be published to.
pub fn valid_subject(subject: &str) -> bool {
    tokens_ok(subject) && !subject.split('.').any(|t| t == "*" || t == ">")
}

/// Whether `pattern` can be subscribed to.
pub fn valid_pattern(pattern: &str) -> bool {
    if !tokens_ok(pattern) {
        return false;
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens
        .iter()
        .enumerate()
        .all(|(i, t)| *t != ">" || i == tokens.len() - 1)
}

fn tokens_ok(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|t| !t.is_empty() && !t.chars().any(char::is_whitespace))
}

/// Whether `subject` matches `pattern`.
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for p in pattern.split('.') {
        match (p, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(s)) if p == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_in_nats() {
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*", "a.b"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches("*.b.>", "x.b.y"));
        assert!(!matches("a.b.c", "a.b"));
    }

    #[test]
    fn subjects_and_patterns_are_checked() {
        assert!(valid_subject("a.b"));
        assert!(!valid_subject("a.*"));
        assert!(!valid_subject("a..b"));
        assert!(!valid_subject(""));
        assert!(!valid_subject("a b"));
        assert!(valid_pattern("a.*.>"));
        assert!(!valid_pattern("a.>.b"));
    }
}
