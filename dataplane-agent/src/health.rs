//! healthCheckNodePort servers, answering as kube-proxy's service health server does: for each
//! LoadBalancer Service with externalTrafficPolicy Local, an HTTP server on its
//! healthCheckNodePort reports whether this node has ready endpoints of it (200) or not (503),
//! with the JSON body and the endpoint-weight header kube-proxy sends. Cloud load balancers use it
//! to send traffic only to nodes that can serve it.
use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use log::{info, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use crate::model::HealthCheck;

/// The HTTP response for one health check: status code and the full response bytes.
pub fn response(hc: Option<&HealthCheck>, proxy_healthy: bool) -> (u16, Vec<u8>) {
    let Some(hc) = hc else {
        let body = "404 page not found\n";
        return (404, format!("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes());
    };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        hc.namespace, hc.name, hc.local_endpoints, proxy_healthy
    );
    let (code, reason) = if hc.local_endpoints > 0 && proxy_healthy { (200, "OK") } else { (503, "Service Unavailable") };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        hc.local_endpoints,
        body.len()
    );
    (code, [head.into_bytes(), body.into_bytes()].concat())
}

/// The listeners, one per healthCheckNodePort, following the synced state.
#[derive(Default)]
pub struct HealthServers {
    state: Arc<RwLock<BTreeMap<u16, HealthCheck>>>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthServers {
    /// Updates what every port answers; opens listeners for new ports, closes gone ones.
    pub async fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>) {
        *self.state.write().unwrap() = checks.clone();
        self.listeners.retain(|port, task| {
            let keep = checks.contains_key(port);
            if !keep {
                task.abort();
                info!("healthCheckNodePort {port}: closed");
            }
            keep
        });
        for port in checks.keys() {
            if self.listeners.contains_key(port) {
                continue;
            }
            match TcpListener::bind(("0.0.0.0", *port)).await {
                Ok(l) => {
                    info!("healthCheckNodePort {port}: serving");
                    let state = self.state.clone();
                    let port = *port;
                    self.listeners.insert(port, tokio::spawn(serve(l, port, state)));
                }
                // Retried on the next sync that changes the checks.
                Err(e) => warn!("healthCheckNodePort {port}: cannot listen: {e}"),
            }
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for t in self.listeners.values() {
            t.abort();
        }
    }
}

async fn serve(l: TcpListener, port: u16, state: Arc<RwLock<BTreeMap<u16, HealthCheck>>>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            // Read the request head (bounded in size and time); any request gets the answer.
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            let (_, resp) = response(state.read().unwrap().get(&port), true);
            let _ = s.write_all(&resp).await;
            let _ = s.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let hc = HealthCheck { namespace: "edge".into(), name: "ingress".into(), local_endpoints: 2 };
        let (code, bytes) = response(Some(&hc), true);
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(code, 200);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("X-Load-Balancing-Endpoint-Weight: 2\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v, serde_json::json!({"service": {"namespace": "edge", "name": "ingress"}, "localEndpoints": 2, "serviceProxyHealthy": true}));
        let (code, _) = response(Some(&HealthCheck { local_endpoints: 0, ..hc }), true);
        assert_eq!(code, 503);
    }
}
