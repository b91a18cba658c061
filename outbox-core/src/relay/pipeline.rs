//! Draining: rounds back to back while events keep coming, overlapped.
//!
//! While round N is published, round N-1 is settled and then round N+1 is
//! claimed on a second connection, so that the broker and the database work
//! at the same time instead of in turn (in a round of 2,000 events run in
//! turn, the claim took about a quarter of the time and the settle a seventh,
//! with the broker idle meanwhile).
//!
//! Ordering holds as in a round alone. Round N's rows stay locked until it is
//! settled; claim N+1 skips N's id span, and does not take N's events for
//! ones that stop their keys ([`Round::in_flight`]): they are published
//! first. Whether N got them stored is known when N's publish is over,
//! before N+1's begins; a key with an event N did not get stored publishes
//! nothing newer in N+1 ([`Published::held`]). Round N-1 is committed before
//! N+1 is claimed, so what it left (rescheduled or held-back events) stops
//! keys as usual.
//!
//! PostgreSQL only (see `Relay::overlapping`); elsewhere rounds run in turn.

use sea_orm::{ConnAcquireErr, DbErr};
use tokio::sync::watch;
use tokio::time::Instant;

use super::chain::Held;
use super::claim::InFlight;
use super::round::Published;
#[cfg(doc)]
use super::round::Round;
use super::{BatchReport, Publisher, Relay};
use crate::Error;

/// Runs rounds until a claim comes back empty or a round gets nothing stored,
/// or until `stop` turns true or `until` passes (no round is started after
/// either); returns their reports added up.
pub(super) async fn drain<P: Publisher>(
    relay: &Relay<P>,
    stop: Option<&watch::Receiver<bool>>,
    until: Option<Instant>,
) -> Result<BatchReport, Error> {
    let stopped = || {
        stop.is_some_and(|stop| *stop.borrow())
            || until.is_some_and(|until| Instant::now() >= until)
    };
    let mut total = BatchReport::default();
    if !relay.overlapping() {
        loop {
            let round = relay.process_batch().await?;
            let more = round.published > 0;
            total.add(round);
            if !more || stopped() {
                return Ok(total);
            }
        }
    }
    let mut current = relay.claim_round(&InFlight::default()).await?;
    let mut held = Held::new();
    let mut previous: Option<Published> = None;
    while !current.is_empty() {
        let in_flight = current.in_flight();
        let to_settle = previous.take();
        let settle_then_claim = async {
            if let Some(published) = to_settle {
                total.add(relay.settle_round(published).await?);
            }
            if stopped() {
                return Ok(None);
            }
            relay.claim_round(&in_flight).await.map(Some)
        };
        let (published, next) =
            tokio::join!(relay.publish_round(current, &held), settle_then_claim);
        let next = match next {
            Ok(next) => next,
            Err(error) => {
                // Round N is published: settle it, or its events go out again.
                total.add(relay.settle_round(published).await?);
                if !is_pool_timeout(&error) {
                    return Err(error);
                }
                relay.stop_overlapping();
                return Ok(total);
            }
        };
        match next {
            Some(next) if published.stored_any() => {
                held = published.held();
                previous = Some(published);
                current = next;
            }
            next => {
                if let Some(next) = next {
                    next.release().await?;
                }
                total.add(relay.settle_round(published).await?);
                return Ok(total);
            }
        }
    }
    if let Some(published) = previous {
        total.add(relay.settle_round(published).await?);
    }
    current.release().await?;
    Ok(total)
}

fn is_pool_timeout(error: &Error) -> bool {
    matches!(
        error,
        Error::Database(DbErr::ConnectionAcquire(ConnAcquireErr::Timeout))
    )
}
