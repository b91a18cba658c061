//! Parses `#[outbox(...)]` on the type and on enum variants into raw values, keeping spans.

use syn::meta::ParseNestedMeta;
use syn::{Attribute, Expr, Lit, LitInt, LitStr, Member, Path};

use crate::errors::{Errors, skip_value};

/// Where an `#[outbox(...)]` attribute stands, which decides the keys it takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Container,
    Variant,
}

impl Place {
    fn keys(self) -> &'static [Setting] {
        match self {
            Place::Container => &Setting::ALL,
            Place::Variant => &[Setting::RoutingKey, Setting::Name, Setting::Key],
        }
    }
}

/// A key of `#[outbox(...)]`; each has a slot of its own in [`Attrs`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Setting {
    Exchange,
    RoutingKey,
    Key,
    Name,
    Version,
    Stream,
    Crate,
}

impl Setting {
    const ALL: [Setting; 7] = [
        Setting::Exchange,
        Setting::RoutingKey,
        Setting::Key,
        Setting::Name,
        Setting::Version,
        Setting::Stream,
        Setting::Crate,
    ];

    /// As written in the attribute.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Setting::Exchange => "exchange",
            Setting::RoutingKey => "routing_key",
            Setting::Key => "key",
            Setting::Name => "name",
            Setting::Version => "version",
            Setting::Stream => "stream",
            Setting::Crate => "crate",
        }
    }

    fn from_ident(ident: &syn::Ident) -> Option<Setting> {
        Setting::ALL.into_iter().find(|key| ident == key.as_str())
    }
}

/// The keys of one or more `#[outbox(...)]` attributes; each at most once.
#[derive(Default)]
pub(crate) struct Attrs {
    pub(crate) exchange: Option<LitStr>,
    pub(crate) routing_key: Option<LitStr>,
    pub(crate) key: Option<Member>,
    pub(crate) name: Option<LitStr>,
    pub(crate) version: Option<LitInt>,
    pub(crate) stream: Option<LitStr>,
    pub(crate) krate: Option<Path>,
    /// Every known key written, valid or not: an invalid one is not also "missing".
    pub(crate) written: Vec<Setting>,
}

impl Attrs {
    /// Reads every `#[outbox(...)]` in `attrs`, recording each problem in `errors`.
    pub(crate) fn parse(attrs: &[Attribute], place: Place, errors: &mut Errors) -> Self {
        let mut out = Attrs::default();
        for attr in attrs.iter().filter(|a| a.path().is_ident("outbox")) {
            let result = attr.parse_nested_meta(|meta| {
                if let Err(error) = out.parse_key(&meta, place, errors) {
                    errors.push(error);
                    skip_value(&meta)?;
                }
                Ok(())
            });
            errors.ok(result);
        }
        out
    }

    fn parse_key(
        &mut self,
        meta: &ParseNestedMeta<'_>,
        place: Place,
        errors: &mut Errors,
    ) -> syn::Result<()> {
        let key = meta.path.get_ident().and_then(Setting::from_ident);
        let Some(key) = key.filter(|key| place.keys().contains(key)) else {
            return Err(unknown_key(meta, place));
        };
        self.written.push(key);
        let value: Expr = meta.value()?.parse()?;
        let name = key.as_str();
        let parsed = match key {
            Setting::Exchange => string(name, value).map(|v| set(&mut self.exchange, v, meta)),
            Setting::RoutingKey => string(name, value).map(|v| set(&mut self.routing_key, v, meta)),
            Setting::Name => string(name, value).map(|v| set(&mut self.name, v, meta)),
            Setting::Stream => string(name, value).map(|v| set(&mut self.stream, v, meta)),
            Setting::Version => integer(value).map(|v| set(&mut self.version, v, meta)),
            Setting::Key => member(value).map(|v| set(&mut self.key, v, meta)),
            Setting::Crate => string(name, value)
                .and_then(|lit| lit.parse::<Path>())
                .map(|v| set(&mut self.krate, v, meta)),
        };
        if let Some(Err(duplicate)) = errors.ok(parsed) {
            errors.push(duplicate);
        }
        Ok(())
    }
}

