//! `#[derive(OutboxEvent)]`: parse (`attr`) → checked model (`ast`, `check`) → tokens (`expand`).

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
        Err(errors) => fallback::expand(&input, errors),
    }
}
