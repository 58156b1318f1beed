//! The Flight SQL calls: statements, prepared statements (with parameters), and the catalog
//! calls BI tools browse with (catalogs, schemas, tables, table types, SQL info).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    Any, CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use datafusion::common::ScalarValue;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SessionContext};
use futures_util::{Stream, StreamExt, TryStreamExt};
use prost::Message as _;
use sha2::Digest as _;
use tonic::{Request, Response, Status, Streaming};

use super::ServeConfig;
use super::auth::Tokens;
use super::handle::Prepared;

/// The catalog and schema the lake's tables are in (DataFusion's defaults, so
/// `datafusion.public.traffic_windows` and `traffic_windows` both work).
const CATALOG: &str = "datafusion";
const SCHEMA: &str = "public";

/// How long one registration of the lake's tables serves queries.
const REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// The last registration of the lake's tables, and when it was made.
type Registered = Option<(Instant, SessionContext, Vec<String>)>;

type DataStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

/// The Flight SQL service over one lake.
#[derive(Clone)]
pub(super) struct LakeService {
    cfg: Arc<ServeConfig>,
    tokens: Tokens,
    info: Arc<SqlInfoData>,
    lake: Arc<tokio::sync::Mutex<Registered>>,
    /// Where every query runs: the memory pool they share.
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
}

