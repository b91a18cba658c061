//! The checked model of a `#[derive(OutboxEvent)]` input: every value validated,
//! every placeholder and key resolved to a field, spans kept for errors.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::{Data, DeriveInput, Ident, LitStr, Member, Path};

use super::attr::{Attrs, Place, Setting};
use super::check::{self, Resolved};
use crate::errors::Errors;
use crate::pattern;

/// A type deriving `OutboxEvent`.
pub(crate) struct Event<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) krate: Path,
    pub(crate) exchange: String,
    pub(crate) stream: String,
    pub(crate) version: u16,
    /// One for a struct (with `ident: None`), one per variant for an enum.
    pub(crate) variants: Vec<Variant<'a>>,
    pub(crate) is_enum: bool,
}

/// One event type: a struct, or one enum variant.
pub(crate) struct Variant<'a> {
    pub(crate) ident: Option<&'a Ident>,
    pub(crate) name: String,
    pub(crate) routing_key: String,
    pub(crate) routing_span: Span,
    pub(crate) pieces: Vec<Resolved>,
    pub(crate) key: Option<Member>,
}

impl<'a> Event<'a> {
    /// Validates `input`, returning every problem found at once.
    pub(crate) fn from_input(input: &'a DeriveInput) -> syn::Result<Self> {
        let mut errors = Errors::default();
        let attrs = Attrs::parse(&input.attrs, Place::Container, &mut errors);
        check::shape(input, &mut errors);

        let exchange = required(
            &attrs.exchange,
            &attrs.written,
            Setting::Exchange,
            input,
            &mut errors,
        );
        let exchange_ok = exchange.as_ref().is_some_and(|(value, lit)| {
            let problem = pattern::exchange_problem(value);
            problem
                .map(|p| errors.push(syn::Error::new(lit.span(), p)))
                .is_none()
        });
        let stream = check::stream(
            attrs.stream.as_ref(),
            exchange.as_ref(),
            exchange_ok,
            &mut errors,
        );
        let version = attrs.version.as_ref().map_or(1, |lit| {
            match lit.base10_parse::<u16>() {
                Ok(0) => errors.push(syn::Error::new(
                    lit.span(),
                    "`version` starts at 1; write `version = 1` or leave it out",
                )),
                Ok(v) => return v,
                Err(_) => errors.push(syn::Error::new(
                    lit.span(),
                    "`version` takes an integer from 1 to 65535",
                )),
            }
            1
        });

        let variants = match &input.data {
            Data::Struct(data) => {
                let name = attrs.name.as_ref().map_or_else(|| input.ident.unraw().to_string(), LitStr::value);
                let routing = attrs.routing_key.as_ref().or_else(|| {
                    if !attrs.written.contains(&Setting::RoutingKey) {
                        errors.push(missing(Setting::RoutingKey, input));
                    }
                    None
                });
                routing
                    .and_then(|lit| Variant::new(None, name, lit, attrs.key.clone(), &data.fields, &mut errors))
                    .into_iter()
                    .collect()
            }
            Data::Enum(data) => data
                .variants
                .iter()
                .filter_map(|v| {
                    let own = Attrs::parse(&v.attrs, Place::Variant, &mut errors);
                    let name = own.name.as_ref().map_or_else(|| v.ident.unraw().to_string(), LitStr::value);
                    let routing = own.routing_key.as_ref().or(attrs.routing_key.as_ref());
                    let Some(routing) = routing else {
                        errors.push(syn::Error::new(
                            v.ident.span(),
                            format!(
                                "variant `{}` has no routing key; add `#[outbox(routing_key = \"...\")]` \
                                 to it or to the enum",
                                v.ident
                            ),
                        ));
                        return None;
                    };
                    let key = own.key.or_else(|| attrs.key.clone());
                    Variant::new(Some(&v.ident), name, routing, key, &v.fields, &mut errors)
                })
                .collect(),
            Data::Union(_) => Vec::new(),
        };
        if let (Some(name), Data::Enum(_)) = (&attrs.name, &input.data) {
            errors.push(syn::Error::new(
                name.span(),
                "`name` on an enum names nothing; put `#[outbox(name = \"...\")]` on its variants",
            ));
        }

        let krate = attrs
            .krate
            .unwrap_or_else(|| syn::parse_quote!(::outbox_core));
        errors.finish()?;
        let (Some((exchange, _)), Some(stream)) = (exchange, stream) else {
            // Reported above already; `finish` returned it.
            return Err(missing(Setting::Exchange, input));
        };
        Ok(Event {
            ident: &input.ident,
            krate,
            exchange,
            stream,
            version,
            variants,
            is_enum: matches!(input.data, Data::Enum(_)),
        })
    }
}

impl<'a> Variant<'a> {
    /// The event type `ident` (a variant's, `None` for a struct) with its
    /// routing and partition keys fitted to its fields.
    fn new(
        ident: Option<&'a Ident>,
        name: String,
        routing: &LitStr,
        key: Option<Member>,
        fields: &syn::Fields,
        errors: &mut Errors,
    ) -> Option<Self> {
        let fitted = check::fit(ident, routing, key, fields, errors)?;
        Some(Variant {
            ident,
            name,
            routing_key: routing.value(),
            routing_span: routing.span(),
            pieces: fitted.pieces,
            key: fitted.key,
        })
    }
}

/// The value of a required key; reports it missing unless it was written (and reported) invalid.
fn required(
    lit: &Option<LitStr>,
    written: &[Setting],
    key: Setting,
    input: &DeriveInput,
    errors: &mut Errors,
) -> Option<(String, LitStr)> {
    match lit {
        Some(lit) => Some((lit.value(), lit.clone())),
        None => {
            if !written.contains(&key) {
                errors.push(missing(key, input));
            }
            None
        }
    }
}

pub(super) fn missing(key: Setting, input: &DeriveInput) -> syn::Error {
    let key = key.as_str();
    syn::Error::new(
        input.ident.span(),
        format!(
            "missing `{key}`: add `#[outbox({key} = \"...\")]` to `{}`",
            input.ident
        ),
    )
}
