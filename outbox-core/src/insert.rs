//! Multi-row `INSERT`s that stay under every backend's limit of bind values
//! per statement.

use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, EntityTrait, Iterable};

/// Bind values one statement may carry: SQLite's default limit, the lowest
/// (PostgreSQL and MySQL take 65,535).
const MAX_BIND_VALUES: usize = 32_766;

/// Inserts `rows`, as many to a statement as the limit allows for a row of
/// every column of the table.
pub(crate) async fn insert_all<A>(
    conn: &impl ConnectionTrait,
    mut rows: Vec<A>,
) -> Result<(), DbErr>
where
    A: ActiveModelTrait + Send,
{
    let columns = <A::Entity as EntityTrait>::Column::iter().count().max(1);
    let per_statement = MAX_BIND_VALUES / columns;
    while !rows.is_empty() {
        let rest = rows.split_off(rows.len().min(per_statement));
        A::Entity::insert_many(rows)
            .exec_without_returning(conn)
            .await?;
        rows = rest;
    }
    Ok(())
}
