//! Starting, pinning and stopping the shards.
//!
//! [`Broker::start`] is the whole life of a broker up to "serving": validate the config, run
//! the preflight checks, bind one listener per shard (in the calling thread, so a busy port is
//! reported at once), then start one glommio `LocalExecutor` per selected core, pinned with
//! `Placement::Fixed`. Each shard joins the channel mesh, opens its store (recovering it) and
//! reports ready; `start` returns once every shard is ready, or stops them all and returns the
//! first error. The same handle embeds a broker in tests and in `ringmq-bench`.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::io::{FromRawFd, IntoRawFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::channel_mesh::{MeshBuilder, Receivers};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};

use crate::broker::Services;
use crate::config::{Config, ConfigError};
use crate::replication::epoch::EpochHistory;
use crate::replication::lease::Lease;
use crate::replication::state::Replication;
use crate::replication::Role;
use crate::server::metrics_http::{MetricsServer, MetricsSlots};
use crate::shard::cluster_routes::ClusterRoutes;
use crate::shard::context::ShardContext;
use crate::shard::mesh::{Mesh, MeshMsg, MESH_CHANNEL_CAPACITY};
use crate::shard::preflight::{self, PreflightError};
use crate::shard::topics::{TopicError, TopicTable};
use crate::storage::ShardStore;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("cores: {0}")]
    Cores(String),
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("cannot listen on {addr}: {source} (is another broker running? pick another --port)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the executor for shard {shard}: {reason}")]
    Executor { shard: usize, reason: String },
    #[error("shard {shard} failed: {reason}")]
    Shard { shard: usize, reason: String },
    #[error("replication: {0}")]
    Replication(String),
}

/// Time a stopping shard gives its connections to finish in-flight requests.
const DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Pending connections per listener before the kernel refuses more.
const LISTEN_BACKLOG: i32 = 1024;

/// A running broker: one pinned executor per shard.
pub struct Broker {
    handles: Vec<ExecutorJoinHandle<Result<(), String>>>,
    shutdown: Arc<AtomicBool>,
    addresses: Vec<SocketAddr>,
    data_dir: PathBuf,
    /// The Prometheus endpoint's thread, unless `metrics_listen = "off"`.
    metrics: Option<MetricsServer>,
}

/// What a member of a broker group on etcd shares with its control thread.
pub struct GroupHooks {
    /// The lease a master acks under.
    pub lease: Arc<Lease>,
    /// The cluster's routes, kept up to date by the control thread.
    pub routes: Arc<ClusterRoutes>,
}

impl Broker {
    /// Starts a broker and returns once every shard serves.
    pub fn start(config: Config) -> Result<Broker, BrokerError> {
        Self::start_with_shutdown(config, Arc::new(AtomicBool::new(false)))
    }

