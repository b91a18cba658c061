//! Builds subjects from routing-key patterns at run time, checking placeholder values.
//!
//! The literal parts of a pattern were checked at compile time by the derive;
//! only values substituted into `{field}` placeholders are checked here.

use std::fmt::{Display, Write};

use crate::Error;

/// Assembles `<exchange>.<routing key>` for one event value.
#[doc(hidden)]
#[derive(Debug)]
pub struct SubjectBuilder {
    subject: String,
    event_type: &'static str,
}

impl SubjectBuilder {
    /// Starts a subject with the given literal prefix (the exchange and the pattern's leading literal).
    pub fn new(event_type: &'static str, prefix: &str) -> Self {
        Self {
            subject: String::from(prefix),
            event_type,
        }
    }

    /// Appends a literal part of the pattern.
    pub fn literal(&mut self, text: &str) {
        self.subject.push_str(text);
    }

    /// Appends a placeholder's value, rejecting one that would break the subject.
    pub fn field(&mut self, field: &'static str, value: &dyn Display) -> Result<(), Error> {
        let start = self.subject.len();
        // Writing into a String cannot fail.
        let _ = write!(self.subject, "{value}");
        let rendered = &self.subject[start..];
        match token_problem(rendered) {
            None => Ok(()),
            Some(reason) => Err(Error::Subject {
                event_type: self.event_type,
                field,
                value: rendered.to_owned(),
                reason,
            }),
        }
    }

    /// The finished subject.
    pub fn finish(self) -> String {
        self.subject
    }
}

/// Why `value` cannot stand inside a subject token, if it cannot.
fn token_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        Some("is empty")
    } else if value.contains('.') {
        Some("contains '.'")
    } else if value.contains(['*', '>']) {
        Some("contains a wildcard")
    } else if value.chars().any(char::is_whitespace) {
        Some("contains whitespace")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_subject_with_fields() {
        let mut b = SubjectBuilder::new("E", "orders.order.");
        b.field("id", &42).expect("valid token");
        b.literal(".created");
        assert_eq!(b.finish(), "orders.order.42.created");
    }

    #[test]
    fn rejects_values_that_break_tokens() {
        for (value, reason) in [
            ("", "is empty"),
            ("a.b", "contains '.'"),
            ("a*", "contains a wildcard"),
            (">", "contains a wildcard"),
            ("a b", "contains whitespace"),
        ] {
            let mut b = SubjectBuilder::new("E", "x.");
            match b.field("f", &value) {
                Err(Error::Subject { reason: got, .. }) => assert_eq!(got, reason, "{value:?}"),
                other => panic!("{value:?} gave {other:?}"),
            }
        }
    }
}