/// Stores `value` unless the key was given before.
fn set<T>(slot: &mut Option<T>, value: T, meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if slot.is_some() {
        let key = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default();
        return Err(meta.error(format!("duplicate `{key}` in #[outbox(...)]")));
    }
    *slot = Some(value);
    Ok(())
}

fn unknown_key(meta: &ParseNestedMeta<'_>, place: Place) -> syn::Error {
    let key = quote::ToTokens::to_token_stream(&meta.path)
        .to_string()
        .replace(' ', "");
    let valid = place
        .keys()
        .iter()
        .map(|k| format!("`{}`", k.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let on = match place {
        Place::Container => "#[outbox(...)]",
        Place::Variant => "#[outbox(...)] on a variant",
    };
    meta.error(format!(
        "unknown key `{key}` in {on}; expected one of {valid}"
    ))
}

fn string(key: &str, value: Expr) -> syn::Result<LitStr> {
    match value {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(lit),
        other => Err(syn::Error::new_spanned(
            other,
            format!("`{key}` takes a string literal, e.g. `{key} = \"...\"`"),
        )),
    }
}

fn integer(value: Expr) -> syn::Result<LitInt> {
    match value {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Int(lit), ..
        }) => Ok(lit),
        other => Err(syn::Error::new_spanned(
            other,
            "`version` takes an integer from 1 to 65535, e.g. `version = 2`",
        )),
    }
}

fn member(value: Expr) -> syn::Result<Member> {
    match value {
        Expr::Path(path) if path.qself.is_none() && path.path.get_ident().is_some() => {
            Ok(Member::Named(path.path.segments[0].ident.clone()))
        }
        Expr::Lit(syn::ExprLit {
            lit: Lit::Int(lit), ..
        }) => Ok(Member::Unnamed(syn::Index {
            index: lit.base10_parse()?,
            span: lit.span(),
        })),
        other => Err(syn::Error::new_spanned(
            other,
            "`key` takes a field name (`key = order_id`) or a tuple index (`key = 0`)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(attrs: Vec<Attribute>, place: Place) -> (Attrs, Option<String>) {
        let mut errors = Errors::default();
        let out = Attrs::parse(&attrs, place, &mut errors);
        let messages = errors.finish().err().map(|all| {
            all.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        });
        (out, messages)
    }

    #[test]
    fn reads_every_container_key() {
        let (a, err) = parse(
            vec![
                syn::parse_quote!(#[outbox(exchange = "orders", routing_key = "o.c", key = id,
                name = "N", version = 3, stream = "S", crate = "x::y")]),
            ],
            Place::Container,
        );
        assert_eq!(err, None);
        assert_eq!(a.exchange.map(|l| l.value()).as_deref(), Some("orders"));
        assert_eq!(a.routing_key.map(|l| l.value()).as_deref(), Some("o.c"));
        assert!(matches!(a.key, Some(Member::Named(i)) if i == "id"));
        assert_eq!(
            a.version.map(|v| v.base10_digits().to_owned()).as_deref(),
            Some("3")
        );
        assert!(a.krate.is_some() && a.stream.is_some() && a.name.is_some());
    }

    #[test]
    fn reports_duplicate_and_unknown_keys_together() {
        let (_, err) = parse(
            vec![
                syn::parse_quote!(#[outbox(exchange = "a")]),
                syn::parse_quote!(#[outbox(exchange = "b")]),
                syn::parse_quote!(#[outbox(topic = "c")]),
            ],
            Place::Container,
        );
        let err = err.expect("errors");
        assert!(err.contains("duplicate `exchange`"), "{err}");
        assert!(err.contains("unknown key `topic`"), "{err}");
    }

    #[test]
    fn variants_take_fewer_keys() {
        let (_, err) = parse(
            vec![syn::parse_quote!(#[outbox(exchange = "a")])],
            Place::Variant,
        );
        assert!(
            err.expect("error")
                .contains("expected one of `routing_key`, `name`, `key`")
        );
    }
}
