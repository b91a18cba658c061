//! Rewrites a `#[transactional]` body: hands `emit!` its emitter, and puts the
//! transaction where the body names the connection expression.

use proc_macro2::Ident;
use quote::quote_spanned;
use syn::spanned::Spanned;
use syn::visit_mut::{self, VisitMut};
use syn::{Block, Expr, Item, Macro};

use super::ast::Conn;
use super::emit_call::EmitCall;
use crate::errors::Errors;

/// Rewrites `body` in place; fails with every malformed `emit!` call, which
/// is left as an expression of the right type so that the rest still checks.
pub(crate) fn body(
    body: &mut Block,
    conn: &Conn,
    emitter: &Ident,
    transaction: &Ident,
) -> syn::Result<()> {
    let conn = match conn {
        Conn::Expr(expr) => Some((expr, transaction)),
        Conn::Binding(_) => None,
    };
    let mut rewriter = Rewriter {
        emitter,
        conn,
        errors: Errors::default(),
    };
    rewriter.visit_block_mut(body);
    rewriter.errors.finish()
}

/// Hands `emit!` its emitter and touches nothing else: for a function the
/// macro rejected, whose body is kept as written.
pub(crate) fn emits(body: &mut Block, emitter: &Ident) -> syn::Result<()> {
    let mut rewriter = Rewriter {
        emitter,
        conn: None,
        errors: Errors::default(),
    };
    rewriter.visit_block_mut(body);
    rewriter.errors.finish()
}

struct Rewriter<'a> {
    emitter: &'a Ident,
    /// The `conn = ...` expression, found by structure (syn's equality
    /// ignores spans and spacing), and the transaction that replaces it.
    conn: Option<(&'a Expr, &'a Ident)>,
    errors: Errors,
}

impl VisitMut for Rewriter<'_> {
    /// `emit!(event, ...)` becomes `emit!(@transactional <emitter>, event,
    /// ...)`; the macro keeps the user's path, so its import stays used.
    fn visit_macro_mut(&mut self, mac: &mut Macro) {
        if mac.path.segments.last().is_some_and(|s| s.ident == "emit") {
            let call = EmitCall::parse(mac, &mut self.errors);
            mac.tokens = call.into_tokens(self.emitter);
        }
    }

    fn visit_expr_mut(&mut self, expr: &mut Expr) {
        if let Some((conn, transaction)) = self.conn
            && conn == expr
        {
            // The user's span, so that a type error points at their expression.
            *expr = Expr::Verbatim(quote_spanned!(expr.span()=> (*#transaction)));
        } else {
            visit_mut::visit_expr_mut(self, expr);
        }
    }

    /// Items nested in the body (fns, impls) do not share its transaction.
    fn visit_item_mut(&mut self, _: &mut Item) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proc_macro2::Span;
    use quote::ToTokens;

    fn rewrite(mut block: Block, conn: Conn) -> String {
        let emitter = Ident::new("e", Span::call_site());
        let transaction = Ident::new("t", Span::call_site());
        body(&mut block, &conn, &emitter, &transaction).expect("valid emit! calls");
        block.to_token_stream().to_string().replace(' ', "")
    }

    #[test]
    fn hands_emit_its_emitter_but_not_in_nested_items() {
        let out = rewrite(
            syn::parse_quote!({
                emit!(A);
                outbox_core::emit!(B { x: 1 });
                fn inner() {
                    emit!(C);
                }
            }),
            Conn::Binding(Ident::new("db", Span::call_site())),
        );
        assert!(out.contains("emit!(@transactionale,A)"), "{out}");
        assert!(
            out.contains("outbox_core::emit!(@transactionale,B{x:1})"),
            "{out}"
        );
        assert!(out.contains("fninner(){emit!(C);}"), "{out}");
    }

    #[test]
    fn replaces_the_connection_expression() {
        let out = rewrite(
            syn::parse_quote!({
                X::find().all(&self.db).await;
                self.other.go();
            }),
            Conn::Expr(syn::parse_quote!(self.db)),
        );
        assert!(out.contains("all(&(*t))"), "{out}");
        assert!(out.contains("self.other.go()"), "{out}");
        // Structure, not text: `self . db` is the same expression, `self.db2` is not.
        let out = rewrite(
            syn::parse_quote!({
                X::find().all(&self.db).await;
                Y::find().all(&self.db2).await;
            }),
            Conn::Expr(syn::parse_quote!(self.db)),
        );
        assert!(out.contains("X::find().all(&(*t))"), "{out}");
        assert!(out.contains("Y::find().all(&self.db2)"), "{out}");
    }
}
