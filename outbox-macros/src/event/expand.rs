//! Generates the `OutboxEvent` impl and the registry submissions. Infallible.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};

use super::ast::{Event, Variant};
use super::check::Resolved;

pub(super) fn expand(event: &Event<'_>) -> TokenStream {
    let Event {
        ident,
        krate,
        exchange,
        stream,
        version,
        variants,
        is_enum,
    } = event;
    let names = variants.iter().map(|v| &v.name);
    let type_arms = variants.iter().map(|v| {
        let pattern = pattern(v, &[]);
        let name = &v.name;
        quote!(#pattern => #name,)
    });
    let subject_arms = variants.iter().map(|v| subject_arm(event, v));
    let key_arms = variants.iter().map(|v| key_arm(v));
    let submissions = variants.iter().map(|v| {
        let name = &v.name;
        let routing_key = &v.routing_key;
        let rust_type = match (is_enum, v.ident) {
            (true, Some(variant)) => format!("{ident}::{variant}"),
            _ => ident.to_string(),
        };
        let rust_type = quote!(::core::concat!(::core::module_path!(), "::", #rust_type));
        // Spanned on the type so that a missing `Deserialize` is reported there.
        let decode = quote_spanned!(ident.span()=> #krate::__private::decode_json::<#ident>);
        quote! {
            #krate::__private::inventory::submit! {
                #krate::EventDescriptor::from_parts(#krate::__private::DescriptorParts {
                    name: #name,
                    version: #version,
                    exchange: #exchange,
                    stream: #stream,
                    routing_key: #routing_key,
                    rust_type: #rust_type,
                    content_type: <#ident as #krate::OutboxEvent>::CONTENT_TYPE,
                    decode: #decode,
                })
            }
        }
    });
    quote! {
        const _: () = {
            #[automatically_derived]
            impl #krate::OutboxEvent for #ident {
                const EXCHANGE: &'static str = #exchange;
                const STREAM: &'static str = #stream;
                const VERSION: u16 = #version;
                const EVENT_TYPES: &'static [&'static str] = &[#(#names),*];

                fn event_type(&self) -> &'static str {
                    match self { #(#type_arms)* }
                }

                fn subject(&self) -> ::core::result::Result<#krate::__private::String, #krate::Error> {
                    match self { #(#subject_arms)* }
                }

                fn partition_key(&self) -> ::core::option::Option<#krate::__private::String> {
                    match self { #(#key_arms)* }
                }
            }
            #(#submissions)*
        };
    }
}

/// A local bound to a field in a match arm: hygienic (user code cannot see
/// it), but located at `at`, so that a type error about it is reported there.
fn binding(index: usize, at: Span) -> syn::Ident {
    format_ident!(
        "__outbox_field_{}",
        index,
        span = Span::mixed_site().located_at(at)
    )
}

/// `Self { a: __outbox_field_0, .. }` or `Self::Variant { .. }`, binding `members` in order.
fn pattern(variant: &Variant<'_>, members: &[(&syn::Member, Span)]) -> TokenStream {
    let path = match variant.ident {
        Some(ident) => quote!(Self::#ident),
        None => quote!(Self),
    };
    let bindings = members.iter().enumerate().map(|(i, (member, at))| {
        let local = binding(i, *at);
        quote!(#member: #local,)
    });
    quote!(#path { #(#bindings)* .. })
}

fn subject_arm(event: &Event<'_>, variant: &Variant<'_>) -> TokenStream {
    let krate = &event.krate;
    let name = &variant.name;
    let builder = syn::Ident::new("__outbox_subject", Span::mixed_site());
    let mut prefix = format!("{}.", event.exchange);
    let mut pieces = variant.pieces.iter().peekable();
    if let Some(Resolved::Literal(text)) = pieces.peek() {
        prefix.push_str(text);
        pieces.next();
    }
    let mut members = Vec::new();
    let steps: Vec<TokenStream> = pieces
        .map(|piece| match piece {
            Resolved::Literal(text) => quote!(#builder.literal(#text);),
            Resolved::Field { name, member } => {
                // Located at the routing key, where a field that is not `Display` is reported.
                let local = binding(members.len(), variant.routing_span);
                members.push((member, variant.routing_span));
                quote!(#builder.field(#name, #local)?;)
            }
        })
        .collect();
    let pattern = pattern(variant, &members);
    let mutability = (!steps.is_empty()).then(|| quote!(mut));
    quote! {
        #pattern => {
            let #mutability #builder = #krate::__private::SubjectBuilder::new(#name, #prefix);
            #(#steps)*
            ::core::result::Result::Ok(#builder.finish())
        }
    }
}

fn key_arm(variant: &Variant<'_>) -> TokenStream {
    match &variant.key {
        Some(member) => {
            let at = syn::spanned::Spanned::span(member);
            let pattern = pattern(variant, &[(member, at)]);
            let local = binding(0, at);
            quote!(#pattern => ::core::option::Option::Some(::std::string::ToString::to_string(#local)),)
        }
        None => {
            let pattern = pattern(variant, &[]);
            quote!(#pattern => ::core::option::Option::None,)
        }
    }
}