    /// Like [`Broker::start`], stopping when `shutdown` becomes true (a signal handler's flag).
    pub fn start_with_shutdown(
        config: Config,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Broker, BrokerError> {
        Self::start_in_group(config, shutdown, None)
    }

    /// Like [`Broker::start_with_shutdown`], for a member of a broker group on etcd: as a
    /// master it acks only while the group's lease holds (see `replication/lease.rs`), and
    /// it routes cluster topics as the group's routes say.
    pub fn start_in_group(
        mut config: Config,
        shutdown: Arc<AtomicBool>,
        group: Option<GroupHooks>,
    ) -> Result<Broker, BrokerError> {
        let (lease, routes) = match group {
            Some(g) => (Some(g.lease), Some(g.routes)),
            None => (None, None),
        };
        config.validate()?;
        let available: Vec<usize> = core_affinity::get_core_ids()
            .ok_or_else(|| BrokerError::Cores("cannot list the cores of this process".into()))?
            .into_iter()
            .map(|c| c.id)
            .collect();
        let cores = config
            .server
            .cores
            .resolve(&available)
            .map_err(BrokerError::Cores)?;
        let shards = cores.len();
        let report = preflight::check(
            &config.server.data_dir,
            shards,
            config.server.io_memory_bytes,
            config.server.allow_non_direct_io,
        )?;
        for w in &report.warnings {
            log::warn!("{w}");
        }
        let topics = Arc::new(TopicTable::load(&config.server.data_dir)?);
        config.replication.node_id = Some(
            crate::replication::epoch::node_id(&config.server.data_dir, config.replication.node_id)
                .map_err(|e| BrokerError::Replication(format!("node id: {e}")))?,
        );
        let start_fenced = check_peer(&config, shards)?;

        let mut listeners = Vec::with_capacity(shards);
        let mut addresses = Vec::with_capacity(shards);
        for shard in 0..shards {
            let port = if config.server.port == 0 {
                0
            } else {
                config
                    .server
                    .port
                    .checked_add(shard as u16)
                    .ok_or_else(|| {
                        BrokerError::Cores(format!(
                            "port {} + shard {shard} overflows",
                            config.server.port
                        ))
                    })?
            };
            let l = bind(&config.server.listen_host, port)?;
            addresses.push(l.local_addr().expect("a bound listener has an address"));
            listeners.push(l);
        }
        // Bound here like the shards' listeners, so a busy metrics port fails the start clearly.
        let metrics_listener = match config.server.metrics_listen.addr() {
            None => None,
            Some(addr) => Some(
                MetricsServer::bind(addr).map_err(|source| BrokerError::Bind {
                    addr: format!("{addr} (metrics; --metrics-listen off serves none)"),
                    source,
                })?,
            ),
        };
        let metrics_slots = metrics_listener.as_ref().map(|_| MetricsSlots::new(shards));
        let advertised: Arc<Vec<String>> = Arc::new(
            addresses
                .iter()
                .map(|a| format!("{}:{}", config.server.advertised_host(), a.port()))
                .collect(),
        );
        log::info!(
            "starting {shards} shard(s) on cores {cores:?}, kernel {}, listening on {:?}",
            report.kernel,
            advertised
        );
        log::info!("effective config:\n{}", config.to_toml());

        let config = Arc::new(config);
        let mesh = MeshBuilder::<MeshMsg, _>::full(shards, MESH_CHANNEL_CAPACITY);
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<(), String>)>();
        let mut handles = Vec::with_capacity(shards);
        for (shard, (core, listener)) in cores.iter().zip(listeners).enumerate() {
            let args = ShardArgs {
                shard,
                shards,
                config: config.clone(),
                mesh: mesh.clone(),
                listener_fd: listener.into_raw_fd(),
                addresses: advertised.clone(),
                shutdown: shutdown.clone(),
                topics: topics.clone(),
                ready: ready_tx.clone(),
                start_fenced,
                metrics: metrics_slots.clone(),
                lease: lease.clone(),
                routes: routes.clone(),
            };
            let mut builder =
                LocalExecutorBuilder::new(Placement::Fixed(*core)).name(&format!("shard-{shard}"));
            if config.server.io_memory_bytes > 0 {
                builder = builder.io_memory(config.server.io_memory_bytes as usize);
            }
            if config.server.spin_before_park_us > 0 {
                builder = builder
                    .spin_before_park(Duration::from_micros(config.server.spin_before_park_us));
            }
            match builder.spawn(move || run_shard(args)) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shutdown.store(true, Ordering::Release);
                    let _ = join_all(handles);
                    return Err(BrokerError::Executor {
                        shard,
                        reason: e.to_string(),
                    });
                }
            }
        }
        drop(ready_tx);

        let mut first_error = None;
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((shard, Err(reason))) => {
                    first_error.get_or_insert(BrokerError::Shard { shard, reason });
                    break;
                }
                Err(_) => {
                    first_error.get_or_insert(BrokerError::Shard {
                        shard: usize::MAX,
                        reason: "a shard exited before reporting ready".into(),
                    });
                    break;
                }
            }
        }
        let mut broker = Broker {
            handles,
            shutdown,
            addresses,
            data_dir: config.server.data_dir.clone(),
            metrics: None,
        };
        if let Some(e) = first_error {
            let _ = broker.stop();
            return Err(e);
        }
        if let (Some(listener), Some(slots)) = (metrics_listener, metrics_slots) {
            match MetricsServer::start(listener, slots, config.server.data_dir.clone()) {
                Ok(m) => {
                    log::info!("metrics: serving http://{}/metrics", m.address());
                    broker.metrics = Some(m);
                }
                Err(e) => {
                    let _ = broker.stop();
                    return Err(BrokerError::Executor {
                        shard: usize::MAX,
                        reason: format!("cannot start the metrics thread: {e}"),
                    });
                }
            }
        }
        log::info!("broker ready");
        Ok(broker)
    }

    /// The address of each shard's listener, by shard index.
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    /// Shard 0's address: the one a plain client dials.
    pub fn address(&self) -> SocketAddr {
        self.addresses[0]
    }

    /// Where the Prometheus endpoint listens (`None` when it is off).
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.address())
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Waits until the shutdown flag is set (by a signal) and every shard has stopped.
    pub fn wait(mut self) -> Result<(), BrokerError> {
        let stopped = join_all(std::mem::take(&mut self.handles));
        if let Some(m) = self.metrics.take() {
            m.stop();
        }
        stopped
    }

    /// Stops accepting, lets in-flight requests finish, closes the stores, joins the shards.
    pub fn stop(self) -> Result<(), BrokerError> {
        self.shutdown.store(true, Ordering::Release);
        self.wait()
    }
}

