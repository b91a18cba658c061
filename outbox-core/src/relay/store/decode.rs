//! Claimed rows into [`Model`]s, read by position.
//!
//! Decoding 2,000 claimed rows took 2.2 ms of the relay's thread (median,
//! a fifth of its CPU), half of it sqlx checking each column's type against
//! the Rust type asked for, row after row. Every row of a result set has the
//! same column types, so on PostgreSQL (feature `postgres`) only a claim's
//! first row is decoded with the checks: 1.1 ms.

use sea_orm::{DbErr, QueryResult, TryGetable};

use crate::entity::outbox_message::Model;

/// One claimed event and where its row is (on PostgreSQL), which the
/// settle deletes by. One record, so that an event and its row's locator
/// cannot part.
#[derive(Debug)]
pub(in crate::relay) struct Claimed {
    pub event: Model,
    pub row: Option<RowLocation>,
}

/// Where a claimed row is: its `ctid` within its table, which is
/// `outbox_messages` itself unless the row lives in a partition (or a table
/// inheriting from it), named then as PostgreSQL quotes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::relay) struct RowLocation {
    pub table: Option<String>,
    pub ctid: String,
}

/// Decodes a claim's rows, and where they are if `with_ctid`.
pub(super) fn decode_all(rows: &[QueryResult], with_ctid: bool) -> Result<Vec<Claimed>, DbErr> {
    let mut claimed = Vec::with_capacity(rows.len());
    let Some((first, rest)) = rows.split_first() else {
        return Ok(claimed);
    };
    claimed.push(Claimed::read(first, with_ctid)?);
    for row in rest {
        // The first row was read with the checks: its column types fit every row.
        #[cfg(feature = "postgres")]
        if let Some(row) = row.try_as_pg_row() {
            claimed.push(Claimed::read(&Unchecked(row), with_ctid)?);
            continue;
        }
        claimed.push(Claimed::read(row, with_ctid)?);
    }
    Ok(claimed)
}

impl Claimed {
    fn read(row: &impl Columns, with_ctid: bool) -> Result<Self, DbErr> {
        Ok(Self {
            event: decode(row)?,
            row: if with_ctid {
                Some(RowLocation {
                    table: row.at(TABLE)?,
                    ctid: row.at(CTID)?,
                })
            } else {
                None
            },
        })
    }
}

const CTID: usize = 14;
const TABLE: usize = 15;

/// A row's columns by position. Reading by name cost a search of the
/// column list per field, an eighth of the relay's CPU.
trait Columns {
    fn at<T: Field>(&self, index: usize) -> Result<T, DbErr>;
}

/// A column's Rust type: readable through SeaORM and, with the `postgres`
/// feature, straight through sqlx.
#[cfg(feature = "postgres")]
trait Field:
    TryGetable + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>
{
}

#[cfg(feature = "postgres")]
impl<T> Field for T where
    T: TryGetable + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>
{
}

#[cfg(not(feature = "postgres"))]
trait Field: TryGetable {}

#[cfg(not(feature = "postgres"))]
impl<T: TryGetable> Field for T {}

/// With type checks, on any backend.
impl Columns for QueryResult {
    fn at<T: Field>(&self, index: usize) -> Result<T, DbErr> {
        self.try_get_by_index(index)
    }
}

/// A PostgreSQL row read without type checks (values are still validated:
/// lengths, UTF-8, NULL into a non-optional field).
#[cfg(feature = "postgres")]
struct Unchecked<'a>(&'a sqlx::postgres::PgRow);

#[cfg(feature = "postgres")]
impl Columns for Unchecked<'_> {
    fn at<T: Field>(&self, index: usize) -> Result<T, DbErr> {
        sqlx::Row::try_get_unchecked(self.0, index)
            .map_err(|error| DbErr::Type(format!("outbox column {index}: {error}")))
    }
}

/// The columns in [`sea_orm::Iterable::iter`] order of the entity's
/// `Column`, as the claim selects them.
fn decode(row: &impl Columns) -> Result<Model, DbErr> {
    Ok(Model {
        id: row.at(0)?,
        event_type: row.at(1)?,
        event_version: row.at(2)?,
        exchange: row.at(3)?,
        subject: row.at(4)?,
        partition_key: row.at(5)?,
        payload: row.at(6)?,
        headers: row.at(7)?,
        content_type: row.at(8)?,
        created_at: row.at(9)?,
        attempts: row.at(10)?,
        next_attempt_at: row.at(11)?,
        last_error: row.at(12)?,
        delivered_at: row.at(13)?,
    })
}

#[cfg(test)]
mod tests {
    use sea_orm::{IdenStatic, Iterable};

    use crate::entity::outbox_message::Column;

    /// [`super::decode`] reads by position; this is the order it assumes.
    #[test]
    fn columns_are_selected_in_the_order_decode_reads_them() {
        let selected: Vec<&str> = Column::iter().map(|c| c.as_str()).collect();
        assert_eq!(
            selected,
            [
                "id",
                "event_type",
                "event_version",
                "exchange",
                "subject",
                "partition_key",
                "payload",
                "headers",
                "content_type",
                "created_at",
                "attempts",
                "next_attempt_at",
                "last_error",
                "delivered_at",
            ]
        );
        assert_eq!(selected.len(), super::CTID, "the ctid comes after them");
        assert_eq!(super::TABLE, super::CTID + 1, "then the table");
    }
}
