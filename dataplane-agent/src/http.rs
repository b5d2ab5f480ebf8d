//! The little HTTP/1.1 the agent serves (health checks, metrics): one request per connection,
//! head read with a size and time bound, answer, close.
use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Reads a request head and returns its path (without the query), or None when the peer sent
/// no complete request line in time.
pub async fn read_path(s: &mut TcpStream) -> Option<String> {
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
    let head = String::from_utf8_lossy(&buf[..n]);
    let target = head.lines().next()?.split_whitespace().nth(1)?;
    Some(target.split('?').next().unwrap_or(target).to_string())
}

/// A complete response with `Connection: close`.
pub fn response(code: u16, content_type: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `answer(path)` to every connection on `l`, forever.
pub async fn serve<F, Fut>(l: TcpListener, answer: F)
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Vec<u8>> + Send,
{
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        let answer = answer.clone();
        tokio::spawn(async move {
            let path = read_path(&mut s).await.unwrap_or_default();
            let resp = answer(path).await;
            let _ = s.write_all(&resp).await;
            let _ = s.shutdown().await;
        });
    }
}