fn join_all(handles: Vec<ExecutorJoinHandle<Result<(), String>>>) -> Result<(), BrokerError> {
    let mut first = Ok(());
    for (shard, h) in handles.into_iter().enumerate() {
        let outcome = match h.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(BrokerError::Shard { shard, reason }),
            Err(e) => Err(BrokerError::Shard {
                shard,
                reason: format!("executor panicked or failed: {e}"),
            }),
        };
        if first.is_ok() {
            first = outcome;
        }
    }
    first
}

/// An exclusive listener. glommio's own `bind` sets SO_REUSEPORT, which would let a second
/// broker silently share our port; socket2 gives us SO_REUSEADDR only.
fn bind(host: &str, port: u16) -> Result<StdTcpListener, BrokerError> {
    let addr_text = format!("{host}:{port}");
    let err = |source| BrokerError::Bind {
        addr: addr_text.clone(),
        source,
    };
    let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&addr_text)
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("no address")))?;
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    Ok(socket.into())
}

/// Runs a broker until SIGINT or SIGTERM, as `ringmq broker` does: once it serves, prints
/// `shard N listening on ADDR` for each shard on stderr (tests and tools wait for that line).
pub fn run_until_signalled(config: Config) -> Result<(), String> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone())
            .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    }
    let broker = Broker::start_with_shutdown(config, shutdown).map_err(|e| e.to_string())?;
    if let Some(a) = broker.metrics_address() {
        eprintln!("metrics listening on {a}");
    }
    for (i, a) in broker.addresses().iter().enumerate() {
        eprintln!("shard {i} listening on {a}");
    }
    broker.wait().map_err(|e| e.to_string())
}

