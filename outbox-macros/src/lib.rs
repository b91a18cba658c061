//! Procedural macros of the `outbox` framework. Use them through `outbox-core`,
//! which re-exports them with their documentation and provides the runtime
//! their expansions call.

use proc_macro::TokenStream;

mod errors;
mod event;
mod pattern;
mod transactional;

/// Derives `outbox_core::OutboxEvent`; documented at its re-export in `outbox-core`.
#[proc_macro_derive(OutboxEvent, attributes(outbox))]
pub fn derive_outbox_event(input: TokenStream) -> TokenStream {
    event::derive(syn::parse_macro_input!(input)).into()
}

/// Runs an async fn body in one transaction; documented at its re-export in `outbox-core`.
#[proc_macro_attribute]
pub fn transactional(args: TokenStream, item: TokenStream) -> TokenStream {
    transactional::expand(args.into(), item.into()).into()
}
