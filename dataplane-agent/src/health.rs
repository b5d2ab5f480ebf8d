//! healthCheckNodePort servers, answering as kube-proxy's service health server does: for each
//! LoadBalancer Service with externalTrafficPolicy Local, an HTTP server on its
//! healthCheckNodePort reports whether this node has ready endpoints of it (200) or not (503),
//! with the JSON body and the endpoint-weight header kube-proxy sends. Cloud load balancers use it
//! to send traffic only to nodes that can serve it.
use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{model::HealthCheck, observe::Observed};

/// The HTTP response for one health check: status code and the full response bytes.
pub fn response(hc: Option<&HealthCheck>, proxy_healthy: bool) -> (u16, Vec<u8>) {
    let Some(hc) = hc else {
        return (404, crate::http::response(404, "text/plain; charset=utf-8", "", "404 page not found\n"));
    };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        hc.namespace, hc.name, hc.local_endpoints, proxy_healthy
    );
    let code = if hc.local_endpoints > 0 && proxy_healthy { 200 } else { 503 };
    let weight = format!("X-Load-Balancing-Endpoint-Weight: {}\r\n", hc.local_endpoints);
    (code, crate::http::response(code, "application/json", &weight, &body))
}

/// The listeners, one per healthCheckNodePort, following the synced state.
pub struct HealthServers {
    state: Arc<RwLock<BTreeMap<u16, HealthCheck>>>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
    /// The proxy's own health (kube-proxy's `serviceProxyHealthy`).
    observed: Arc<Observed>,
}

impl HealthServers {
    pub fn new(observed: Arc<Observed>) -> Self {
        HealthServers { state: Default::default(), listeners: BTreeMap::new(), observed }
    }

    /// Updates what every port answers; opens listeners for new ports, closes gone ones.
    pub async fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>) {
        *self.state.write().unwrap() = checks.clone();
        self.listeners.retain(|port, task| {
            let keep = checks.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "healthCheckNodePort closed");
            }
            keep
        });
        for port in checks.keys() {
            if self.listeners.contains_key(port) {
                continue;
            }
            match TcpListener::bind(("0.0.0.0", *port)).await {
                Ok(l) => {
                    info!(port, "healthCheckNodePort serving");
                    let (state, observed, port) = (self.state.clone(), self.observed.clone(), *port);
                    self.listeners.insert(
                        port,
                        tokio::spawn(crate::http::serve(l, move |_path| {
                            let (state, observed) = (state.clone(), observed.clone());
                            async move { response(state.read().unwrap().get(&port), observed.healthy()).1 }
                        })),
                    );
                }
                // Retried on the next sync that changes the checks.
                Err(e) => warn!(port, error = %e, "healthCheckNodePort: cannot listen"),
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
