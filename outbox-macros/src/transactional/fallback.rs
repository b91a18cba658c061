//! On a compile error, still emits the function with its signature
//! unchanged, so that its callers do not add errors of their own; and, as
//! tokio's macros do, with its body as written (run outside any transaction,
//! which the error stops from ever happening), so that the body's own
//! mistakes are reported too and rust-analyzer still sees it.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{ItemFn, Path};

use super::rewrite;

/// `krate`: where the runtime is, when the arguments said and could be read.
pub(crate) fn expand(
    mut function: ItemFn,
    krate: Option<Path>,
    mut errors: syn::Error,
) -> TokenStream {
    let ItemFn {
        attrs, vis, sig, ..
    } = &function;
    if sig.asyncness.is_none() {
        // A body written for an async fn would only add `.await` errors here.
        let errors = errors.to_compile_error();
        return quote! {
            #errors
            #(#attrs)*
            #[allow(unused_variables)]
            #vis #sig {
                ::core::unimplemented!("#[transactional] reported a compile error")
            }
        };
    }
    let krate = krate.unwrap_or_else(|| syn::parse_quote!(::outbox_core));
    let emitter = syn::Ident::new("__outbox_emitter", Span::mixed_site());
    if let Err(emit_errors) = rewrite::emits(&mut function.block, &emitter) {
        errors.combine(emit_errors);
    }
    let errors = errors.to_compile_error();
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = function;
    quote! {
        #errors
        #(#attrs)*
        #vis #sig {
            #[allow(unused_variables)]
            let #emitter = &#krate::__private::Emitter::default();
            #block
        }
    }
}

/// The attribute is on something other than a function.
pub(crate) fn unparsed(item: TokenStream, error: syn::Error) -> TokenStream {
    let error = error.to_compile_error();
    quote!(#error #item)
}
