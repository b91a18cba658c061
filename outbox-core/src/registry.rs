//! The compile-time registry of event types, collected through `inventory`.
//!
//! Every `#[derive(OutboxEvent)]` submits one [`EventDescriptor`] per event
//! type it carries. The relay provisions streams from it; consumers decode by
//! event type and version through it.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use crate::Error;

/// Decodes a payload into the registered Rust type, boxed.
pub type DecodeFn = fn(&[u8]) -> Result<Box<dyn Any + Send>, Error>;

/// Static metadata of one registered event type (one per struct, one per enum variant).
///
/// `#[non_exhaustive]`: the derive builds it through [`__private`]'s
/// `DescriptorParts`, so that a field added later breaks no one.
///
/// [`__private`]: crate::__private
#[derive(Debug)]
#[non_exhaustive]
pub struct EventDescriptor {
    /// The event type consumers dispatch on (`Outbox-Event-Type`).
    pub name: &'static str,
    /// The schema version (`Outbox-Event-Version`).
    pub version: u16,
    /// The exchange, the first subject token.
    pub exchange: &'static str,
    /// The JetStream stream capturing `<exchange>.>`.
    pub stream: &'static str,
    /// The routing-key pattern, placeholders included.
    pub routing_key: &'static str,
    /// The Rust type (path and variant) that registered it.
    pub rust_type: &'static str,
    /// The MIME type of the payload.
    pub content_type: &'static str,
    /// Turns a payload back into the Rust type.
    pub decode: DecodeFn,
}

inventory::collect!(EventDescriptor);

/// Every field of an [`EventDescriptor`], for the derive's generated code.
#[doc(hidden)]
#[derive(Debug)]
pub struct DescriptorParts {
    pub name: &'static str,
    pub version: u16,
    pub exchange: &'static str,
    pub stream: &'static str,
    pub routing_key: &'static str,
    pub rust_type: &'static str,
    pub content_type: &'static str,
    pub decode: DecodeFn,
}

impl EventDescriptor {
    #[doc(hidden)]
    pub const fn from_parts(parts: DescriptorParts) -> Self {
        let DescriptorParts {
            name,
            version,
            exchange,
            stream,
            routing_key,
            rust_type,
            content_type,
            decode,
        } = parts;
        Self {
            name,
            version,
            exchange,
            stream,
            routing_key,
            rust_type,
            content_type,
            decode,
        }
    }

    /// The subject pattern, `<exchange>.<routing key>`.
    pub fn subject_pattern(&self) -> String {
        format!("{}.{}", self.exchange, self.routing_key)
    }
}

/// All event types linked into this program.
#[derive(Debug)]
pub struct Registry {
    events: Vec<&'static EventDescriptor>,
    by_type: HashMap<(&'static str, u16), &'static EventDescriptor>,
}

/// The registry of this program, built on first use.
pub fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> =
        LazyLock::new(|| Registry::new(inventory::iter::<EventDescriptor>.into_iter().collect()));
    &REGISTRY
}

impl Registry {
    fn new(mut events: Vec<&'static EventDescriptor>) -> Self {
        events.sort_by_key(|d| (d.exchange, d.name, d.version, d.rust_type));
        let mut by_type = HashMap::new();
        for &d in &events {
            by_type.entry((d.name, d.version)).or_insert(d);
        }
        Self { events, by_type }
    }

    /// Every registered event type, sorted by exchange, name and version.
    pub fn iter(&self) -> impl Iterator<Item = &'static EventDescriptor> + '_ {
        self.events.iter().copied()
    }

    /// The descriptor of an event type and version, if one is registered.
    pub fn get(&self, name: &str, version: u16) -> Option<&'static EventDescriptor> {
        self.by_type.get(&(name, version)).copied()
    }

    /// Checks that no two Rust types claim the same event type and version,
    /// the same subject pattern, or one exchange for two streams.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let mut conflicts = Vec::new();
        for (i, a) in self.events.iter().enumerate() {
            for b in &self.events[i + 1..] {
                if a.rust_type == b.rust_type {
                    continue;
                }
                let reason = if (a.name, a.version) == (b.name, b.version) {
                    Some(ConflictKind::DuplicateType)
                } else if a.name != b.name && a.subject_pattern() == b.subject_pattern() {
                    Some(ConflictKind::SameSubject)
                } else if a.exchange == b.exchange && a.stream != b.stream {
                    Some(ConflictKind::StreamMismatch)
                } else {
                    None
                };
                if let Some(kind) = reason {
                    conflicts.push(Conflict {
                        kind,
                        first: a,
                        second: b,
                    });
                }
            }
        }
        if conflicts.is_empty() {
            Ok(())
        } else {
            Err(RegistryError { conflicts })
        }
    }
}

