//! A TCP proxy between one process and nats-server, for `txcoord chaos`: it forwards bytes
//! both ways and, on command, cuts every connection (refusing new ones for a while) or
//! delays every chunk it forwards. Each process of the chaos run talks to NATS through its
//! own proxy (one per node of a cluster: [`Proxies`]), so a fault can hit one process's
//! network and nothing else.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// What the proxy does to traffic right now.
#[derive(Default)]
struct Faults {
    /// New connections are refused until then.
    down_until: Option<Instant>,
    /// Every chunk waits this long before it is forwarded, until the instant.
    delay: Option<(Duration, Instant)>,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    port: u16,
    faults: Arc<Mutex<Faults>>,
    /// Bumped by [`Proxy::cut`]: every live connection ends when it changes.
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a loopback port of the system's choosing and forwards to `target_port`.
    pub async fn start(target_port: u16) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let (generation, _) = watch::channel(0u64);
        let task = tokio::spawn(accept(
            listener,
            target_port,
            faults.clone(),
            generation.clone(),
        ));
        Ok(Proxy {
            port,
            faults,
            generation,
            task,
        })
    }

    /// The URL a process connects to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Ends every connection now and refuses new ones for `down_for`.
    pub fn cut(&self, down_for: Duration) {
        if let Ok(mut f) = self.faults.lock() {
            f.down_until = Some(Instant::now() + down_for);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Delays every chunk by `by` for the next `lasting`.
    pub fn delay(&self, by: Duration, lasting: Duration) {
        if let Ok(mut f) = self.faults.lock() {
            f.delay = Some((by, Instant::now() + lasting));
        }
    }
}

/// One process's proxies, one to each server node, faulted together. The process is given
/// every proxy's URL, so when a node goes away it reconnects to another through its own
/// proxy (the nodes do not advertise their own URLs).
pub struct Proxies(Vec<Proxy>);

impl Proxies {
    /// A proxy to each of `target_ports`.
    pub async fn start(target_ports: &[u16]) -> std::io::Result<Proxies> {
        let mut all = Vec::with_capacity(target_ports.len());
        for &port in target_ports {
            all.push(Proxy::start(port).await?);
        }
        Ok(Proxies(all))
    }

    /// The URLs a process connects to, comma separated (what `--nats-url` takes).
    pub fn url(&self) -> String {
        self.0.iter().map(Proxy::url).collect::<Vec<_>>().join(",")
    }

    /// [`Proxy::cut`] on every one.
    pub fn cut(&self, down_for: Duration) {
        for p in &self.0 {
            p.cut(down_for);
        }
    }

    /// [`Proxy::delay`] on every one.
    pub fn delay(&self, by: Duration, lasting: Duration) {
        for p in &self.0 {
            p.delay(by, lasting);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn accept(
    listener: TcpListener,
    target_port: u16,
    faults: Arc<Mutex<Faults>>,
    generation: watch::Sender<u64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let refused = faults
            .lock()
            .map(|f| f.down_until.is_some_and(|t| Instant::now() < t))
            .unwrap_or(false);
        if refused {
            drop(client);
            continue;
        }
        let cut = generation.subscribe();
        tokio::spawn(forward(client, target_port, faults.clone(), cut));
    }
}

/// Forwards one connection until either side closes or the proxy cuts it.
async fn forward(
    client: TcpStream,
    target_port: u16,
    faults: Arc<Mutex<Faults>>,
    mut cut: watch::Receiver<u64>,
) {
    let Ok(Ok(server)) = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", target_port)),
    )
    .await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, &faults) => {}
        _ = pump(sr, cw, &faults) => {}
        _ = cut.changed() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: &Mutex<Faults>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = faults
            .lock()
            .ok()
            .and_then(|f| f.delay)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(by, _)| by);
        if let Some(by) = delay {
            tokio::time::sleep(by).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> u16 {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    async fn roundtrip(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        s.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await?;
        Ok(b.to_vec())
    }

    #[tokio::test]
    async fn forwards_cuts_and_delays() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let addr = ("127.0.0.1", proxy.port);
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut s).await.unwrap(), b"ping");

        // A cut ends the live connection, and new ones fail until the proxy is up again.
        proxy.cut(Duration::from_millis(300));
        let mut b = [0u8; 4];
        let ended = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
        assert!(matches!(ended, Ok(Ok(0)) | Ok(Err(_))), "{ended:?}");
        let mut refused = TcpStream::connect(addr).await.unwrap();
        assert!(roundtrip(&mut refused).await.is_err());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut s).await.unwrap(), b"ping");

        // A delay holds each chunk back (once each way).
        proxy.delay(Duration::from_millis(150), Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(roundtrip(&mut s).await.unwrap(), b"ping");
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
    }
}
