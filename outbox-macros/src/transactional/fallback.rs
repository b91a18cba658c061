//! On a compile error, still emits the function with its signature unchanged,
//! so that its callers do not add errors of their own.

use proc_macro2::TokenStream;
use quote::quote;
use syn::ItemFn;

pub(crate) fn expand(function: ItemFn, errors: syn::Error) -> TokenStream {
    let errors = errors.to_compile_error();
    let ItemFn {
        attrs, vis, sig, ..
    } = function;
    quote! {
        #errors
        #(#attrs)*
        #[allow(unused_variables)]
        #vis #sig {
            ::core::unimplemented!("#[transactional] reported a compile error")
        }
    }
}

/// The attribute is on something other than a function.
pub(crate) fn unparsed(item: TokenStream, error: syn::Error) -> TokenStream {
    let error = error.to_compile_error();
    quote!(#error #item)
}
