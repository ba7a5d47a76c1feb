//! `axum-sse`: the comparison server a Rust developer would write first: tokio
//! (multi-thread) + axum, one `tokio::sync::broadcast` channel per topic (created on
//! demand, capacity 1024), `Sse` with a 15 s `KeepAlive`, and the same NDJSON ingest
//! socket as herald so one load generator drives both. Each event is encoded once per
//! subscriber, as `Sse` does; lagging subscribers skip what they missed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use futures_util::Stream;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

/// Broadcast capacity per topic, events.
const CAPACITY: usize = 1024;

/// tokio + axum SSE fan-out server, for comparison with herald.
#[derive(Parser, Debug)]
#[command(name = "axum-sse", version)]
struct Opt {
    /// Address for subscribers (GET /events/{topic}) and POST /publish/{topic}.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// NDJSON ingest address: lines {"topic":"t","data":"..."}.
    #[arg(long, default_value = "127.0.0.1:7071")]
    ingest: SocketAddr,
    /// tokio runtime worker threads (named axum-w{N}).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Keep-alive comment interval, seconds.
    #[arg(long, default_value_t = 15)]
    keepalive: u64,
}

#[derive(Clone)]
struct Msg {
    id: u64,
    event: Option<Arc<str>>,
    data: Arc<str>,
}

#[derive(Default)]
struct Hub {
    topics: Mutex<HashMap<String, broadcast::Sender<Msg>>>,
    next_id: AtomicU64,
}

impl Hub {
    fn sender(&self, topic: &str) -> broadcast::Sender<Msg> {
        let mut t = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        t.entry(topic.to_string())
            .or_insert_with(|| broadcast::channel(CAPACITY).0)
            .clone()
    }

    fn publish(&self, topic: &str, event: Option<&str>, data: &str) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        // No receivers is not an error: nobody is listening yet.
        let _ = self.sender(topic).send(Msg {
            id,
            event: event.map(Arc::from),
            data: Arc::from(data),
        });
        id
    }
}

struct AppState {
    hub: Hub,
    keepalive: Duration,
}

async fn subscribe(
    State(st): State<Arc<AppState>>,
    Path(topic): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = st.hub.sender(&topic).subscribe();
    let stream = BroadcastStream::new(rx).filter_map(|m| {
        let m = m.ok()?; // Lagged: skip what was missed.
        let mut ev = Event::default().id(m.id.to_string()).data(&*m.data);
        if let Some(e) = &m.event {
            ev = ev.event(&**e);
        }
        Some(Ok(ev))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(st.keepalive))
}

async fn publish(
    State(st): State<Arc<AppState>>,
    Path(topic): Path<String>,
    body: String,
) -> String {
    format!("{{\"id\":\"{}\"}}", st.hub.publish(&topic, None, &body))
}

#[derive(serde::Deserialize)]
struct Line {
    topic: String,
    data: String,
    event: Option<String>,
}

async fn ingest(listener: TcpListener, st: Arc<AppState>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let st = st.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            let mut n = 0u64;
            while let Ok(Some(line)) = lines.next_line().await {
                n += 1;
                match serde_json::from_str::<Line>(&line) {
                    Ok(l) => {
                        st.hub.publish(&l.topic, l.event.as_deref(), &l.data);
                    }
                    Err(e) => {
                        let reply = serde_json::json!({ "error": e.to_string(), "line": n });
                        let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                    }
                }
            }
            let _ = w.shutdown().await;
        });
    }
}

fn main() -> Result<()> {
    let opt = Opt::parse();
    herald_bench::procfs::raise_nofile();
    let next = AtomicUsize::new(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opt.workers.max(1))
        .thread_name_fn(move || format!("axum-w{}", next.fetch_add(1, Ordering::Relaxed)))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let st = Arc::new(AppState {
            hub: Hub::default(),
            keepalive: Duration::from_secs(opt.keepalive),
        });
        let sock = TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        sock.bind(opt.listen)?;
        let listener = sock
            .listen(4096)
            .with_context(|| format!("listening on {}", opt.listen))?;
        let ingest_l = TcpListener::bind(opt.ingest)
            .await
            .with_context(|| format!("ingest {}", opt.ingest))?;
        tokio::spawn(ingest(ingest_l, st.clone()));
        let app = Router::new()
            .route("/events/{topic}", get(subscribe))
            .route("/publish/{topic}", post(publish))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(st);
        eprintln!(
            "axum-sse listening on {} (ingest {}), {} worker(s)",
            opt.listen, opt.ingest, opt.workers
        );
        axum::serve(listener, app).await?;
        Ok(())
    })
}
