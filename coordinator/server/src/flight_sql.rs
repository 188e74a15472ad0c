//! The researchers' Flight SQL service.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::admission::Admission;
use crate::auth::Caller;
use crate::error::{CoordinatorError, random_hex};
use crate::federation::{Coordinator, FederatedAnswer};

/// Catalog and schema names the shared tables are listed under (DataFusion's defaults).
const CATALOG: &str = "datafusion";
const DB_SCHEMA: &str = "public";

static SQL_INFO: LazyLock<Option<SqlInfoData>> = LazyLock::new(|| {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "TrustQL coordinator");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    builder.append(SqlInfo::FlightSqlServerReadOnly, true);
    builder.append(SqlInfo::FlightSqlServerSql, true);
    builder.append(SqlInfo::FlightSqlServerSubstrait, false);
    builder.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    builder.append(SqlInfo::FlightSqlServerCancel, false);
    builder.build().ok()
});

type DataStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

struct Waiting {
    researcher: String,
    answer: FederatedAnswer,
    created: Instant,
}

/// Results waiting to be fetched, and queries running, per researcher.
#[derive(Default)]
struct Store {
    waiting: HashMap<String, Waiting>,
    running: HashMap<String, usize>,
}

impl Store {
    /// Forgets results older than `ttl`.
    fn expire(&mut self, ttl: Duration) {
        self.waiting.retain(|_, w| w.created.elapsed() < ttl);
    }
}

/// A researcher's place in their quota while their query runs; given back when dropped.
struct Slot<'a> {
    store: &'a Mutex<Store>,
    researcher: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // Poisoned or not, the count must come down, or the researcher stays busy forever.
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = store.running.get_mut(&self.researcher) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                store.running.remove(&self.researcher);
            }
        }
    }
}

/// Flight SQL for researchers: bearer tokens, federated statements, schema browsing.
pub struct ResearcherService {
    coordinator: Arc<Coordinator>,
    store: Mutex<Store>,
    admission: Admission,
}

impl ResearcherService {
    /// A service over `coordinator`.
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        ResearcherService {
            admission: Admission::new(coordinator.limits()),
            coordinator,
            store: Mutex::new(Store::default()),
        }
    }

    /// Takes a place in the caller's quota of waiting results before their query runs (so a
    /// refused query costs the trusts nothing), or refuses them as busy. One researcher's
    /// un-fetched results never keep another's from being answered.
    fn reserve(&self, caller: &Caller) -> Result<Slot<'_>, Status> {
        let limits = self.coordinator.limits();
        let mut store = self
            .store
            .lock()
            .map_err(|_| Status::internal("the result store failed"))?;
        store.expire(limits.result_ttl());
        let researcher = caller.researcher.as_str();
        let waiting = store
            .waiting
            .values()
            .filter(|w| w.researcher == researcher)
            .count();
        let running = store.running.get(researcher).copied().unwrap_or(0);
        if waiting + running >= limits.max_waiting_results {
            return Err(CoordinatorError::Busy {
                limit: limits.max_waiting_results,
                ttl_secs: limits.result_ttl_secs,
            }
            .to_status());
        }
        *store.running.entry(researcher.to_string()).or_default() += 1;
        Ok(Slot {
            store: &self.store,
            researcher: researcher.to_string(),
        })
    }

    /// The authenticated caller of `request`, a call of kind `call`; a refusal is audited.
    async fn caller<T>(&self, request: &Request<T>, call: &'static str) -> Result<Caller, Status> {
        self.coordinator
            .authenticate(request.metadata(), call, request.remote_addr())
            .await
            .map_err(|e| e.to_status())
    }

    /// Runs the query now and keeps the result for the DoGet that follows.
    async fn execute(&self, caller: &Caller, sql: &str) -> Result<FlightInfo, Status> {
        let _slot = self.reserve(caller)?;
        // Its turn at the trusts, taken fairly between researchers, or a clear "busy".
        let turn = self
            .admission
            .turn(&caller.researcher)
            .await
            .map_err(|e| e.to_status())?;
        let answer = self
            .coordinator
            .query(caller, sql)
            .await
            .map_err(|e| e.to_status())?;
        drop(turn);
        let handle = random_hex(16).map_err(|e| e.to_status())?;
        let rows: usize = answer.batches.iter().map(RecordBatch::num_rows).sum();
        let info = FlightInfo::new()
            .try_with_schema(answer.schema.as_ref())
            .map_err(|_| Status::internal("the result schema could not be encoded"))?
            .with_endpoint(
                FlightEndpoint::new().with_ticket(Ticket::new(
                    TicketStatementQuery {
                        statement_handle: handle.clone().into(),
                    }
                    .as_any()
                    .encode_to_vec(),
                )),
            )
            .with_total_records(rows as i64)
            .with_ordered(true)
            .with_app_metadata(
                answer
                    .coverage
                    .to_json()
                    .map_err(|_| Status::internal("the coverage report could not be encoded"))?
                    .into_bytes(),
            );
        let mut store = self
            .store
            .lock()
            .map_err(|_| Status::internal("the result store failed"))?;
        store.expire(self.coordinator.limits().result_ttl());
        // The slot, dropped after this, hands its place in the quota to the waiting result.
        store.waiting.insert(
            handle,
            Waiting {
                researcher: caller.researcher.clone(),
                answer,
                created: Instant::now(),
            },
        );
        Ok(info)
    }

    fn take(&self, caller: &Caller, handle: &[u8]) -> Result<FederatedAnswer, Status> {
        let handle =
            std::str::from_utf8(handle).map_err(|_| CoordinatorError::UnknownResult.to_status())?;
        let ttl = self.coordinator.limits().result_ttl();
        let mut store = self
            .store
            .lock()
            .map_err(|_| Status::internal("the result store failed"))?;
        match store.waiting.get(handle) {
            Some(w) if w.researcher == caller.researcher && w.created.elapsed() < ttl => {}
            _ => return Err(CoordinatorError::UnknownResult.to_status()),
        }
        store
            .waiting
            .remove(handle)
            .map(|w| w.answer)
            .ok_or_else(|| CoordinatorError::UnknownResult.to_status())
    }

    /// The FlightInfo of a metadata listing: its ticket is the command itself.
    async fn listing(
        &self,
        request: Request<FlightDescriptor>,
        command: Vec<u8>,
        schema: SchemaRef,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request, "get_flight_info (metadata listing)")
            .await?;
        let info = FlightInfo::new()
            .try_with_schema(schema.as_ref())
            .map_err(|_| Status::internal("a schema could not be encoded"))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(command)))
            .with_descriptor(request.into_inner());
        Ok(Response::new(info))
    }
}

