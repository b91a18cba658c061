//! The checked model of a `#[transactional]` function: async, returning a
//! `Result`, with exactly one connection.

use syn::spanned::Spanned;
use syn::{
    Expr, FnArg, GenericParam, Ident, ItemFn, Pat, Path, ReturnType, Type, TypeParamBound,
    WherePredicate,
};

use super::attr::Args;
use crate::errors::Errors;

pub(crate) struct Transactional {
    pub(crate) function: ItemFn,
    pub(crate) krate: Path,
    pub(crate) conn: Conn,
    /// The declared `Result` type, which the body's value is checked against.
    pub(crate) output: Type,
}

/// The connection the transaction is begun on.
pub(crate) enum Conn {
    /// A parameter or local name: rebound to the transaction inside the body.
    Binding(Ident),
    /// Any other expression (`self.db`): replaced by the transaction inside the body.
    Expr(Expr),
}

impl Transactional {
    pub(crate) fn new(function: &ItemFn, args: Args) -> syn::Result<Self> {
        let mut errors = Errors::default();
        let sig = &function.sig;
        if sig.asyncness.is_none() {
            errors.push(syn::Error::new(
                sig.fn_token.span,
                "#[transactional] needs an `async fn`, because the transaction is awaited; add `async` before `fn`",
            ));
        }
        let output = errors.ok(result_type(&sig.output, sig.paren_token.span.close()));
        let conn = match args.conn {
            Some(Expr::Path(path)) if path.qself.is_none() && path.path.get_ident().is_some() => {
                path.path.get_ident().cloned().map(Conn::Binding)
            }
            Some(expr) => Some(Conn::Expr(expr)),
            None => errors.ok(find_connection(function)).map(Conn::Binding),
        };
        errors.finish()?;
        match (conn, output) {
            (Some(conn), Some(output)) => Ok(Transactional {
                function: function.clone(),
                krate: args
                    .krate
                    .unwrap_or_else(|| syn::parse_quote!(::outbox_core)),
                conn,
                output,
            }),
            // Each `None` pushed its error, so `finish` returned above.
            _ => Err(syn::Error::new(
                sig.ident.span(),
                "invalid #[transactional] function",
            )),
        }
    }
}

const RESULT_HELP: &str = "#[transactional] functions return `Result<T, E>` with `E: From<outbox_core::Error>`, \
     so that a failed commit can be reported";

/// The declared return type, if it is a `Result` (by any path or alias ending in `Result`).
fn result_type(output: &ReturnType, close_paren: proc_macro2::Span) -> syn::Result<Type> {
    match output {
        ReturnType::Default => Err(syn::Error::new(
            close_paren,
            format!("{RESULT_HELP}; this one returns `()`"),
        )),
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(path)
                if path
                    .path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident.to_string().ends_with("Result")) =>
            {
                Ok((**ty).clone())
            }
            other => Err(syn::Error::new_spanned(other, RESULT_HELP)),
        },
    }
}

/// The one parameter whose type is a reference to a connection or transaction.
fn find_connection(function: &ItemFn) -> syn::Result<Ident> {
    let sig = &function.sig;
    let bounded = transaction_generics(function);
    let candidates: Vec<&Ident> = sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(typed) => match (&*typed.pat, &*typed.ty) {
                (Pat::Ident(pat), Type::Reference(reference))
                    if is_connection(&reference.elem, &bounded) =>
                {
                    Some(&pat.ident)
                }
                _ => None,
            },
            FnArg::Receiver(_) => None,
        })
        .collect();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(syn::Error::new(
            sig.paren_token.span.join(),
            "#[transactional] found no connection parameter: it looks for one parameter of type \
             `&DatabaseConnection`, `&DatabaseTransaction` or `&C` where `C: TransactionTrait`; \
             add one, or name the connection with `#[transactional(conn = ...)]`",
        )),
        [first, second, ..] => Err(syn::Error::new(
            second.span(),
            format!(
                "#[transactional] found more than one connection parameter (`{first}`, `{second}`); \
                 pick one with `#[transactional(conn = {first})]`"
            ),
        )),
    }
}

fn is_connection(ty: &Type, bounded: &[&Ident]) -> bool {
    match ty {
        Type::Path(path) if path.qself.is_none() => {
            let path = &path.path;
            path.get_ident().is_some_and(|i| bounded.contains(&i))
                || path.segments.last().is_some_and(|s| {
                    s.arguments.is_none()
                        && (s.ident == "DatabaseConnection" || s.ident == "DatabaseTransaction")
                })
        }
        Type::ImplTrait(imp) => imp.bounds.iter().any(is_transaction_bound),
        Type::Paren(inner) => is_connection(&inner.elem, bounded),
        _ => false,
    }
}

/// Type parameters bounded by `TransactionTrait`, inline or in the where clause.
fn transaction_generics(function: &ItemFn) -> Vec<&Ident> {
    let generics = &function.sig.generics;
    let inline = generics.params.iter().filter_map(|param| match param {
        GenericParam::Type(t) if t.bounds.iter().any(is_transaction_bound) => Some(&t.ident),
        _ => None,
    });
    let clauses = generics.where_clause.iter().flat_map(|w| &w.predicates);
    let in_where = clauses.filter_map(|predicate| match predicate {
        WherePredicate::Type(p) if p.bounds.iter().any(is_transaction_bound) => match &p.bounded_ty
        {
            Type::Path(path) => path.path.get_ident(),
            _ => None,
        },
        _ => None,
    });
    inline.chain(in_where).collect()
}

fn is_transaction_bound(bound: &TypeParamBound) -> bool {
    matches!(bound, TypeParamBound::Trait(t)
        if t.path.segments.last().is_some_and(|s| s.ident == "TransactionTrait"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn_of(function: ItemFn) -> Result<String, String> {
        match Transactional::new(&function, Args::default()) {
            Ok(t) => match t.conn {
                Conn::Binding(ident) => Ok(ident.to_string()),
                Conn::Expr(_) => Err("expr".into()),
            },
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn finds_the_connection_parameter_by_type() {
        let cases: [ItemFn; 4] = [
            syn::parse_quote!(
                async fn f(x: u8, db: &DatabaseConnection) -> Result<(), E> {}
            ),
            syn::parse_quote!(
                async fn f(tx: &sea_orm::DatabaseTransaction) -> Result<(), E> {}
            ),
            syn::parse_quote!(
                async fn f<C: TransactionTrait>(c: &C) -> anyhow::Result<()> {}
            ),
            syn::parse_quote!(
                async fn f<C>(c: &C) -> Result<(), E>
                where
                    C: sea_orm::TransactionTrait,
                {
                }
            ),
        ];
        let names: Vec<_> = cases.into_iter().map(conn_of).collect();
        assert_eq!(
            names,
            [
                Ok("db".into()),
                Ok("tx".into()),
                Ok("c".into()),
                Ok("c".into())
            ]
        );
    }

    #[test]
    fn reports_missing_async_result_and_connection_together() {
        let f: ItemFn = syn::parse_quote!(
            fn f(x: u8) {}
        );
        let err = Transactional::new(&f, Args::default())
            .err()
            .expect("errors");
        let all: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all[0].contains("needs an `async fn`"));
        assert!(all[1].contains("return `Result<T, E>`"));
        assert!(all[2].contains("found no connection parameter"));
    }

    #[test]
    fn rejects_two_candidates() {
        let f: ItemFn = syn::parse_quote!(
            async fn f(a: &DatabaseConnection, b: &DatabaseConnection) -> Result<(), E> {}
        );
        assert!(conn_of(f).is_err_and(|e| e.contains("more than one connection parameter")));
    }
}
