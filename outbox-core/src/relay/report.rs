//! What a round did, as [`Relay::process_batch`](super::Relay::process_batch) reports it.

/// What one round did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BatchReport {
    /// Events claimed.
    pub claimed: usize,
    /// Events the broker stored (duplicates included).
    pub published: usize,
    /// Of those, events the broker had already stored.
    pub duplicates: usize,
    /// Events rejected and rescheduled.
    pub retried: usize,
    /// Events moved to the dead-letter table.
    pub dead_lettered: usize,
    /// Events not published because the broker was unreachable.
    pub unavailable: usize,
    /// Events not published because an earlier event of their key failed in this round.
    pub held_back: usize,
    /// The broker's error when it was unreachable.
    pub last_error: Option<super::DeliveryError>,
}

impl BatchReport {
    /// Adds up the rounds of a drain; the last broker error stays.
    pub(super) fn add(&mut self, round: BatchReport) {
        self.claimed += round.claimed;
        self.published += round.published;
        self.duplicates += round.duplicates;
        self.retried += round.retried;
        self.dead_lettered += round.dead_lettered;
        self.unavailable += round.unavailable;
        self.held_back += round.held_back;
        if round.last_error.is_some() {
            self.last_error = round.last_error;
        }
    }
}