/// Conflicting registrations found by [`Registry::validate`].
#[derive(Debug)]
pub struct RegistryError {
    /// Each conflict, naming both registrations.
    pub conflicts: Vec<Conflict>,
}

/// Two registrations that cannot both stand.
#[derive(Debug)]
pub struct Conflict {
    /// What the two registrations disagree on.
    pub kind: ConflictKind,
    /// One registration.
    pub first: &'static EventDescriptor,
    /// The other registration.
    pub second: &'static EventDescriptor,
}

/// The ways two registrations can conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConflictKind {
    /// Both register the same event type and version: consumers could not tell which to decode.
    DuplicateType,
    /// Different event types publish to the same subject pattern.
    SameSubject,
    /// One exchange is mapped to two different streams.
    StreamMismatch,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = (self.first, self.second);
        match self.kind {
            ConflictKind::DuplicateType => write!(
                f,
                "event type `{}` version {} is registered by both `{}` and `{}`",
                a.name, a.version, a.rust_type, b.rust_type
            ),
            ConflictKind::SameSubject => write!(
                f,
                "subject `{}` is used by both `{}` (`{}`) and `{}` (`{}`)",
                a.subject_pattern(),
                a.rust_type,
                a.name,
                b.rust_type,
                b.name
            ),
            ConflictKind::StreamMismatch => write!(
                f,
                "exchange `{}` goes to stream `{}` in `{}` but to stream `{}` in `{}`",
                a.exchange, a.stream, a.rust_type, b.stream, b.rust_type
            ),
        }
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conflicting event registrations:")?;
        for conflict in &self.conflicts {
            write!(f, "\n  - {conflict}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RegistryError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: &[u8]) -> Result<Box<dyn Any + Send>, Error> {
        Ok(Box::new(()))
    }

    const fn desc(
        name: &'static str,
        exchange: &'static str,
        stream: &'static str,
        key: &'static str,
        ty: &'static str,
    ) -> EventDescriptor {
        EventDescriptor {
            name,
            version: 1,
            exchange,
            stream,
            routing_key: key,
            rust_type: ty,
            content_type: "application/json",
            decode: never,
        }
    }

    static A: EventDescriptor = desc("Created", "orders", "ORDERS", "created", "a::Created");
    static B: EventDescriptor = desc("Created", "orders", "ORDERS", "made", "b::Created");
    static C: EventDescriptor = desc("Shipped", "orders", "ORDERS", "created", "c::Shipped");
    static D: EventDescriptor = desc("Paid", "orders", "OTHER", "paid", "d::Paid");
    static E: EventDescriptor = desc("Paid", "billing", "BILLING", "paid", "e::Paid2");

    fn kinds(events: Vec<&'static EventDescriptor>) -> Vec<ConflictKind> {
        match Registry::new(events).validate() {
            Ok(()) => Vec::new(),
            Err(e) => e.conflicts.iter().map(|c| c.kind).collect(),
        }
    }

    #[test]
    fn reports_each_kind_of_conflict_naming_both_types() {
        assert_eq!(kinds(vec![&A, &B]), [ConflictKind::DuplicateType]);
        assert_eq!(kinds(vec![&A, &C]), [ConflictKind::SameSubject]);
        assert_eq!(kinds(vec![&A, &D]), [ConflictKind::StreamMismatch]);
        let err = Registry::new(vec![&A, &B])
            .validate()
            .expect_err("conflict");
        let text = err.to_string();
        assert!(
            text.contains("a::Created") && text.contains("b::Created"),
            "{text}"
        );
    }

    #[test]
    fn accepts_distinct_registrations() {
        assert_eq!(kinds(vec![&A, &E]), []);
        let registry = Registry::new(vec![&A, &E]);
        assert_eq!(
            registry.get("Paid", 1).map(|d| d.rust_type),
            Some("e::Paid2")
        );
        assert!(registry.get("Paid", 2).is_none());
    }
}
