//! Consumer groups: one consumer name run by several processes, each owning
//! some of its partitions (a message's partition is its key's hash), with
//! ownership, leases and a fence in the database, where the inbox's
//! transaction already runs. See `docs/consumer-groups.md` for the design.
//!
//! - `assign`: which member should own which partition, without I/O;
//! - `lease`: the members and partitions tables, taking, renewing and
//!   releasing partitions, and the fence a batch checks before it commits;
//! - `member`: this process's side: what it owns, read and settled, and the
//!   periodic look at the group that takes and hands over partitions.

mod assign;
mod lease;
mod member;

pub use assign::{assign, partition_of};
pub use lease::{
    Claim, GroupError, advance, ensure_partitions, fence, members, partitions, release, renew,
    stream_end, take,
};
pub use member::GroupConfig;
pub(crate) use member::{GroupFence, Member, Rebalanced};
