//! One member's side of a consumer group: the partitions it owns, how far
//! it has read and settled each, and the periodic look at the group that
//! takes and releases partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr};

use super::assign::{assign, partition_of};
use super::lease::{self, Claim, GroupError};
use crate::inbox::Fence;

/// How a consumer runs as a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupConfig {
    /// Partitions of the consumer name, chosen once (default 16).
    pub partitions: u32,
    /// How long a member's partitions stay its own without renewal: the
    /// longest a dead member's partitions wait for a new owner (default 10 s).
    pub lease: Duration,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl GroupConfig {
    /// The defaults, for a `const` configuration.
    pub const DEFAULT: Self = Self {
        partitions: 16,
        lease: Duration::from_secs(10),
    };

    /// How often a member renews its lease and looks at the group: three
    /// times a lease, so that one late renewal does not lose it.
    pub fn renewal(&self) -> Duration {
        self.lease / 3
    }
}

/// A partition this member owns.
#[derive(Debug)]
struct Owned {
    claim: Claim,
    /// The highest stream sequence of the partition this member queued.
    read_through: u64,
    /// Sequences queued and not settled yet.
    unsettled: BTreeSet<u64>,
    /// Over this member's share: take nothing more of it, hand it over once
    /// what is queued is settled.
    releasing: bool,
    /// Whether the current reading took every message of the partition it
    /// yielded: it started at or below `read_through + 1`, and the
    /// partition was neither taken since nor being handed over.
    covered: bool,
    /// The position last stored.
    stored: u64,
}

impl Owned {
    /// Through which sequence every message of the partition is settled,
    /// the reading being at `read_at`: with nothing unsettled, as far as a
    /// reading that covers the partition went, since it passed over no
    /// message of it.
    fn position(&self, read_at: u64) -> u64 {
        match self.unsettled.first() {
            Some(first) => first - 1,
            None if self.covered => self.read_through.max(read_at),
            None => self.read_through,
        }
    }
}

/// What a look at the group changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Rebalanced {
    /// Partitions taken: the reading restarts at [`Member::start`].
    pub(crate) taken: Vec<u32>,
    /// Partitions another member owns now.
    pub(crate) lost: Vec<u32>,
    /// Partitions handed over.
    pub(crate) released: Vec<u32>,
}

