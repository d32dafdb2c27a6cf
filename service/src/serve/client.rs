//! A minimal client of the ingest API (HTTP/1.1 over loopback TCP, one connection per
//! request), for `fedsend demo` and the tests; a homeserver would use its own HTTP stack.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Talks to one running service.
#[derive(Clone, Debug)]
pub struct IngestClient {
    /// The API address.
    pub addr: SocketAddr,
    /// The bearer token (`None` sends no Authorization header).
    pub token: Option<String>,
}

/// An answer: status and body (JSON when it parses, else a string value).
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Value,
}

impl IngestClient {
    /// `method path` with an optional JSON body; `Err` only when no HTTP answer came back.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, String> {
        let body = body.map(Value::to_string);
        self.call_raw(method, path, body.as_deref()).await
    }

    /// Like [`call`](Self::call) with the body as raw text (tests send malformed JSON).
    pub async fn call_raw(&self, method: &str, path: &str, body: Option<&str>) -> Result<Answer, String> {
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr).await.map_err(|e| format!("connect {}: {e}", self.addr))?;
            let body = body.unwrap_or("");
            let auth = self.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                self.addr,
                body.len()
            );
            stream.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.map_err(|e| format!("read: {e}"))?;
            parse_response(&raw)
        };
        tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .map_err(|_| format!("{method} {path}: no answer in 60 s"))?
    }
}

fn parse_response(raw: &[u8]) -> Result<Answer, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("response without a header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    let text = String::from_utf8_lossy(&body).to_string();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk header")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}