fn stream_batches(schema: SchemaRef, batches: Vec<RecordBatch>) -> DataStream {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(stream::iter(batches.into_iter().map(Ok)))
        .map_err(|_| Status::internal("the result could not be encoded"));
    stream.boxed()
}

fn one_batch<E>(batch: Result<RecordBatch, E>) -> Result<Response<DataStream>, Status> {
    let batch = batch.map_err(|_| Status::internal("the listing could not be built"))?;
    Ok(Response::new(stream_batches(batch.schema(), vec![batch])))
}

#[tonic::async_trait]
impl FlightSqlService for ResearcherService {
    type FlightService = ResearcherService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        // Tokens travel as `authorization: Bearer …` on every call; a handshake only checks it.
        self.caller(&request, "do_handshake").await?;
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: Default::default(),
        };
        let mut response: Response<
            Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>,
        > = Response::new(stream::iter(vec![Ok(reply)]).boxed());
        if let Some(auth) = request.metadata().get("authorization") {
            response
                .metadata_mut()
                .insert("authorization", auth.clone());
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(&request, "get_flight_info_statement").await?;
        let info = self.execute(&caller, &query.query).await?;
        Ok(Response::new(info.with_descriptor(request.into_inner())))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self
            .caller(&request, "get_flight_info_prepared_statement")
            .await?;
        let sql = std::str::from_utf8(&query.prepared_statement_handle).map_err(|_| {
            Status::invalid_argument("not a prepared statement of this coordinator")
        })?;
        let info = self.execute(&caller, sql).await?;
        Ok(Response::new(info.with_descriptor(request.into_inner())))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = self.caller(&request, "do_get_statement").await?;
        let answer = self.take(&caller, &ticket.statement_handle)?;
        Ok(Response::new(stream_batches(answer.schema, answer.batches)))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.caller(&request, "do_action_create_prepared_statement")
            .await?;
        let schema = self
            .coordinator
            .result_schema(&query.query)
            .await
            .map_err(|e| e.to_status())?;
        let IpcMessage(schema_bytes) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|_| Status::internal("the result schema could not be encoded"))?;
        // The handle is the SQL itself: nothing to keep, and nodes always see the text.
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: schema_bytes,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.caller(&request, "do_action_close_prepared_statement")
            .await?;
        Ok(())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let data = SQL_INFO
            .as_ref()
            .ok_or_else(|| Status::internal("server info unavailable"))?;
        let schema = query.clone().into_builder(data).schema();
        self.listing(request, query.as_any().encode_to_vec(), schema)
            .await
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request, "do_get_sql_info").await?;
        let data = SQL_INFO
            .as_ref()
            .ok_or_else(|| Status::internal("server info unavailable"))?;
        one_batch(query.into_builder(data).build())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.listing(request, query.as_any().encode_to_vec(), schema)
            .await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request, "do_get_catalogs").await?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        one_batch(builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.listing(request, query.as_any().encode_to_vec(), schema)
            .await
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request, "do_get_schemas").await?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, DB_SCHEMA);
        one_batch(builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.listing(request, query.as_any().encode_to_vec(), schema)
            .await
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request, "do_get_tables").await?;
        let schema = self.coordinator.schema();
        let mut builder = query.into_builder();
        for table in schema.tables() {
            let arrow_schema = schema
                .arrow_schema(&table.name)
                .map_err(|_| Status::internal("the shared schema is inconsistent"))?;
            builder
                .append(CATALOG, DB_SCHEMA, &table.name, "TABLE", &arrow_schema)
                .map_err(|_| Status::internal("the listing could not be built"))?;
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.listing(request, query.as_any().encode_to_vec(), schema)
            .await
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request, "do_get_table_types").await?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        one_batch(builder.build())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
