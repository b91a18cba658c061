//! Draining: rounds back to back while events keep coming, overlapped.
//!
//! While round N is published, round N-1 is settled and then round N+1 is
//! claimed on a second connection, so that the broker and the database work
//! at the same time instead of in turn (in a round of 2,000 events run in
//! turn, the claim took about a quarter of the time and the settle a seventh,
//! with the broker idle meanwhile). PostgreSQL only (`Dialect::overlaps_rounds`);
//! elsewhere rounds run in turn.
//!
//! # Why each key stays in order
//!
//! The one argument for the whole relay; the modules it names keep its steps.
//!
//! 1. **A round starts each key at its oldest undelivered event** (`store::claim`).
//!    A keyed event is claimed only if every undelivered event of its key
//!    before it is claimed too, or belongs to this relay's round in flight.
//!    An event that another relay holds, that backs off after a rejection, or
//!    that the claim did not reach stops its key: nothing newer of the key is
//!    taken. Several relays thus split the keys without reordering one.
//! 2. **Within a round, an event goes out only after its predecessor is
//!    stored** (`chain`, [`KeyOrder`](super::KeyOrder)). Each keyed event is
//!    chained to the previous event of its key in the batch and sent once that
//!    one is stored; when it is not, the rest of the chain is held back,
//!    untouched in the outbox.
//! 3. **What a round did not get stored still stops its key** (`store::settle`).
//!    Stored events leave the outbox; rejected ones are rescheduled and stay
//!    undelivered, so step 1 stops their keys until they are stored or
//!    dead-lettered; held-back ones are not touched.
//! 4. **An overlapped round defers to the one in flight** ([`Round::in_flight`],
//!    [`Published::held`]). Round N's rows stay locked until N is settled;
//!    claim N+1 does not count N's keyed events as stops (N publishes them
//!    first). Whether N got them stored is known when N's publish is over,
//!    which is before N+1's begins: a key with an event N did not get stored
//!    publishes nothing newer in N+1. Round N-1 is committed before N+1 is
//!    claimed, so what it left stops keys by step 3.
//! 5. **The span a claim skips hides nothing for longer than a round**
//!    ([`Round::in_flight`]). Claim N+1 leaves out N's id span (locked rows
//!    there cost PostgreSQL a check each); an event that became claimable
//!    inside it (committed late with a lower id, a retry come due) is not
//!    claimed, but still stops its key by step 1, whose search does not skip
//!    the span. The next claim may skip N+1's span only if N+1 lies wholly
//!    above N's, so that claim sees the event.

use sea_orm::{ConnAcquireErr, DbErr};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Relay;
use super::chain::HeldKeys;
use super::publish::Publisher;
use super::report::BatchReport;
use super::round::{Published, Round};
use super::store::InFlight;
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
            let round = relay.round().await?;
            let more = round.published > 0;
            total.add(round);
            if !more || stopped() {
                return Ok(total);
            }
        }
    }
    let mut current = Round::claim(&relay.store, &relay.config, &InFlight::default()).await?;
    let mut held = HeldKeys::new();
    let mut previous: Option<Published> = None;
    while !current.is_empty() {
        let in_flight = current.in_flight();
        let to_settle = previous.take();
        let settle_then_claim = async {
            if let Some(published) = to_settle {
                total.add(published.settle(&relay.store, &relay.config).await?);
            }
            if stopped() {
                return Ok(None);
            }
            Round::claim(&relay.store, &relay.config, &in_flight)
                .await
                .map(Some)
        };
        let (published, next) =
            tokio::join!(current.publish(&relay.publisher, &held), settle_then_claim);
        let next = match next {
            Ok(next) => next,
            Err(error) => {
                // Round N is published: settle it, or its events go out again.
                total.add(published.settle(&relay.store, &relay.config).await?);
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
                total.add(published.settle(&relay.store, &relay.config).await?);
                return Ok(total);
            }
        }
    }
    if let Some(published) = previous {
        total.add(published.settle(&relay.store, &relay.config).await?);
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
