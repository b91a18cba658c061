//! Which member should own each partition: shares as even as the partition
//! count allows, and as few partitions moved as that permits when members
//! come and go. Every member computes the same answer from the same table,
//! so there is no leader; where two members' views differ for a moment, a
//! partition is only ever taken when free, so the worst is a delay.

use std::collections::HashMap;

/// The partition of a message: its key's FNV-1a hash (64 bits) modulo
/// `count`. Fixed forever, since a key that moved to another partition on an
/// upgrade would lose its order during the rolling deploy.
pub fn partition_of(key: &[u8], count: u32) -> u32 {
    use std::hash::Hasher;
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(key);
    let count = u64::from(count.max(1));
    // Below `count`, which is a u32.
    u32::try_from(hasher.finish() % count).unwrap_or_default()
}

/// The owner each partition should have.
///
/// `owners[p]` is partition `p`'s owner now, if it is one of `members` (the
/// live ones). Members are ranked by id; each gets `count / n` partitions,
/// the first `count % n` one more, and members past `count` none (they stand
/// by). A member keeps what it owns up to its share, lowest partitions
/// first; the rest go to the members below their share, in rank order.
pub fn assign(owners: &[Option<&str>], members: &[&str]) -> Vec<Option<String>> {
    let mut ranked: Vec<&str> = members.to_vec();
    ranked.sort_unstable();
    ranked.dedup();
    if ranked.is_empty() {
        return vec![None; owners.len()];
    }
    let (count, n) = (owners.len(), ranked.len());
    let mut room: HashMap<&str, usize> = (ranked.iter().enumerate())
        .map(|(rank, &member)| (member, count / n + usize::from(rank < count % n)))
        .collect();
    let mut target: Vec<Option<&str>> = (owners.iter())
        .map(|owner| {
            let member = (*owner)?;
            let left = room.get_mut(member).filter(|left| **left > 0)?;
            *left -= 1;
            Some(member)
        })
        .collect();
    let mut open = (ranked.iter()).flat_map(|member| std::iter::repeat_n(*member, room[member]));
    for slot in target.iter_mut().filter(|slot| slot.is_none()) {
        *slot = open.next();
    }
    target
        .into_iter()
        .map(|owner| owner.map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(target: &[Option<String>], member: &str) -> usize {
        (target.iter())
            .filter(|owner| owner.as_deref() == Some(member))
            .count()
    }

    fn owners(target: &[Option<String>]) -> Vec<Option<&str>> {
        target.iter().map(Option::as_deref).collect()
    }

    #[test]
    fn the_hash_is_fnv1a_and_never_changes() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c; of "" the offset basis.
        assert_eq!(
            partition_of(b"a", 1 << 31),
            (0xaf63_dc4c_8601_ec8c_u64 % (1 << 31)) as u32
        );
        assert_eq!(
            partition_of(b"", 1000),
            (0xcbf2_9ce4_8422_2325_u64 % 1000) as u32
        );
        assert_eq!(partition_of(b"order-42", 16), partition_of(b"order-42", 16));
        assert_eq!(partition_of(b"anything", 0), 0, "a count of 0 counts as 1");
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut seen = [0_u32; 16];
        for key in 0..16_000 {
            seen[partition_of(key.to_string().as_bytes(), 16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn one_member_owns_every_partition() {
        let target = assign(&[None; 8], &["a"]);
        assert_eq!(shares(&target, "a"), 8);
    }

    #[test]
    fn shares_differ_by_at_most_one() {
        let target = assign(&[None; 16], &["c", "a", "b"]);
        let counts: Vec<_> = ["a", "b", "c"].iter().map(|m| shares(&target, m)).collect();
        assert_eq!(
            counts,
            [6, 5, 5],
            "the first in rank order takes the remainder"
        );
        assert!(target.iter().all(Option::is_some));
    }

    #[test]
    fn members_past_the_count_stand_by() {
        let target = assign(&[None; 2], &["a", "b", "c", "d"]);
        assert_eq!(target, [Some("a".to_owned()), Some("b".to_owned())]);
        assert_eq!(shares(&target, "c") + shares(&target, "d"), 0);
    }

    #[test]
    fn a_joining_member_takes_only_its_share() {
        let before = assign(&[None; 16], &["a", "b"]);
        let after = assign(&owners(&before), &["a", "b", "c"]);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert_eq!(
            moved,
            shares(&after, "c"),
            "only the newcomer's partitions move"
        );
        assert_eq!(shares(&after, "c"), 5);
    }

    #[test]
    fn a_leaving_members_partitions_go_to_the_others_and_nothing_else_moves() {
        let before = assign(&[None; 16], &["a", "b", "c"]);
        let after = assign(&owners(&before), &["a", "c"]);
        for (was, is) in before.iter().zip(&after) {
            if was.as_deref() != Some("b") {
                assert_eq!(was, is, "a partition of a live member stays");
            }
        }
        assert_eq!(shares(&after, "a") + shares(&after, "c"), 16);
    }

    #[test]
    fn owners_not_among_the_members_count_as_gone() {
        let target = assign(&[Some("gone"), Some("a"), None], &["a", "b"]);
        assert_eq!(shares(&target, "gone"), 0);
        assert_eq!(target[1].as_deref(), Some("a"), "a keeps what it owns");
    }

    #[test]
    fn the_answer_is_the_same_whatever_the_order_of_members() {
        let owners = [Some("b"), None, Some("a"), Some("b"), Some("b"), None];
        assert_eq!(
            assign(&owners, &["a", "b", "c"]),
            assign(&owners, &["c", "b", "a", "b"])
        );
    }
}
