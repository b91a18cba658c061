//! Cross-field rules: the shapes an event can have, and placeholders and keys
//! that must name real fields.

use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Ident, LitStr, Member};

use crate::errors::Errors;
use crate::pattern::{self, Piece};

/// Rejects the shapes the registry cannot hold: unions, generic types, empty enums.
pub(super) fn shape(input: &DeriveInput, errors: &mut Errors) {
    match &input.data {
        Data::Union(u) => errors.push(syn::Error::new(
            u.union_token.span,
            "`OutboxEvent` cannot be derived for a union; use a struct or an enum",
        )),
        Data::Enum(e) if e.variants.is_empty() => errors.push(syn::Error::new(
            input.ident.span(),
            "an `OutboxEvent` enum needs at least one variant, each an event type",
        )),
        _ => {}
    }
    if !input.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &input.generics,
            "`OutboxEvent` cannot be derived for a generic type: the event registry needs one \
             concrete type per event; define a concrete type instead (e.g. `struct OrderCreated(Envelope<Order>)`)",
        ));
    }
}

/// The stream: as given, or the exchange upper-cased. A bad name is reported,
/// unless it is derived from an exchange already reported bad.
pub(super) fn stream(
    given: Option<&LitStr>,
    exchange: Option<&(String, LitStr)>,
    exchange_ok: bool,
    errors: &mut Errors,
) -> Option<String> {
    let (value, span, derived) = match (given, exchange) {
        (Some(lit), _) => (lit.value(), lit.span(), false),
        (None, Some((value, lit))) => (value.to_uppercase(), lit.span(), true),
        (None, None) => return None,
    };
    match pattern::stream_problem(&value) {
        Some(problem) if !derived => errors.push(syn::Error::new(span, problem)),
        Some(problem) if exchange_ok => errors.push(syn::Error::new(
            span,
            format!(
                "{problem}; the default stream `{value}` comes from the exchange, so set `stream = \"...\"`"
            ),
        )),
        _ => {}
    }
    Some(value)
}

/// A routing-key piece whose placeholder names a field of the type or variant.
pub(crate) enum Resolved {
    Literal(String),
    Field { name: String, member: Member },
}

/// One event type's routing key and partition key, resolved to its fields.
pub(super) struct Fitted {
    pub(super) pieces: Vec<Resolved>,
    pub(super) key: Option<Member>,
}

/// Checks one event type's routing key and partition key against its fields
/// (`ident` is the variant's, `None` for a struct).
pub(super) fn fit(
    ident: Option<&Ident>,
    routing: &LitStr,
    key: Option<Member>,
    fields: &Fields,
    errors: &mut Errors,
) -> Option<Fitted> {
    let owner = ident.map_or_else(|| "the struct".to_owned(), |i| format!("variant `{i}`"));
    let pieces = match pattern::parse_routing_key(&routing.value()) {
        Ok(pieces) => pieces,
        Err(problem) => {
            errors.push(syn::Error::new(routing.span(), problem));
            return None;
        }
    };
    let pieces = pieces
        .into_iter()
        .filter_map(|piece| match piece {
            Piece::Literal(text) => Some(Resolved::Literal(text)),
            Piece::Field(name) => match find_field(fields, &name) {
                Some(member) => Some(Resolved::Field { name, member }),
                None => {
                    errors.push(syn::Error::new(
                        routing.span(),
                        format!(
                            "placeholder `{{{name}}}` names no field of {owner}; fields: {}",
                            field_list(fields)
                        ),
                    ));
                    None
                }
            },
        })
        .collect();
    let key = key.and_then(|key| {
        let wanted = member_name(&key);
        let found = find_field(fields, &wanted);
        if found.is_none() {
            errors.push(syn::Error::new(
                ident.map_or_else(|| key.span(), |i| i.span()),
                format!(
                    "`key = {wanted}` names no field of {owner}; fields: {}",
                    field_list(fields)
                ),
            ));
        }
        found
    });
    Some(Fitted { pieces, key })
}

/// The field called `name` (unraw, or a tuple index), as a member expression.
fn find_field(fields: &Fields, name: &str) -> Option<Member> {
    fields
        .iter()
        .enumerate()
        .find_map(|(index, field)| match &field.ident {
            Some(ident) if ident.unraw() == name => Some(Member::Named(ident.clone())),
            None if name.parse() == Ok(index) => Some(Member::Unnamed(index.into())),
            _ => None,
        })
}

fn member_name(member: &Member) -> String {
    match member {
        Member::Named(ident) => ident.unraw().to_string(),
        Member::Unnamed(index) => index.index.to_string(),
    }
}

fn field_list(fields: &Fields) -> String {
    if fields.is_empty() {
        return "none".to_owned();
    }
    fields
        .iter()
        .enumerate()
        .map(|(i, f)| match &f.ident {
            Some(ident) => format!("`{}`", ident.unraw()),
            None => format!("`{i}`"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
