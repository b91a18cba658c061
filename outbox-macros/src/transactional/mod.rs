//! `#[transactional]`: parse (`attr`) → checked model (`ast`) → body rewrite
//! (`rewrite`, with each `emit!` call's arguments read by `emit_call`) → tokens (`expand`).

mod ast;
mod attr;
mod emit_call;
mod expand;
mod fallback;
mod rewrite;

use proc_macro2::TokenStream;

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let function: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(parse_error) => {
            // syn's own error says where parsing stopped; ours says what was expected.
            let mut error = syn::Error::new(
                proc_macro2::Span::call_site(),
                "#[transactional] goes on an `async fn` returning `Result<T, E>`",
            );
            error.combine(parse_error);
            return fallback::unparsed(item, error);
        }
    };
    let args = attr::Args::parse(args);
    let krate = args.as_ref().ok().and_then(|args| args.krate.clone());
    match args.and_then(|args| ast::Transactional::new(&function, args)) {
        Ok(model) => expand::expand(model),
        Err(errors) => fallback::expand(function, krate, errors),
    }
}