/// Before taking traffic: a slave's master must have our shard count; a master must not have
/// been superseded by its peer (a newer epoch there). An unreachable master is not an error
/// for a slave (it retries); a master whose peer does not answer starts fenced (the peer may
/// have been promoted meanwhile) unless `force_master`. Returns whether to start fenced.
fn check_peer(config: &Config, shards: usize) -> Result<bool, BrokerError> {
    let (peer, role) = match (&config.replication.master, &config.replication.peer) {
        (Some(m), _) if config.replication.role == Role::Slave => (m, Role::Slave),
        (_, Some(p)) if config.replication.role == Role::Master => (p, Role::Master),
        _ => return Ok(false),
    };
    let info = match crate::client::Admin::connect(peer).and_then(|a| a.broker_info()) {
        Ok(info) => info,
        Err(e) if role == Role::Master && !config.replication.force_master => {
            log::warn!(
                "replication: peer {peer} does not answer ({e}); starting FENCED (read-only, \
                 produce gets NOT_MASTER) until it answers; --force-master takes writes without it"
            );
            return Ok(true);
        }
        Err(e) => {
            let how = if role == Role::Master {
                "starting as master anyway (--force-master)"
            } else {
                "following it once it answers"
            };
            log::warn!("replication: peer {peer} does not answer ({e}); {how}");
            return Ok(false);
        }
    };
    if role == Role::Slave && info.shards as usize != shards {
        return Err(BrokerError::Replication(format!(
            "the master {peer} has {} shards and this slave would have {shards}: shard i \
             follows shard i, so run both with the same --cores",
            info.shards
        )));
    }
    if role == Role::Master && info.role == "master" {
        let ours = EpochHistory::load(&config.server.data_dir.join("shard-0"))
            .map_err(|e| BrokerError::Replication(e.to_string()))?
            .current();
        if info.epoch > ours {
            return Err(BrokerError::Replication(format!(
                "the peer {peer} is a master with epoch {} and ours is {ours}: this broker was \
                 superseded by a promotion; restart it with --role slave --master {peer}",
                info.epoch
            )));
        }
    }
    Ok(false)
}

struct ShardArgs {
    shard: usize,
    shards: usize,
    config: Arc<Config>,
    mesh: MeshBuilder<MeshMsg, glommio::channels::channel_mesh::Full>,
    listener_fd: RawFd,
    addresses: Arc<Vec<String>>,
    shutdown: Arc<AtomicBool>,
    topics: Arc<TopicTable>,
    ready: mpsc::Sender<(usize, Result<(), String>)>,
    /// A master whose peer did not answer at start (see `check_peer`).
    start_fenced: bool,
    /// Where the shard publishes its metrics snapshot, unless metrics are off.
    metrics: Option<Arc<MetricsSlots>>,
    /// In a broker group on etcd: the lease a master acks under.
    lease: Option<Arc<Lease>>,
    /// In a broker group on etcd: the cluster's routes.
    routes: Option<Arc<ClusterRoutes>>,
}

