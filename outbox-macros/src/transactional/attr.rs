//! Parses the arguments of `#[transactional(conn = ..., crate = "...")]`.

use proc_macro2::TokenStream;
use syn::meta::ParseNestedMeta;
use syn::{Expr, LitStr, Path};

use crate::errors::{Errors, skip_value};

const KEYS: &str = "`conn` (the connection expression, e.g. `conn = self.db`) or `crate` (e.g. `crate = \"my::outbox\"`)";

#[derive(Default)]
pub(crate) struct Args {
    pub(crate) conn: Option<Expr>,
    pub(crate) krate: Option<Path>,
}

impl Args {
    pub(crate) fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = Args::default();
        let mut errors = Errors::default();
        let parsed = {
            let parser = syn::meta::parser(|meta| {
                if let Err(error) = args.parse_key(&meta) {
                    errors.push(error);
                    skip_value(&meta)?;
                }
                Ok(())
            });
            syn::parse::Parser::parse2(parser, tokens)
        };
        errors.ok(parsed);
        errors.finish().map(|()| args)
    }

    fn parse_key(&mut self, meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
        let key = if meta.path.is_ident("conn") {
            "conn"
        } else if meta.path.is_ident("crate") {
            "crate"
        } else {
            let name = quote::ToTokens::to_token_stream(&meta.path)
                .to_string()
                .replace(' ', "");
            return Err(meta.error(format!(
                "unknown argument `{name}` of #[transactional]; expected {KEYS}"
            )));
        };
        let value = meta.value()?;
        let duplicate = if key == "conn" {
            self.conn.replace(value.parse()?).is_some()
        } else {
            let lit: LitStr = value.parse().map_err(|e| {
                syn::Error::new(
                    e.span(),
                    "`crate` takes a string literal, e.g. `crate = \"my::outbox\"`",
                )
            })?;
            self.krate.replace(lit.parse()?).is_some()
        };
        if duplicate {
            return Err(meta.error(format!("duplicate `{key}` in #[transactional(...)]")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    #[test]
    fn reads_conn_and_crate() {
        let args = Args::parse(quote!(conn = self.db, crate = "x::outbox")).expect("valid");
        assert!(matches!(args.conn, Some(Expr::Field(_))));
        assert!(args.krate.is_some_and(|p| p.segments.len() == 2));
    }

    #[test]
    fn rejects_unknown_and_duplicate_arguments() {
        let unknown = Args::parse(quote!(connection = db))
            .err()
            .map(|e| e.to_string());
        assert!(unknown.is_some_and(|e| e.contains("unknown argument `connection`")));
        let duplicate = Args::parse(quote!(conn = a, conn = b))
            .err()
            .map(|e| e.to_string());
        assert!(duplicate.is_some_and(|e| e.contains("duplicate `conn`")));
    }
}
