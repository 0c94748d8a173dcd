//! How the read queries reach PostgreSQL: on any client (each statement
//! prepared for the call, which works everywhere, PgBouncer in transaction mode
//! included), or in a pooled read transaction with the statements prepared
//! once per connection and reused ([`Prepared`]), which saves a round trip and
//! the planning on every call.

use std::future::Future;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, GenericClient, Row};
use uuid::Uuid;

/// Runs the read queries; [`Reader::client`] is what the keyring reads keys on.
pub trait Reader: Sync {
    /// The client underneath.
    type Client: GenericClient + Sync;

    /// The client underneath.
    fn client(&self) -> &Self::Client;

    /// The rows of `sql`.
    fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;

    /// At most one row of `sql`.
    fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send;

    /// `user_id`'s region when the caller already knows it (a store with
    /// several clusters found it in its routing index): the directory is then
    /// not read again. `None`: read the directory.
    fn region_hint(&self, _user_id: Uuid) -> Option<String> {
        None
    }
}

/// A reader that knows one user's region ([`Reader::region_hint`]).
pub struct Hinted<R> {
    inner: R,
    hint: Option<(Uuid, String)>,
}

impl<R> Hinted<R> {
    /// `inner`, told that `user_id` lives in `region` (when given).
    pub fn new(inner: R, user_id: Uuid, region: Option<String>) -> Self {
        Self {
            inner,
            hint: region.map(|r| (user_id, r)),
        }
    }
}

impl<R: Reader> Reader for Hinted<R> {
    type Client = R::Client;

    fn client(&self) -> &Self::Client {
        self.inner.client()
    }

    fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        self.inner.query(sql, params)
    }

    fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        self.inner.query_opt(sql, params)
    }

    fn region_hint(&self, user_id: Uuid) -> Option<String> {
        match &self.hint {
            Some((user, region)) if *user == user_id => Some(region.clone()),
            _ => self.inner.region_hint(user_id),
        }
    }
}

impl<C: GenericClient + Sync> Reader for C {
    type Client = C;

    fn client(&self) -> &C {
        self
    }

    async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        GenericClient::query(self, sql, params).await
    }

    async fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        GenericClient::query_opt(self, sql, params).await
    }
}

/// A pooled read transaction whose statements are prepared once per
/// connection (the pool's statement cache). Only where every transaction of a
/// connection reaches the same server session: PostgreSQL directly, or a
/// PgBouncer that keeps prepared statements (1.21+ with
/// `max_prepared_statements`, as the operator configures it).
pub struct Prepared<'a, 't>(pub &'a deadpool_postgres::Transaction<'t>);

impl<'t> Reader for Prepared<'_, 't> {
    type Client = tokio_postgres::Transaction<'t>;

    fn client(&self) -> &Self::Client {
        self.0
    }

    async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query(&statement, params).await
    }

    async fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query_opt(&statement, params).await
    }
}

/// A pooled read transaction, its statements prepared once per connection or
/// for each call, as the server behind the pool allows.
pub enum ReadTx<'a, 't> {
    /// Statements prepared once per connection.
    Cached(Prepared<'a, 't>),
    /// Statements prepared for each call.
    Plain(&'a tokio_postgres::Transaction<'t>),
}

impl<'a, 't> ReadTx<'a, 't> {
    /// `cached`: every transaction of the connection reaches the same session.
    pub fn new(tx: &'a deadpool_postgres::Transaction<'t>, cached: bool) -> Self {
        if cached {
            ReadTx::Cached(Prepared(tx))
        } else {
            ReadTx::Plain(tx)
        }
    }
}

impl<'t> Reader for ReadTx<'_, 't> {
    type Client = tokio_postgres::Transaction<'t>;

    fn client(&self) -> &Self::Client {
        match self {
            ReadTx::Cached(p) => p.client(),
            ReadTx::Plain(t) => t,
        }
    }

    async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        match self {
            ReadTx::Cached(p) => p.query(sql, params).await,
            ReadTx::Plain(t) => GenericClient::query(*t, sql, params).await,
        }
    }

    async fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        match self {
            ReadTx::Cached(p) => p.query_opt(sql, params).await,
            ReadTx::Plain(t) => GenericClient::query_opt(*t, sql, params).await,
        }
    }
}
