//! `#[derive(OutboxEvent)]`: parse (`attr`) → rules (`check`, which knows no
//! model) → checked model (`ast`) → tokens (`expand`). Imports flow that way.

mod ast;
mod attr;
mod check;
mod expand;
mod fallback;

use proc_macro2::TokenStream;
use syn::DeriveInput;

pub(crate) fn derive(input: DeriveInput) -> TokenStream {
    match ast::Event::from_input(&input) {
        Ok(event) => expand::expand(&event),
        Err(errors) => {
            // The fallback names the runtime where the user said it is, if they said.
            let attrs = attr::Attrs::parse(
                &input.attrs,
                attr::Place::Container,
                &mut Default::default(),
            );
            let krate = attrs
                .krate
                .unwrap_or_else(|| syn::parse_quote!(::outbox_core));
            fallback::expand(&input, &krate, errors)
        }
    }
}