async fn run_shard(args: ShardArgs) -> Result<(), String> {
    let shard = args.shard;
    // SAFETY: the fd came from a listener we bound and gave up with into_raw_fd.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(args.listener_fd) };
    let listener_addr = listener.local_addr().ok();
    let (senders, receivers) = args
        .mesh
        .join()
        .await
        .map_err(|_| "cannot join the shard mesh".to_string())?;
    let dir = args.config.server.data_dir.join(format!("shard-{shard}"));
    let store = match ShardStore::open(&dir, args.config.storage.clone()).await {
        Ok((store, report)) => {
            log::info!("shard {shard}: opened {}: {report}", dir.display());
            store
        }
        Err(e) => {
            let reason = format!("cannot open the store in {}: {e}", dir.display());
            let _ = args.ready.send((shard, Err(reason.clone())));
            return Err(reason);
        }
    };
    let epochs = match EpochHistory::load(&dir) {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("cannot read the epoch history: {e}");
            let _ = args.ready.send((shard, Err(reason.clone())));
            return Err(reason);
        }
    };
    let ctx = Rc::new(
        ShardContext::new(
            shard,
            args.shards,
            args.config.clone(),
            store,
            Mesh::new(shard, senders),
            args.addresses,
            args.shutdown,
            args.topics,
        )
        .with_cluster_routes(args.routes),
    );
    let repl = Rc::new(Replication::new(ctx.clone()));
    repl.load_epochs(epochs);
    repl.set_lease(args.lease.clone());
    let confirmed = match crate::replication::confirmed::load(&dir) {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("cannot read the confirmed position: {e}");
            let _ = args.ready.send((shard, Err(reason.clone())));
            return Err(reason);
        }
    };
    match repl.role() {
        Role::Master => {
            // Without a saved position (a log older than the file) visibility starts at the
            // log end, as it always did.
            let end = ctx.store().watermarks().appended.0;
            match repl.become_master(confirmed.unwrap_or(end)).await {
                Ok(epoch) => log::info!(
                    "shard {shard}: master, epoch {}",
                    crate::replication::epoch::describe(epoch)
                ),
                Err(e) => {
                    let reason = format!("cannot record a new epoch: {e}");
                    let _ = args.ready.send((shard, Err(reason.clone())));
                    return Err(reason);
                }
            }
            if args.start_fenced {
                repl.fence_until_peer_heard(
                    args.config.replication.peer.as_deref().unwrap_or_default(),
                );
            }
            glommio::spawn_local(crate::replication::peer_watch::watch_peer(repl.clone())).detach();
        }
        Role::Slave => {
            repl.start_confirmed_at(confirmed.unwrap_or(0));
            let handle =
                glommio::spawn_local(crate::replication::follower::follow(repl.clone())).detach();
            *repl.follower.borrow_mut() = Some(handle);
        }
    }
    if let Some(c) = confirmed {
        repl.set_confirmed_saved(c);
    }
    glommio::spawn_local(crate::replication::confirmed::keep_saved(repl.clone())).detach();
    let services = Rc::new(Services::new(repl.clone()));
    spawn_mesh_receivers(&services, receivers);
    // Delivers delayed retries when due; idle on a slave.
    glommio::spawn_local(crate::broker::retry::run_scheduler(services.clone())).detach();
    glommio::spawn_local(crate::broker::groups::run_compaction(services.clone())).detach();
    glommio::spawn_local(crate::broker::topic_log::follow(services.clone())).detach();
    glommio::spawn_local(crate::broker::transactions::run_checker(services.clone())).detach();
    if let (Some(slots), Some(addr)) = (args.metrics.clone(), listener_addr) {
        glommio::spawn_local(crate::server::metrics_http::publish(
            services.clone(),
            slots,
            addr,
        ))
        .detach();
    }
    let _ = args.ready.send((shard, Ok(())));

    crate::server::listener::serve(services.clone(), listener).await;

    // Drain: connections stop reading at shutdown and finish what they have in flight.
    let mut waited_ms = 0;
    while ctx.open_connections() > 0 && waited_ms < DRAIN_TIMEOUT_MS {
        glommio::timer::sleep(Duration::from_millis(10)).await;
        waited_ms += 10;
    }
    if ctx.open_connections() > 0 {
        log::warn!(
            "shard {shard}: {} connection(s) still open after {DRAIN_TIMEOUT_MS} ms; closing anyway",
            ctx.open_connections()
        );
    }
    let follower = repl.follower.borrow_mut().take();
    if let Some(f) = follower {
        f.await;
    }
    crate::replication::confirmed::save_if_moved(&repl).await;
    let closed = ctx.store().close().await;
    ctx.mesh.close();
    closed.map_err(|e| format!("closing the store: {e}"))?;
    log::info!("shard {shard}: stopped");
    Ok(())
}

fn spawn_mesh_receivers(services: &Rc<Services>, mut receivers: Receivers<MeshMsg>) {
    for (_peer, rx) in receivers.streams() {
        let services = services.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                match msg {
                    MeshMsg::Request {
                        from,
                        call_id,
                        request,
                    } => {
                        let services = services.clone();
                        glommio::spawn_local(async move {
                            let reply =
                                crate::server::handlers::on_mesh_request(&services, request).await;
                            services.shard.mesh.reply(from, call_id, reply).await;
                        })
                        .detach();
                    }
                    MeshMsg::Reply { call_id, reply } => {
                        services.shard.mesh.on_reply(call_id, reply)
                    }
                }
            }
        })
        .detach();
    }
}
