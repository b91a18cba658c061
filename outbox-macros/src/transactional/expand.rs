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

    rewrite::body(&mut function.block, &conn, &emitter, &transaction);
    let (begin_on, rebind) = match &conn {
        Conn::Binding(name) => (
            quote!(#name),
            quote!(#[allow(unused_variables)] let #name = #transaction;),
        ),
        Conn::Expr(expr) => (quote!(#expr), TokenStream::new()),
    };
    let body = &function.block;
    // Spanned on the return type, so that an `E` without `From<outbox_core::Error>` is reported there.
    let span = output.span();
    let fail =
        quote_spanned!(span=> ::core::result::Result::Err(::core::convert::From::from(error)));
    let finish = quote_spanned!(span=> #krate::__private::Scope::finish(#scope, #result).await);
    let block = quote! {{
        let #scope = match #krate::__private::Scope::begin({
            use #krate::__private::TransactionTrait as _;
            (#begin_on).begin()
        })
        .await
        {
            ::core::result::Result::Ok(scope) => scope,
            ::core::result::Result::Err(error) => return #fail,
        };
        let #result: #output = {
            let #transaction = #scope.transaction();
            let #emitter = #scope.emitter();
            #rebind
            async move #body.await
        };
        #finish
    }};
    let attrs = &function.attrs;
    let vis = &function.vis;
    let sig = &function.sig;
    quote!(#(#attrs)* #vis #sig #block)
}
