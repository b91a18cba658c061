//! On a compile error, still emits an impl, so that one mistake in the
//! attribute does not add an error at every `emit!` of the type.

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

pub(super) fn expand(input: &DeriveInput, krate: &syn::Path, errors: syn::Error) -> TokenStream {
    let errors = errors.to_compile_error();
    let ident = &input.ident;
    if !input.generics.params.is_empty() || matches!(input.data, syn::Data::Union(_)) {
        return errors;
    }
    quote! {
        #errors
        const _: () = {
            impl #krate::OutboxEvent for #ident {
                const EXCHANGE: &'static str = "";
                const STREAM: &'static str = "";
                const VERSION: u16 = 1;
                const EVENT_TYPES: &'static [&'static str] = &[];
                fn event_type(&self) -> &'static str {
                    ::core::unreachable!()
                }
                fn subject(&self) -> ::core::result::Result<::std::string::String, #krate::Error> {
                    ::core::unreachable!()
                }
                fn partition_key(&self) -> ::core::option::Option<::std::string::String> {
                    ::core::unreachable!()
                }
            }
        };
    }
}
