//! The arguments of one `emit!` call: the event, then options.
//!
//! `emit!(event)`, with `at = <DateTime<Utc>>` or
//! `after = <std::time::Duration>`, and `headers = <pairs>`. The values'
//! types are checked by rustc, against the parameters of `EmitOptions`'
//! method of each name, so that a wrong one is reported at the value.

use proc_macro2::{Ident, TokenStream};
use quote::quote;
use syn::parse::ParseStream;
use syn::{Expr, Macro, Token};

use crate::errors::Errors;

const OPTIONS_HELP: &str = "expected `at = <chrono::DateTime<Utc>>`, \
     `after = <std::time::Duration>` or `headers = <[(name, value), ...]>`";

/// The options' names; `at` and `after` exclude each other.
const OPTIONS: [&str; 3] = ["at", "after", "headers"];

/// A parsed `emit!` call, its valid parts kept when some are not.
pub(crate) struct EmitCall {
    /// `None` when the event itself did not parse.
    event: Option<Expr>,
    /// The valid options, each once, in the order given.
    options: Vec<(Ident, Expr)>,
}

impl EmitCall {
    /// Parses `emit!`'s tokens, recording every mistake in `errors`. A
    /// mistake at the end of them is reported at the closing parenthesis.
    pub(crate) fn parse(mac: &Macro, errors: &mut Errors) -> Self {
        let mut call = Self {
            event: None,
            options: Vec::new(),
        };
        let parser = |input: ParseStream<'_>| call.parse_into(input, errors);
        if let Err(error) = mac.parse_body_with(parser) {
            errors.push(error);
        }
        call
    }

    fn parse_into(&mut self, input: ParseStream<'_>, errors: &mut Errors) -> syn::Result<()> {
        self.event = Some(input.parse()?);
        while !input.is_empty() {
            input.parse::<Token![,]>()?;
            if input.is_empty() {
                break; // a trailing comma
            }
            let name: Ident = input
                .parse()
                .map_err(|e| syn::Error::new(e.span(), OPTIONS_HELP))?;
            input.parse::<Token![=]>()?;
            let value: Expr = input.parse()?;
            match self.conflict(&name) {
                Some(message) => errors.push(syn::Error::new(name.span(), message)),
                None => self.options.push((name, value)),
            }
        }
        Ok(())
    }

    /// Why option `name` cannot join those given before it, if it cannot.
    fn conflict(&self, name: &Ident) -> Option<String> {
        if !OPTIONS.iter().any(|option| name == option) {
            return Some(format!("unknown `emit!` option `{name}`: {OPTIONS_HELP}"));
        }
        let when = |n: &Ident| n == "at" || n == "after";
        self.options.iter().find_map(|(given, _)| {
            if given == name {
                Some(format!("`{name}` is given twice"))
            } else if when(given) && when(name) {
                Some(format!(
                    "`{given}` and `{name}` both say when to deliver the event: give one of them"
                ))
            } else {
                None
            }
        })
    }

    /// The tokens of `emit!`'s expansion-side form: `@transactional <emitter>,
    /// <event>[, <name> = <value>]*`, or `@rejected` without an event.
    pub(crate) fn into_tokens(self, emitter: &Ident) -> TokenStream {
        let Some(event) = self.event else {
            return quote!(@rejected);
        };
        let options = (self.options.iter()).map(|(name, value)| quote!(, #name = #value));
        quote!(@transactional #emitter, #event #(#options)*)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proc_macro2::Span;

    fn parse(tokens: TokenStream) -> (String, Result<(), String>) {
        let mut errors = Errors::default();
        let call = EmitCall::parse(&syn::parse_quote!(emit!(#tokens)), &mut errors);
        let emitter = Ident::new("e", Span::call_site());
        let out = call.into_tokens(&emitter).to_string().replace(' ', "");
        (out, errors.finish().map_err(|e| e.to_string()))
    }

    #[test]
    fn keeps_the_event_and_its_delivery_time() {
        assert_eq!(
            parse(quote!(A { x: 1 })),
            ("@transactionale,A{x:1}".into(), Ok(()))
        );
        assert_eq!(
            parse(quote!(make(a, b), at = when,)),
            ("@transactionale,make(a,b),at=when".into(), Ok(()))
        );
        assert_eq!(
            parse(quote!(A, after = Duration::from_secs(5))),
            (
                "@transactionale,A,after=Duration::from_secs(5)".into(),
                Ok(())
            )
        );
    }

    #[test]
    fn reports_bad_options_and_keeps_the_rest() {
        let (out, errors) = parse(quote!(A, at = t, after = d, color = red));
        assert_eq!(out, "@transactionale,A,at=t");
        let errors = errors.expect_err("two bad options");
        assert!(errors.contains("both say when"), "{errors}");
        let (out, errors) = parse(quote!(A, headers = h, headers = g));
        assert_eq!(out, "@transactionale,A,headers=h");
        assert!(errors.expect_err("twice").contains("given twice"));
        let (_, errors) = parse(quote!(A, color = red));
        assert!(
            errors
                .expect_err("unknown")
                .contains("unknown `emit!` option `color`")
        );
        let (out, errors) = parse(quote!());
        assert_eq!(out, "@rejected");
        assert!(errors.is_err());
    }
}
