//! What an `emit!` call may say besides the event: when to deliver it, and
//! headers of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use crate::{Error, headers};

/// The options of one `emit!` call, as `#[transactional]` checked their
/// names: `emit!(event, at = t)` becomes `EmitOptions::default().at(t)`, so
/// that rustc reports a value of the wrong type at the value.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct EmitOptions {
    due: Option<Due>,
    headers: Vec<(String, String)>,
}

#[derive(Debug)]
enum Due {
    At(DateTime<Utc>),
    After(Duration),
}

/// The options applied to one event at `now`.
#[derive(Debug)]
pub(super) struct Resolved {
    /// When to deliver the event, if later than now.
    pub(super) deliver_at: Option<DateTime<Utc>>,
    /// Its own headers as the `headers` column stores them: a JSON object.
    pub(super) headers: Option<String>,
}

impl EmitOptions {
    /// Deliver no earlier than `at`.
    pub fn at(mut self, at: DateTime<Utc>) -> Self {
        self.due = Some(Due::At(at));
        self
    }

    /// Deliver no earlier than `after` from now.
    pub fn after(mut self, after: Duration) -> Self {
        self.due = Some(Due::After(after));
        self
    }

    /// Send these headers with the event's message.
    pub fn headers<I, N, V>(mut self, headers: I) -> Self
    where
        I: IntoIterator<Item = (N, V)>,
        N: Into<String>,
        V: Into<String>,
    {
        (self.headers).extend(headers.into_iter().map(|(n, v)| (n.into(), v.into())));
        self
    }

    /// Checks the options of an event of type `event_type` emitted at `now`.
    pub(super) fn resolve(
        self,
        event_type: &'static str,
        now: DateTime<Utc>,
    ) -> Result<Resolved, Error> {
        let deliver_at = match self.due {
            None => None,
            Some(Due::At(at)) => Some(at),
            Some(Due::After(after)) => Some(
                TimeDelta::from_std(after)
                    .ok()
                    .and_then(|delay| now.checked_add_signed(delay))
                    .ok_or(Error::ScheduleOutOfRange { event_type, after })?,
            ),
        };
        Ok(Resolved {
            deliver_at: deliver_at.filter(|at| *at > now),
            headers: own_headers(event_type, self.headers)?,
        })
    }
}

/// The headers as a JSON object, each given one checked, with the trace
/// context's where the feature `opentelemetry` is on (a name given wins);
/// `None` without any.
fn own_headers(
    event_type: &'static str,
    given: Vec<(String, String)>,
) -> Result<Option<String>, Error> {
    let mut object = BTreeMap::new();
    for (name, value) in given {
        let invalid = |reason| Error::Header {
            event_type,
            name: name.clone(),
            reason,
        };
        if let Some(reason) = headers::invalid(&name, &value) {
            return Err(invalid(reason));
        }
        if object
            .keys()
            .any(|seen: &String| seen.eq_ignore_ascii_case(&name))
        {
            return Err(invalid("the name is given twice"));
        }
        object.insert(name, value);
    }
    #[cfg(feature = "opentelemetry")]
    for (name, value) in crate::trace::current_headers() {
        if !object.keys().any(|given| given.eq_ignore_ascii_case(&name)) {
            object.insert(name, value);
        }
    }
    if object.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&object)
        .map(Some)
        .map_err(|source| Error::Serialize { event_type, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(options: EmitOptions) -> Result<Resolved, Error> {
        options.resolve("Test", Utc::now())
    }

    #[test]
    fn a_time_past_or_now_delivers_at_once() {
        let past = resolve(EmitOptions::default().at(Utc::now() - TimeDelta::hours(1)));
        assert_eq!(past.expect("valid").deliver_at, None);
        let zero = resolve(EmitOptions::default().after(Duration::ZERO));
        assert_eq!(zero.expect("valid").deliver_at, None);
        let later = resolve(EmitOptions::default().after(Duration::from_secs(60)));
        assert!(later.expect("valid").deliver_at.is_some());
        let never = resolve(EmitOptions::default().after(Duration::MAX));
        assert!(matches!(never, Err(Error::ScheduleOutOfRange { .. })));
    }

    #[test]
    fn headers_are_checked_and_stored_as_a_json_object() {
        let both = EmitOptions::default().headers([("Tenant-Id", "acme"), ("Trace", "1")]);
        let headers = resolve(both).expect("valid").headers;
        assert_eq!(
            headers.as_deref(),
            Some(r#"{"Tenant-Id":"acme","Trace":"1"}"#)
        );
        assert_eq!(
            resolve(EmitOptions::default()).expect("valid").headers,
            None
        );
        let twice = EmitOptions::default().headers([("Tenant-Id", "a"), ("tenant-id", "b")]);
        let error = resolve(twice).expect_err("a name twice").to_string();
        assert!(error.contains("given twice"), "{error}");
        let secret = EmitOptions::default().headers([("Token", "s3cr3t\n")]);
        let error = resolve(secret).expect_err("a line break").to_string();
        assert!(
            error.contains("line break") && !error.contains("s3cr3t"),
            "{error}"
        );
    }
}
