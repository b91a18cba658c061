//! Routing-key patterns (`order.{order_id}.created`) and NATS subject/stream name rules.

/// One piece of a routing key: literal text (dots included) or a `{field}` placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Literal(String),
    Field(String),
}

/// Splits a routing key into pieces, or says what is wrong with it.
pub(crate) fn parse_routing_key(key: &str) -> Result<Vec<Piece>, String> {
    for (index, token) in key.split('.').enumerate() {
        if token.is_empty() {
            return Err(match index {
                0 => "routing_key must not start with '.' or be empty".to_owned(),
                _ if index == key.split('.').count() - 1 => {
                    "routing_key must not end with '.'".to_owned()
                }
                _ => "routing_key must not contain an empty token ('..')".to_owned(),
            });
        }
    }
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = key;
    while let Some(c) = rest.chars().next() {
        match c {
            '{' => {
                let close = rest
                    .find('}')
                    .ok_or_else(|| "unclosed `{` in routing_key; write `{field}`".to_owned())?;
                let field = &rest[1..close];
                if field.is_empty() || field.contains(['{', '.']) {
                    return Err(format!(
                        "`{}` is not a placeholder; write `{{field}}` with a field name",
                        &rest[..=close]
                    ));
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Field(field.to_owned()));
                rest = &rest[close + 1..];
                continue;
            }
            '}' => return Err("unmatched `}` in routing_key".to_owned()),
            '*' | '>' => {
                return Err(format!(
                    "routing_key must not contain the wildcard `{c}`: an event is published to one concrete subject"
                ));
            }
            c if c.is_whitespace() => {
                return Err("routing_key must not contain whitespace".to_owned());
            }
            c => literal.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

/// Why `exchange` cannot be a subject's first token, if it cannot.
pub(crate) fn exchange_problem(exchange: &str) -> Option<&'static str> {
    if exchange.is_empty() {
        Some("exchange must not be empty")
    } else if exchange.contains('.') {
        Some("exchange must be a single subject token, without '.'")
    } else if exchange.contains(['*', '>']) {
        Some("exchange must not contain the wildcards `*` or `>`")
    } else if exchange.chars().any(char::is_whitespace) {
        Some("exchange must not contain whitespace")
    } else {
        None
    }
}

/// Why `stream` cannot name a JetStream stream, if it cannot.
pub(crate) fn stream_problem(stream: &str) -> Option<&'static str> {
    if stream.is_empty() {
        Some("stream name must not be empty")
    } else if stream.contains(['.', '*', '>', '/', '\\']) || stream.chars().any(char::is_whitespace)
    {
        Some("stream name must not contain '.', '*', '>', '/', '\\' or whitespace")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Piece {
        Piece::Literal(s.to_owned())
    }
    fn field(s: &str) -> Piece {
        Piece::Field(s.to_owned())
    }

    #[test]
    fn splits_literals_and_placeholders() {
        assert_eq!(
            parse_routing_key("order.created"),
            Ok(vec![lit("order.created")])
        );
        assert_eq!(
            parse_routing_key("order.{order_id}.created"),
            Ok(vec![lit("order."), field("order_id"), lit(".created")])
        );
        assert_eq!(
            parse_routing_key("{0}-x.{1}"),
            Ok(vec![field("0"), lit("-x."), field("1")])
        );
    }

    #[test]
    fn rejects_tokens_nats_would_reject() {
        for bad in [
            "", ".a", "a.", "a..b", "a b", "a.*", "a.>", "a.{", "a.{}", "a}", "a.{b.c}",
        ] {
            assert!(parse_routing_key(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn checks_exchange_and_stream_names() {
        assert_eq!(exchange_problem("orders"), None);
        assert!(exchange_problem("a.b").is_some());
        assert!(exchange_problem("").is_some());
        assert_eq!(stream_problem("ORDERS"), None);
        assert!(stream_problem("A/B").is_some());
    }
}