impl LakeService {
    pub(super) fn new(cfg: ServeConfig) -> Result<Self, super::ServeError> {
        // one pool for every query: together they hold at most `max_memory`, and a query
        // over it fails (no spilling: the disk is not a second, unbounded pool)
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(datafusion::execution::memory_pool::FairSpillPool::new(cfg.max_memory)))
            .with_disk_manager_builder(
                datafusion::execution::disk_manager::DiskManagerBuilder::default()
                    .with_mode(datafusion::execution::disk_manager::DiskManagerMode::Disabled),
            )
            .build_arc()?;
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "citystream");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::FlightSqlServerStatementTimeout, cfg.max_time.as_secs().min(i32::MAX as u64) as i32);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        b.append(SqlInfo::SqlDdlCatalog, false);
        b.append(SqlInfo::SqlDdlSchema, false);
        b.append(SqlInfo::SqlDdlTable, false);
        let info = Arc::new(b.build().expect("static SQL info"));
        Ok(Self {
            tokens: Tokens::new(cfg.tokens.clone()),
            cfg: Arc::new(cfg),
            info,
            lake: Default::default(),
            runtime,
        })
    }

    /// The lake's tables: registered afresh when the last registration is older than
    /// [`REFRESH`] (so new tables, partitions and files are seen within it), else that one —
    /// a statement's GetFlightInfo and DoGet, and a burst of queries, share one listing.
    async fn context(&self) -> Result<(SessionContext, Vec<String>), Status> {
        let mut cached = self.lake.lock().await;
        if let Some((at, ctx, names)) = cached.as_ref()
            && at.elapsed() < REFRESH
        {
            return Ok((ctx.clone(), names.clone()));
        }
        let (ctx, names) = crate::sql::context_for_clients(&self.cfg.lake, self.runtime.clone())
            .await
            .map_err(|e| Status::internal(format!("reading the lake: {e}")))?;
        *cached = Some((Instant::now(), ctx.clone(), names.clone()));
        Ok((ctx, names))
    }

    /// Plans `sql` read-only, with `params` bound; cut one row past the limit, so a result over
    /// it is noticed without computing all of it.
    async fn plan(&self, sql: &str, params: Option<RecordBatch>) -> Result<DataFrame, Status> {
        let (ctx, _) = self.context().await?;
        let options = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
        let planning = async {
            let mut df =
                ctx.sql_with_options(sql, options).await.map_err(|e| Status::invalid_argument(e.to_string()))?;
            if let Some(p) = params {
                let values = (0..p.num_columns())
                    .map(|i| ScalarValue::try_from_array(p.column(i), 0))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
                df = df.with_param_values(values).map_err(|e| Status::invalid_argument(e.to_string()))?;
            }
            Ok::<_, Status>(df)
        };
        tokio::time::timeout(self.cfg.max_time, planning).await.map_err(|_| self.too_slow())?
    }

    fn too_slow(&self) -> Status {
        Status::deadline_exceeded(format!(
            "the query ran longer than the server's limit of {} s; narrow it (a WHERE on date/hour, an aggregate)",
            self.cfg.max_time.as_secs_f64()
        ))
    }

    /// Runs `sql` and streams its result: at most `max_rows` rows (more is an error that says
    /// so) within `max_time`.
    async fn run(&self, who: &str, sql: &str, params: Option<RecordBatch>) -> Result<Response<DataStream>, Status> {
        let started = Instant::now();
        let max_rows = self.cfg.max_rows;
        let df = self.plan(sql, params).await?;
        // EXPLAIN and DESCRIBE must stay the root of their plan (and are short anyway)
        let df = match df.logical_plan() {
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::DescribeTable(_) => df,
            _ => df.limit(0, Some(max_rows.saturating_add(1) as usize)).map_err(|e| Status::internal(e.to_string()))?,
        };
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let max_memory = self.cfg.max_memory;
        let failed = move |e: datafusion::error::DataFusionError| match e.find_root() {
            datafusion::error::DataFusionError::ResourcesExhausted(_) => Status::resource_exhausted(format!(
                "the query needs more memory than the server's limit of {} MiB; add a WHERE (date, hour) or \
                 aggregate to fewer groups",
                max_memory / (1024 * 1024)
            )),
            _ => Status::internal(e.to_string()),
        };
        let batches = df.execute_stream().await.map_err(failed)?;
        let deadline = tokio::time::Instant::now() + self.cfg.max_time;
        let too_slow = self.too_slow();
        let query = fingerprint(sql);
        let who = who.to_owned();
        // (input, rows so far, done)
        let limited = futures_util::stream::unfold((batches, 0u64, false), move |(mut input, rows, done)| {
            let too_slow = too_slow.clone();
            let (who, query) = (who.clone(), query.clone());
            async move {
                if done {
                    return None;
                }
                let next = match tokio::time::timeout_at(deadline, input.next()).await {
                    Err(_) => return Some((Err(FlightError::Tonic(Box::new(too_slow))), (input, rows, true))),
                    Ok(n) => n,
                };
                match next {
                    None => {
                        tracing::info!(who, query, rows, ms = started.elapsed().as_millis() as u64, "flight sql query");
                        None
                    }
                    Some(Err(e)) => {
                        // the error's text may quote the lake's values: not logged
                        tracing::info!(who, query, rows, "flight sql query failed");
                        Some((Err(FlightError::Tonic(Box::new(failed(e)))), (input, rows, true)))
                    }
                    Some(Ok(b)) => {
                        let total = rows + b.num_rows() as u64;
                        if total > max_rows {
                            let msg = format!(
                                "the result has more than the server's limit of {max_rows} rows; add a LIMIT, a WHERE or \
                                 an aggregate"
                            );
                            return Some((
                                Err(FlightError::Tonic(Box::new(Status::resource_exhausted(msg)))),
                                (input, total, true),
                            ));
                        }
                        Some((Ok(b), (input, total, false)))
                    }
                }
            }
        });
        let stream = FlightDataEncoderBuilder::new().with_schema(schema).build(limited).map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    /// A FlightInfo for `sql` with one endpoint whose ticket is `ticket`.
    async fn info_for(
        &self,
        sql: &str,
        params: Option<RecordBatch>,
        ticket: Vec<u8>,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let df = self.plan(sql, params).await?;
        let schema = df.schema().as_arrow().clone();
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_descriptor(descriptor)
            .with_ordered(true);
        Ok(Response::new(info))
    }

    /// A FlightInfo for a catalog call answered with `schema`.
    fn catalog_info(
        &self,
        cmd: Any,
        schema: &arrow::datatypes::Schema,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(cmd.encode_to_vec())))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }
}

