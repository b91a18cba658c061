//! Compile-time behaviour of the macros: every error they report (`ui/<macro>/*.rs`
//! with the expected `.stderr`), and the edge cases they must accept (`ui/pass`).

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/outbox_event/*.rs");
    cases.compile_fail("ui/transactional/*.rs");
    cases.compile_fail("ui/emit/*.rs");
    cases.pass("ui/pass/*.rs");
}
