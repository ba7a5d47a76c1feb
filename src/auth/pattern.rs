//! Topic patterns of grants and `--public-topics`: a topic name where `*` matches any run
//! of characters (none included) and `{sub}` stands for the token's `sub`. The pattern is
//! cut at `*` before `{sub}` is filled in, so a `*` inside a subject is a plain character
//! and never widens a grant.

/// Whether `topic` matches `pattern` for a token with subject `sub`. A pattern naming
/// `{sub}` matches nothing for a token without one.
pub fn matches(pattern: &str, sub: Option<&str>, topic: &str) -> bool {
    let mut pieces = pattern.split('*');
    // INVARIANT: split yields at least one piece.
    let first = pieces.next().unwrap_or("");
    let Some(first) = fill(first, sub) else {
        return false;
    };
    let Some(mut rest) = topic.strip_prefix(first.as_ref()) else {
        return false;
    };
    let mut middle: Vec<std::borrow::Cow<'_, str>> = Vec::new();
    for p in pieces {
        match fill(p, sub) {
            Some(p) => middle.push(p),
            None => return false,
        }
    }
    let Some(last) = middle.pop() else {
        // No `*`: the whole topic must be the literal.
        return rest.is_empty();
    };
    // Leftmost-first placement of the middle pieces is optimal for `*`-only globs: it
    // leaves the most room for the ones after.
    for p in &middle {
        match rest.find(p.as_ref()) {
            Some(at) => rest = &rest[at + p.len()..],
            None => return false,
        }
    }
    rest.ends_with(last.as_ref())
}

/// `piece` with every `{sub}` replaced; None if it names `{sub}` and there is none.
fn fill<'a>(piece: &'a str, sub: Option<&str>) -> Option<std::borrow::Cow<'a, str>> {
    if !piece.contains("{sub}") {
        return Some(piece.into());
    }
    Some(piece.replace("{sub}", sub?).into())
}

/// Whether any of `patterns` matches.
pub fn any_matches(patterns: &[String], sub: Option<&str>, topic: &str) -> bool {
    patterns.iter().any(|p| matches(p, sub, topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let cases: &[(&str, Option<&str>, &str, bool)] = &[
            ("news", None, "news", true),
            ("news", None, "news2", false),
            ("news", None, "new", false),
            ("*", None, "anything/at/all", true),
            ("user/{sub}/*", Some("42"), "user/42/orders", true),
            ("user/{sub}/*", Some("42"), "user/42/", true),
            ("user/{sub}/*", Some("42"), "user/43/orders", false),
            ("user/{sub}/*", Some("4"), "user/42/orders", false),
            ("user/{sub}/*", None, "user/42/orders", false),
            ("user/{sub}", Some("42"), "user/42", true),
            ("user/{sub}", Some("42"), "user/42/x", false),
            (
                "{sub}_ContractStatusChanged",
                Some("7"),
                "7_ContractStatusChanged",
                true,
            ),
            (
                "{sub}_ContractStatusChanged",
                Some("7"),
                "8_ContractStatusChanged",
                false,
            ),
            ("a*b*c", None, "abc", true),
            ("a*b*c", None, "aXbYc", true),
            ("a*b*c", None, "aXcYb", false),
            ("a*b*c", None, "abcb", false),
            ("a*a", None, "a", false),
            ("a*a", None, "aa", true),
            ("*.scores", None, "live.scores", true),
            ("*.scores", None, "live.scores.x", false),
            // A `*` in the subject is a literal, never a wildcard.
            ("user/{sub}", Some("*"), "user/42", false),
            ("user/{sub}", Some("*"), "user/*", true),
            ("", None, "", true),
            ("", None, "x", false),
        ];
        for &(p, sub, topic, want) in cases {
            assert_eq!(matches(p, sub, topic), want, "{p:?} sub={sub:?} {topic:?}");
        }
    }
}