/// This process as a member of consumer `consumer`'s group.
#[derive(Debug)]
pub(crate) struct Member {
    db: DatabaseConnection,
    consumer: String,
    id: String,
    config: GroupConfig,
    owned: BTreeMap<u32, Owned>,
    /// The last stream sequence the current reading yielded.
    read_at: u64,
    /// The stream's last sequence as the reading last saw it, for the
    /// partitions' lag in `outbox status`.
    stream_end: Option<u64>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Member {
    /// Joins: creates the name's partitions, settled through stream sequence
    /// `start_after` (or checks them), and records this member alive. It
    /// owns nothing until its first [`rebalance`](Self::rebalance).
    pub(crate) async fn join(
        db: &DatabaseConnection,
        consumer: &str,
        config: GroupConfig,
        start_after: u64,
    ) -> Result<Self, GroupError> {
        lease::ensure_partitions(db, consumer, config.partitions, start_after).await?;
        let member = Self {
            db: db.clone(),
            consumer: consumer.to_owned(),
            id: uuid::Uuid::now_v7().to_string(),
            config,
            owned: BTreeMap::new(),
            read_at: 0,
            stream_end: None,
        };
        let now = now_ms();
        let until = now + millis(config.lease);
        lease::renew(db, consumer, &member.id, now, until, None).await?;
        Ok(member)
    }

    /// This member's id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The partition of a message with partition key `key` (its event id
    /// when it has none).
    pub(crate) fn partition_of(&self, key: &[u8]) -> u32 {
        partition_of(key, self.config.partitions)
    }

    /// How often to call [`rebalance`](Self::rebalance).
    pub(crate) fn renewal(&self) -> Duration {
        self.config.renewal()
    }

    /// Whether this member owns `partition` and takes its messages.
    pub(crate) fn owns(&self, partition: u32) -> bool {
        self.owned
            .get(&partition)
            .is_some_and(|owned| !owned.releasing)
    }

    /// Whether this member owns any partition, and so has a stream to read.
    pub(crate) fn owns_any(&self) -> bool {
        self.owned_count() > 0
    }

    /// How long its partitions stay its own without renewal.
    pub(crate) fn lease(&self) -> Duration {
        self.config.lease
    }

    /// How many partitions this member owns and takes messages of.
    pub(crate) fn owned_count(&self) -> usize {
        self.owned.values().filter(|owned| !owned.releasing).count()
    }

    /// Where a new reading of the stream starts: after the lowest point
    /// read of the partitions it owns.
    pub(crate) fn start(&mut self) -> u64 {
        let start = (self.owned.values())
            .filter(|owned| !owned.releasing)
            .map(|owned| owned.read_through + 1)
            .min()
            .unwrap_or(1);
        self.read_at = start - 1;
        for owned in self.owned.values_mut() {
            owned.covered = !owned.releasing;
        }
        start
    }

    /// Takes message `sequence` of `partition`, the reading's next, into
    /// this member's care if it owns the partition and has not queued the
    /// message before.
    pub(crate) fn accepts(&mut self, partition: u32, sequence: u64) -> bool {
        self.read_at = self.read_at.max(sequence);
        match self.owned.get_mut(&partition) {
            Some(owned) if !owned.releasing && sequence > owned.read_through => {
                owned.read_through = sequence;
                owned.unsettled.insert(sequence);
                true
            }
            _ => false,
        }
    }

    /// Notes the stream's last sequence as a message's metadata gave it.
    pub(crate) fn saw(&mut self, stream_end: u64) {
        self.stream_end = Some(stream_end);
    }

    /// Notes that message `sequence` of `partition` is settled.
    pub(crate) fn settled(&mut self, partition: u32, sequence: u64) {
        if let Some(owned) = self.owned.get_mut(&partition) {
            owned.unsettled.remove(&sequence);
        }
    }

    /// The fence of a batch of messages of `partitions`.
    pub(crate) fn fence(&self, partitions: impl IntoIterator<Item = u32>) -> GroupFence {
        let partitions: BTreeSet<u32> = partitions.into_iter().collect();
        let claims = (partitions.iter())
            .filter_map(|partition| self.owned.get(partition).map(|owned| owned.claim))
            .collect::<Vec<_>>();
        GroupFence {
            consumer: self.consumer.clone(),
            member: self.id.clone(),
            // A partition not owned any more fails the fence.
            complete: claims.len() == partitions.len(),
            claims,
        }
    }

    /// Renews this member's lease, stores how far each partition is
    /// settled, hands over what is over its share once settled, and takes
    /// what its share gives it once free.
    pub(crate) async fn rebalance(&mut self) -> Result<Rebalanced, DbErr> {
        let db = &self.db;
        let (consumer, id) = (self.consumer.as_str(), self.id.as_str());
        let now = now_ms();
        let until = now + millis(self.config.lease);
        lease::renew(db, consumer, id, now, until, self.stream_end).await?;
        let rows = lease::partitions(db, consumer).await?;
        let mut changed = Rebalanced::default();
        // Lost: taken by another after this member's lease ended (a pause).
        for row in &rows {
            let index = row.partition_index.unsigned_abs();
            let ours = row.owner.as_deref() == Some(id);
            if let Some(owned) = self.owned.get(&index)
                && (!ours || row.epoch != owned.claim.epoch)
            {
                self.owned.remove(&index);
                changed.lost.push(index);
            }
        }
        let members = lease::members(db, consumer, now).await?;
        let owners: Vec<Option<&str>> = (rows.iter())
            .map(|row| {
                let alive = row.lease_until_ms.is_some_and(|until| until >= now);
                row.owner
                    .as_deref()
                    .filter(|owner| alive && members.iter().any(|m| m == owner))
            })
            .collect();
        let names: Vec<&str> = members.iter().map(String::as_str).collect();
        let target = assign(&owners, &names);
        for (index, owned) in &mut self.owned {
            let mine = target.get(*index as usize).and_then(Option::as_deref) == Some(id);
            if !mine {
                // What the reading yields of it from now on is passed over.
                owned.releasing = true;
                owned.covered = false;
            }
        }
        for (index, owned) in &mut self.owned {
            let position = owned.position(self.read_at);
            if owned.releasing && owned.unsettled.is_empty() {
                lease::release(db, consumer, id, &owned.claim, position).await?;
                changed.released.push(*index);
            } else if position > owned.stored
                && lease::advance(db, consumer, id, &owned.claim, position).await?
            {
                owned.stored = position;
            }
        }
        for index in &changed.released {
            self.owned.remove(index);
        }
        for (index, owner) in (0_u32..).zip(&target) {
            let free = owners.get(index as usize).is_some_and(Option::is_none);
            if owner.as_deref() == Some(id)
                && free
                && !self.owned.contains_key(&index)
                && let Some(claim) = lease::take(db, consumer, index, id, now, until).await?
            {
                let owned = Owned {
                    claim,
                    read_through: claim.position,
                    unsettled: BTreeSet::new(),
                    releasing: false,
                    // Until the reading restarts from its position.
                    covered: false,
                    stored: claim.position,
                };
                self.owned.insert(index, owned);
                changed.taken.push(index);
            }
        }
        Ok(changed)
    }

    /// Hands every partition over at once, each from where it is settled,
    /// and counts as gone until its next [`rebalance`](Self::rebalance):
    /// a member that cannot read would hold its partitions up. What it
    /// still holds of them is not committed (the fence fails once a
    /// partition is released). Returns the partitions handed over.
    pub(crate) async fn stand_down(&mut self) -> Result<Vec<u32>, DbErr> {
        let (db, consumer, id) = (&self.db, self.consumer.as_str(), self.id.as_str());
        let mut handed = Vec::new();
        while let Some((&index, owned)) = self.owned.first_key_value() {
            let position = owned.position(self.read_at);
            lease::release(db, consumer, id, &owned.claim, position).await?;
            self.owned.remove(&index);
            handed.push(index);
        }
        lease::renew(db, consumer, id, now_ms(), 0, self.stream_end).await?;
        Ok(handed)
    }

    /// Hands every partition over, each from where it is settled (at
    /// shutdown, once what was in flight has ended).
    pub(crate) async fn leave(mut self) -> Result<(), DbErr> {
        self.stand_down().await.map(drop)
    }
}

/// A batch's fence: the claims of its partitions, checked in its transaction.
#[derive(Debug)]
pub(crate) struct GroupFence {
    consumer: String,
    member: String,
    claims: Vec<Claim>,
    complete: bool,
}

impl Fence for GroupFence {
    fn holds<'a>(&'a self, txn: &'a DatabaseTransaction) -> BoxFuture<'a, Result<bool, DbErr>> {
        async move {
            Ok(self.complete
                && lease::fence(txn, &self.consumer, &self.member, &self.claims).await?)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member owning `partitions`, each taken at position `at`, without
    /// a database (the steps tested here touch none).
    fn member(partitions: &[u32], at: u64) -> Member {
        let owned = (partitions.iter())
            .map(|&partition| {
                let claim = Claim {
                    partition,
                    epoch: 1,
                    position: at,
                };
                let owned = Owned {
                    claim,
                    read_through: at,
                    unsettled: BTreeSet::new(),
                    releasing: false,
                    covered: false,
                    stored: at,
                };
                (partition, owned)
            })
            .collect();
        Member {
            db: DatabaseConnection::default(),
            consumer: "billing".to_owned(),
            id: "a".to_owned(),
            config: GroupConfig::DEFAULT,
            owned,
            read_at: 0,
            stream_end: None,
        }
    }

    fn position(member: &Member, partition: u32) -> u64 {
        member.owned[&partition].position(member.read_at)
    }

    #[test]
    fn the_reading_starts_after_the_lowest_position_owned() {
        let mut member = member(&[0, 1], 10);
        member.owned.get_mut(&1).expect("owned").read_through = 4;
        assert_eq!(member.start(), 5);
    }

    #[test]
    fn a_position_stays_below_what_is_unsettled() {
        let mut member = member(&[0, 1], 10);
        member.start();
        assert!(member.accepts(0, 12) && member.accepts(0, 15));
        assert!(!member.accepts(2, 16), "not owned: passed over");
        member.settled(0, 15);
        assert_eq!(position(&member, 0), 11, "12 is not settled");
        member.settled(0, 12);
        assert_eq!(position(&member, 0), 16, "as far as the reading went");
        assert_eq!(
            position(&member, 1),
            16,
            "the reading passed over none of 1's"
        );
    }

    #[test]
    fn a_message_read_again_is_taken_once() {
        let mut member = member(&[0], 10);
        member.start();
        assert!(member.accepts(0, 12));
        assert!(!member.accepts(0, 12) && !member.accepts(0, 11));
    }

    #[test]
    fn a_partition_taken_since_the_reading_started_keeps_its_own_position() {
        let mut member = member(&[0], 10);
        member.start();
        assert!(member.accepts(0, 40));
        member.settled(0, 40);
        let claim = Claim {
            partition: 1,
            epoch: 3,
            position: 5,
        };
        let taken = Owned {
            claim,
            read_through: 5,
            unsettled: BTreeSet::new(),
            releasing: false,
            covered: false,
            stored: 5,
        };
        member.owned.insert(1, taken);
        assert_eq!(
            position(&member, 1),
            5,
            "the reading has not read 6..40 for it"
        );
        assert_eq!(member.start(), 6, "the reading starts again from it");
        assert_eq!(position(&member, 1), 5);
    }

    #[test]
    fn a_partition_being_handed_over_does_not_advance_past_what_it_took() {
        let mut member = member(&[0], 10);
        member.start();
        assert!(member.accepts(0, 12));
        let owned = member.owned.get_mut(&0).expect("owned");
        owned.releasing = true;
        owned.covered = false;
        assert!(!member.accepts(0, 13), "passed over while handed over");
        member.settled(0, 12);
        assert_eq!(position(&member, 0), 12, "13 is the next owner's");
    }
}
