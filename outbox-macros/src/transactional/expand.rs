//! Generates the rewritten function. Infallible.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::ast::{Conn, Transactional};
use super::rewrite;

pub(crate) fn expand(model: Transactional) -> TokenStream {
    let Transactional {
        mut function,
        krate,
        conn,
        output,
    } = model;
    let scope = syn::Ident::new("__outbox_scope", Span::mixed_site());
    let emitter = syn::Ident::new("__outbox_emitter", Span::mixed_site());
    let transaction = syn::Ident::new("__outbox_transaction", Span::mixed_site());
    let result = syn::Ident::new("__outbox_result", Span::mixed_site());
    let connection = syn::Ident::new("__outbox_connection", Span::mixed_site());

    let emit_errors = rewrite::body(&mut function.block, &conn, &emitter, &transaction)
        .err()
        .map(|errors| errors.to_compile_error());
    let (begin_on, rebind) = match &conn {
        Conn::Binding(name) => (
            quote!(#name),
            quote!(#[allow(unused_variables)] let #name = #transaction;),
        ),
        Conn::Expr(expr) => (quote!(#expr), TokenStream::new()),
    };
    let body = &function.block;
    let outcome = syn::Ident::new("__outbox_outcome", Span::mixed_site());
    // The one place the error type is converted, spanned on the return type so
    // that an `E` without `From<outbox_core::Error>` is reported there, once.
    // With `E = outbox_core::Error` the conversion is the identity, which
    // clippy would flag in the user's code.
    let convert = quote_spanned! {output.span()=>
        match #outcome {
            ::core::result::Result::Ok(result) => result,
            #[allow(clippy::useless_conversion)]
            ::core::result::Result::Err(error) => {
                ::core::result::Result::Err(::core::convert::From::from(error))
            }
        }
    };
    let block = quote! {{
        let #outcome: ::core::result::Result<#output, #krate::Error> =
            match {
                use #krate::__private::{AnyConnection as _, KnownConnection as _, TransactionTrait as _};
                let #connection = &(#begin_on);
                // With the connection's database, whose relays the commit wakes.
                #krate::__private::Scope::begin(
                    #connection.begin(),
                    (&#krate::__private::Probe(#connection)).database(),
                )
            }
            .await
            {
                ::core::result::Result::Ok(#scope) => {
                    let #result: #output = {
                        let #transaction = #scope.transaction();
                        let #emitter = #scope.emitter();
                        #rebind
                        #scope.run(async move #body).await
                    };
                    #krate::__private::Scope::finish(#scope, #result).await
                }
                ::core::result::Result::Err(error) => ::core::result::Result::Err(error),
            };
        #convert
    }};
    let attrs = &function.attrs;
    let vis = &function.vis;
    let sig = &function.sig;
    quote!(#emit_errors #(#attrs)* #vis #sig #block)
}