/// Streams one batch.
fn one_batch<E: Into<FlightError> + Send + 'static>(
    schema: SchemaRef,
    batch: Result<RecordBatch, E>,
) -> Response<DataStream> {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures_util::stream::once(async move { batch.map_err(Into::into) }))
        .map_err(Status::from);
    Response::new(Box::pin(stream))
}

/// A short fingerprint of a query for logs (its text may hold anything a client typed).
fn fingerprint(sql: &str) -> String {
    let d = sha2::Sha256::digest(sql.as_bytes());
    d[..6].iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl FlightSqlService for LakeService {
    type FlightService = LakeService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        let (who, token) = self.tokens.handshake(&request)?;
        tracing::info!(who = who.name, "flight sql: handshake");
        let reply = HandshakeResponse { protocol_version: 0, payload: token.clone().into() };
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(futures_util::stream::iter([Ok(reply)])));
        let value = format!("Bearer {token}").parse().map_err(|_| Status::internal("token is not a header value"))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.tokens.check(&request)?;
        let ticket = TicketStatementQuery { statement_handle: query.query.clone().into_bytes().into() };
        self.info_for(&query.query, None, ticket.as_any().encode_to_vec(), request.into_inner()).await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = self.tokens.check(&request)?;
        let sql = std::str::from_utf8(&ticket.statement_handle)
            .map_err(|_| Status::invalid_argument("ticket is not UTF-8"))?;
        self.run(&who.name, sql, None).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.tokens.check(&request)?;
        // planned without parameters: a statement with placeholders plans, their types unknown
        let df = self.plan(&query.query, None).await?;
        let schema = df.schema().as_arrow().clone();
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: Prepared::new(query.query).encode().into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        // handles are stateless: nothing to free
        self.tokens.check(&request)?;
        Ok(())
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.tokens.check(&request)?;
        let mut prepared = Prepared::decode(&query.prepared_statement_handle)?;
        let mut batches = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
            request.into_inner().map_err(FlightError::from),
        );
        if let Some(batch) = batches.try_next().await?
            && batch.num_rows() > 0
        {
            prepared.bind(&batch)?;
        }
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(prepared.encode().into()) })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.tokens.check(&request)?;
        let prepared = Prepared::decode(&cmd.prepared_statement_handle)?;
        let params = prepared.params()?;
        self.info_for(&prepared.sql, params, cmd.as_any().encode_to_vec(), request.into_inner()).await
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = self.tokens.check(&request)?;
        let prepared = Prepared::decode(&cmd.prepared_statement_handle)?;
        let params = prepared.params()?;
        self.run(&who.name, &prepared.sql, params).await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.tokens.check(&request)?;
        let schema = query.into_builder().schema();
        self.catalog_info(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tokens.check(&request)?;
        let mut b = query.into_builder();
        b.append(CATALOG);
        Ok(one_batch(b.schema(), b.build()))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.tokens.check(&request)?;
        let schema = query.clone().into_builder().schema();
        self.catalog_info(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tokens.check(&request)?;
        let mut b = query.into_builder();
        b.append(CATALOG, SCHEMA);
        Ok(one_batch(b.schema(), b.build()))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.tokens.check(&request)?;
        let schema = query.clone().into_builder().schema();
        self.catalog_info(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tokens.check(&request)?;
        let (ctx, names) = self.context().await?;
        let mut b = query.into_builder();
        for name in names {
            let table = ctx.table(name.as_str()).await.map_err(|e| Status::internal(e.to_string()))?;
            let schema = table.schema().as_arrow().clone();
            b.append(CATALOG, SCHEMA, &name, "TABLE", &schema).map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(one_batch(b.schema(), b.build()))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.tokens.check(&request)?;
        let schema = query.into_builder().schema();
        self.catalog_info(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tokens.check(&request)?;
        let mut b = query.into_builder();
        b.append("TABLE");
        Ok(one_batch(b.schema(), b.build()))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.tokens.check(&request)?;
        let schema = query.clone().into_builder(&self.info).schema();
        self.catalog_info(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tokens.check(&request)?;
        let b = query.into_builder(&self.info);
        Ok(one_batch(b.schema(), b.build()))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
