//! Mail delivery (file outbox, SMTP against a real local server) and the
//! breached-password range API client (against a local test server).
//!
//! The SMTP tests need Python 3 with `aiosmtpd` (`pip install aiosmtpd`); they run
//! `scripts/smtp-sink.py` and fail, never skip, when it cannot start. Set
//! `VAULTPAY_TEST_PYTHON` to use another interpreter than `python3`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use vaultpay_auth::hibp::{HibpClient, HibpConfig, HibpVerdict};
use vaultpay_auth::mail::{
    self, FileOutbox, MailConfig, MailError, Mailer, Message, SmtpConfig, SmtpMailer, SmtpTls,
};
use vaultpay_core::secret::Secret;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "vaultpay-{label}-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A parsed RFC 5322 message: unfolded headers (in order) and the body.
struct Eml {
    headers: Vec<(String, String)>,
    body: String,
}

impl Eml {
    /// Parses `raw` strictly enough to catch malformed output: CRLF line endings,
    /// `Name: value` header lines with folded continuations, a blank line, a body.
    fn parse(raw: &str) -> Self {
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .expect("no blank line between headers and body");
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n") {
            assert!(!line.contains('\n'), "bare LF in header line {line:?}");
            if line.starts_with([' ', '\t']) {
                let last = headers.last_mut().expect("continuation before any header");
                last.1.push_str(line);
            } else {
                let (name, value) = line.split_once(':').expect("header without a colon");
                assert!(
                    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()),
                    "bad header name {name:?}"
                );
                headers.push((name.to_owned(), value.trim().to_owned()));
            }
        }
        Self {
            headers,
            body: body.to_owned(),
        }
    }

    /// The single value of header `name`; panics when absent or repeated.
    fn header(&self, name: &str) -> &str {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(values.len(), 1, "header {name}: {values:?}");
        values[0]
    }
}

fn eml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(name.ends_with(".eml"), "stray file in the outbox: {name}");
    }
    files
}

fn assert_outbox_name(path: &Path) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let stem = name.strip_suffix(".eml").unwrap();
    let (micros, id) = stem.split_once('-').unwrap();
    assert_eq!(micros.len(), 16, "{name}");
    assert!(micros.bytes().all(|b| b.is_ascii_digit()), "{name}");
    uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn message(to: &str, subject: &str, text: &str) -> Message {
    Message {
        to: to.to_owned(),
        subject: subject.to_owned(),
        text: text.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// File outbox
// ---------------------------------------------------------------------------

#[tokio::test]
async fn file_outbox_writes_a_parseable_eml() {
    let tmp = TempDir::new("outbox");
    let data_dir = tmp.path().join("data");
    let mailer = mail::build(&MailConfig::default(), &data_dir).unwrap();
    let link = format!(
        "http://127.0.0.1:8080/v1/auth/verify-email?token={}&next=%2Fme",
        "Zm9vYmFy".repeat(8)
    );
    let text = format!("Hello Alice,\n\nconfirm your address: {link}\n\nGrüße, VaultPay\n");
    mailer
        .send(message(
            "Alice Example <alice@example.com>",
            "Verify your email address",
            &text,
        ))
        .await
        .unwrap();

    let outbox = data_dir.join("mail");
    let files = eml_files(&outbox);
    assert_eq!(files.len(), 1);
    assert_outbox_name(&files[0]);

    let raw = std::fs::read_to_string(&files[0]).unwrap();
    let eml = Eml::parse(&raw);
    let date = eml.header("Date");
    time::OffsetDateTime::parse(date, &time::format_description::well_known::Rfc2822)
        .unwrap_or_else(|e| panic!("Date {date:?}: {e}"));
    assert!(eml.header("From").contains("<no-reply@vaultpay.local>"));
    assert!(eml.header("From").contains("VaultPay"));
    assert!(eml.header("To").contains("<alice@example.com>"));
    assert_eq!(eml.header("Subject"), "Verify your email address");
    let message_id = eml.header("Message-ID");
    assert!(
        message_id.starts_with('<') && message_id.ends_with("@vaultpay.local>"),
        "{message_id}"
    );
    assert_eq!(eml.header("MIME-Version"), "1.0");
    assert_eq!(
        eml.header("Content-Type").to_ascii_lowercase(),
        "text/plain; charset=utf-8"
    );
    assert_eq!(eml.header("Content-Transfer-Encoding"), "8bit");
    // The body is the text with CRLF line endings, readable as is: the link can be
    // copied straight out of the file.
    assert_eq!(eml.body.replace("\r\n", "\n"), text);
    assert!(raw.contains(&link));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&outbox), 0o700, "outbox directory mode");
        assert_eq!(mode(&files[0]), 0o600, "message file mode");
    }
}

#[tokio::test]
async fn file_outbox_uses_the_configured_sender_and_refuses_bad_addresses() {
    let tmp = TempDir::new("outbox-from");
    let cfg = MailConfig {
        from: "Acme Identity <id@acme.example>".to_owned(),
        smtp: None,
    };
    let mailer = mail::build(&cfg, tmp.path()).unwrap();
    mailer
        .send(message("bob@example.com", "Hi", "x"))
        .await
        .unwrap();
    let files = eml_files(&tmp.path().join("mail"));
    let eml = Eml::parse(&std::fs::read_to_string(&files[0]).unwrap());
    assert!(eml.header("From").contains("<id@acme.example>"));
    assert!(eml.header("Message-ID").ends_with("@acme.example>"));

    let err = mailer
        .send(message("not an address", "Hi", "x"))
        .await
        .unwrap_err();
    assert!(matches!(err, MailError::InvalidAddress { .. }), "{err:?}");
    assert_eq!(eml_files(&tmp.path().join("mail")).len(), 1);

    let bad = MailConfig {
        from: "no at sign".to_owned(),
        smtp: None,
    };
    assert!(matches!(
        mail::build(&bad, tmp.path()),
        Err(MailError::InvalidAddress { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_outbox_concurrent_sends_do_not_clobber_each_other() {
    let tmp = TempDir::new("outbox-concurrent");
    let outbox: Arc<dyn Mailer> = Arc::new(FileOutbox::new(tmp.path().join("mail")));
    let sends = (0..64).map(|i| {
        let outbox = Arc::clone(&outbox);
        tokio::spawn(async move {
            outbox
                .send(message(
                    &format!("user{i}@example.com"),
                    &format!("message {i}"),
                    &format!("body of message {i}\n"),
                ))
                .await
        })
    });
    for result in futures::future::join_all(sends).await {
        result.unwrap().unwrap();
    }

    let files = eml_files(&tmp.path().join("mail"));
    assert_eq!(files.len(), 64, "one file per message, no temp files left");
    let mut seen = std::collections::BTreeSet::new();
    for file in &files {
        assert_outbox_name(file);
        let eml = Eml::parse(&std::fs::read_to_string(file).unwrap());
        let i: usize = eml
            .header("Subject")
            .strip_prefix("message ")
            .unwrap()
            .parse()
            .unwrap();
        assert!(eml.header("To").contains(&format!("user{i}@example.com")));
        assert_eq!(eml.body, format!("body of message {i}\r\n"));
        assert!(seen.insert(i), "message {i} written twice");
    }
}

#[tokio::test]
async fn file_outbox_names_sort_in_sending_order() {
    let tmp = TempDir::new("outbox-order");
    let outbox = FileOutbox::new(tmp.path().join("mail"));
    for i in 0..5 {
        outbox
            .send(message("a@example.com", &format!("n{i}"), "x"))
            .await
            .unwrap();
    }
    let subjects: Vec<String> = eml_files(outbox.dir())
        .iter()
        .map(|f| {
            Eml::parse(&std::fs::read_to_string(f).unwrap())
                .header("Subject")
                .to_owned()
        })
        .collect();
    assert_eq!(subjects, ["n0", "n1", "n2", "n3", "n4"]);
}

// ---------------------------------------------------------------------------
// SMTP against a real local server (aiosmtpd)
// ---------------------------------------------------------------------------

/// `scripts/smtp-sink.py` running as a child process; killed on drop.
struct SmtpSink {
    _child: tokio::process::Child,
    port: u16,
    dir: TempDir,
}

const INSTALL_HINT: &str = "The SMTP tests need Python 3 with aiosmtpd: \
    install it with `pip install aiosmtpd` (or `python3 -m pip install aiosmtpd`); \
    set VAULTPAY_TEST_PYTHON to use another interpreter than `python3`.";

impl SmtpSink {
    async fn start(auth: Option<&str>) -> Self {
        let python = std::env::var("VAULTPAY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let probe = tokio::process::Command::new(&python)
            .args(["-c", "import aiosmtpd"])
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run `{python}`: {e}. {INSTALL_HINT}"));
        assert!(
            probe.status.success(),
            "`{python} -c 'import aiosmtpd'` failed: {}. {INSTALL_HINT}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );

        let dir = TempDir::new("smtp-sink");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/smtp-sink.py");
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg(&script)
            .arg(dir.path())
            .args(["--host", "127.0.0.1", "--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(auth) = auth {
            cmd.args(["--auth", auth]);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .expect("smtp-sink.py did not print `ready` within 30 s")
        .unwrap();
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("smtp-sink.py did not start: {line:?}. {INSTALL_HINT}"));
        Self {
            _child: child,
            port,
            dir,
        }
    }

    fn config(&self) -> SmtpConfig {
        SmtpConfig {
            host: "127.0.0.1".to_owned(),
            port: self.port,
            username: None,
            password: None,
            tls: SmtpTls::None,
            timeout_secs: 10,
        }
    }

    /// The messages received so far, as parsed by the sink (Python's `email`).
    fn received(&self) -> Vec<serde_json::Value> {
        let mut found: Vec<(u32, serde_json::Value)> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                let n = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".json")?
                    .parse()
                    .ok()?;
                let json = std::fs::read_to_string(&path).unwrap();
                Some((n, serde_json::from_str(&json).unwrap()))
            })
            .collect();
        found.sort_by_key(|(n, _)| *n);
        found.into_iter().map(|(_, v)| v).collect()
    }

    fn raw(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{n}.eml"))).unwrap()
    }
}

#[tokio::test]
async fn smtp_delivers_to_a_real_server_with_subject_and_body_intact() {
    let sink = SmtpSink::start(None).await;
    let cfg = MailConfig {
        from: "VaultPay <no-reply@vaultpay.test>".to_owned(),
        smtp: Some(sink.config()),
    };
    let mailer = mail::build(&cfg, Path::new("/nonexistent")).unwrap();
    let subject = "Bestätige deine E-Mail-Adresse – VaultPay";
    let link = format!(
        "https://id.example.com/v1/auth/verify-email?token={}&x=1",
        "Zm9vYmFy".repeat(8)
    );
    let text = format!("Hallo Jürgen,\n\nbitte bestätige: {link}\n\n.\n..leading dots survive\n");
    mailer
        .send(message("Jürgen <juergen@example.com>", subject, &text))
        .await
        .unwrap();

    let received = sink.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let m = &received[0];
    assert_eq!(m["mail_from"], "no-reply@vaultpay.test");
    assert_eq!(m["rcpt_tos"], serde_json::json!(["juergen@example.com"]));
    assert_eq!(m["subject"], subject);
    assert_eq!(m["content_type"], "text/plain");
    assert_eq!(m["charset"], "utf-8");
    assert_eq!(m["defects"], serde_json::json!([]));
    assert_ne!(m["date"], "None");
    assert!(m["message_id"]
        .as_str()
        .unwrap()
        .ends_with("@vaultpay.test>"));
    assert!(m["to"].as_str().unwrap().contains("juergen@example.com"));
    assert_eq!(m["text"].as_str().unwrap().replace("\r\n", "\n"), text);

    // The wire format is plain ASCII (no 8BITMIME needed) and well-formed.
    let raw = sink.raw(1);
    assert!(raw.is_ascii());
    Eml::parse(&raw).header("Message-ID");
}

#[tokio::test]
async fn smtp_authenticates_with_the_configured_credentials() {
    let sink = SmtpSink::start(Some("mailer:s3cret pass")).await;
    let good = SmtpConfig {
        username: Some("mailer".to_owned()),
        password: Some(Secret::new("s3cret pass")),
        ..sink.config()
    };
    SmtpMailer::new(&good, "no-reply@vaultpay.test")
        .unwrap()
        .send(message("a@example.com", "authenticated", "hello\n"))
        .await
        .unwrap();

    let wrong = SmtpConfig {
        password: Some(Secret::new("wrong")),
        ..good.clone()
    };
    let err = SmtpMailer::new(&wrong, "no-reply@vaultpay.test")
        .unwrap()
        .send(message("a@example.com", "refused", "hello\n"))
        .await
        .unwrap_err();
    assert!(matches!(err, MailError::Smtp(_)), "{err:?}");

    let anonymous = SmtpMailer::new(&sink.config(), "no-reply@vaultpay.test").unwrap();
    let err = anonymous
        .send(message("a@example.com", "anonymous", "hello\n"))
        .await
        .unwrap_err();
    assert!(matches!(err, MailError::Smtp(_)), "{err:?}");

    let received = sink.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["subject"], "authenticated");
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn smtp_unreachable_server_fails_promptly() {
    let cfg = SmtpConfig {
        host: "127.0.0.1".to_owned(),
        port: closed_port(),
        username: None,
        password: None,
        tls: SmtpTls::None,
        timeout_secs: 2,
    };
    let mailer = SmtpMailer::new(&cfg, "no-reply@vaultpay.test").unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(15),
        mailer.send(message("a@example.com", "x", "x")),
    )
    .await
    .expect("send to a closed port hung");
    assert!(result.is_err(), "{result:?}");
}

#[tokio::test]
async fn smtp_stalled_server_times_out_instead_of_hanging() {
    // Accepts connections and never says a word: no greeting, no replies.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let cfg = SmtpConfig {
        host: "127.0.0.1".to_owned(),
        port,
        username: None,
        password: None,
        tls: SmtpTls::None,
        timeout_secs: 1,
    };
    let mailer = SmtpMailer::new(&cfg, "no-reply@vaultpay.test").unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(15),
        mailer.send(message("a@example.com", "x", "x")),
    )
    .await
    .expect("send to a stalled server hung past its timeout");
    assert!(matches!(result, Err(MailError::Timeout(_))), "{result:?}");
}

#[tokio::test]
async fn smtp_starttls_is_required_when_configured() {
    // aiosmtpd without a TLS context does not offer STARTTLS; a mailer configured
    // for STARTTLS must refuse to send in plain text rather than downgrade.
    let sink = SmtpSink::start(None).await;
    let cfg = SmtpConfig {
        tls: SmtpTls::Starttls,
        ..sink.config()
    };
    let err = SmtpMailer::new(&cfg, "no-reply@vaultpay.test")
        .unwrap()
        .send(message("a@example.com", "must not arrive", "x"))
        .await
        .unwrap_err();
    assert!(matches!(err, MailError::Smtp(_)), "{err:?}");
    assert!(sink.received().is_empty());
}

// ---------------------------------------------------------------------------
// Breached passwords: k-anonymity range API against a local server
// ---------------------------------------------------------------------------

fn sha1_upper(password: &str) -> String {
    hex::encode_upper(Sha1::digest(password.as_bytes()))
}

#[derive(Clone, Copy)]
enum Behaviour {
    Serve,
    Fail500,
    Delay(Duration),
    Garbage,
}

#[derive(Debug, Clone)]
struct Request {
    path_and_query: String,
    add_padding: Option<String>,
    user_agent: Option<String>,
}

#[derive(Clone)]
struct RangeApi {
    behaviour: Behaviour,
    /// prefix → (suffix, count) entries, including zero-count padding.
    ranges: Arc<HashMap<String, Vec<(String, u64)>>>,
    requests: Arc<Mutex<Vec<Request>>>,
}

async fn range_handler(State(api): State<RangeApi>, uri: Uri, headers: HeaderMap) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-ascii>").to_owned())
    };
    api.requests.lock().unwrap().push(Request {
        path_and_query: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), ToString::to_string),
        add_padding: header("add-padding"),
        user_agent: header("user-agent"),
    });
    match api.behaviour {
        Behaviour::Fail500 => return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Behaviour::Garbage => {
            return "<html><body>Sign in to the Wi-Fi</body></html>".into_response()
        }
        Behaviour::Delay(d) => tokio::time::sleep(d).await,
        Behaviour::Serve => {}
    }
    let Some(prefix) = uri.path().strip_prefix("/range/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if prefix.len() != 5 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (
            StatusCode::BAD_REQUEST,
            "The hash prefix was not in a valid format",
        )
            .into_response();
    }
    let mut lines: Vec<String> = api
        .ranges
        .get(&prefix.to_ascii_uppercase())
        .into_iter()
        .flatten()
        .map(|(suffix, count)| format!("{suffix}:{count}"))
        .collect();
    // Filler in the shape of real answers: hundreds of entries, real and padding.
    for i in 0..400u64 {
        let fake = sha1_upper(&format!("filler {prefix} {i}"));
        let count = if i % 3 == 0 { 0 } else { i * 7 + 1 };
        lines.push(format!("{}:{count}", &fake[5..]));
    }
    lines.sort();
    ([("content-type", "text/plain")], lines.join("\r\n")).into_response()
}

struct RangeServer {
    base_url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl RangeServer {
    async fn start(behaviour: Behaviour, entries: &[(&str, u64)]) -> Self {
        let mut ranges: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for (password, count) in entries {
            let hash = sha1_upper(password);
            ranges
                .entry(hash[..5].to_owned())
                .or_default()
                .push((hash[5..].to_owned(), *count));
        }
        let api = RangeApi {
            behaviour,
            ranges: Arc::new(ranges),
            requests: Arc::default(),
        };
        let requests = Arc::clone(&api.requests);
        let app = Router::new().fallback(range_handler).with_state(api);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            // A trailing slash, as people write it in config files.
            base_url: format!("http://{addr}/"),
            requests,
        }
    }

    fn client(&self, timeout_ms: u64, fail_open: bool) -> HibpClient {
        HibpClient::new(&HibpConfig {
            enabled: true,
            base_url: self.base_url.clone(),
            timeout_ms,
            fail_open,
        })
        .unwrap()
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

const LISTED: &str = "P@ssw0rd";
const PADDED: &str = "a password listed only as padding";
const UNLISTED: &str = "x7#Kq!vR2mZ@pL9w-never-breached";

#[tokio::test]
async fn hibp_verdicts_from_a_range_server() {
    let server = RangeServer::start(Behaviour::Serve, &[(LISTED, 3_861_493), (PADDED, 0)]).await;
    let client = server.client(2_000, true);

    assert_eq!(client.check(LISTED).await, HibpVerdict::Breached(3_861_493));
    assert_eq!(client.check(PADDED).await, HibpVerdict::Clean);
    assert_eq!(client.check(UNLISTED).await, HibpVerdict::Clean);

    // Only the 5-character prefix went over the wire, with padding requested.
    let requests = server.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for (request, password) in requests.iter().zip([LISTED, PADDED, UNLISTED]) {
        let hash = sha1_upper(password);
        assert_eq!(request.path_and_query, format!("/range/{}", &hash[..5]));
        assert!(!request.path_and_query.contains(&hash[5..]));
        assert!(!request.path_and_query.contains(password));
        assert_eq!(request.add_padding.as_deref(), Some("true"));
        let ua = request.user_agent.as_deref().unwrap_or_default();
        assert!(ua.starts_with("VaultPay/"), "User-Agent {ua:?}");
    }
}

#[tokio::test]
async fn hibp_error_status_is_unavailable() {
    let server = RangeServer::start(Behaviour::Fail500, &[(LISTED, 10)]).await;
    let verdict = server.client(2_000, false).check(LISTED).await;
    let HibpVerdict::Unavailable(reason) = verdict else {
        panic!("expected Unavailable, got {verdict:?}");
    };
    assert!(reason.contains("500"), "{reason}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn hibp_non_range_body_is_unavailable() {
    let server = RangeServer::start(Behaviour::Garbage, &[]).await;
    let verdict = server.client(2_000, true).check(LISTED).await;
    assert!(
        matches!(verdict, HibpVerdict::Unavailable(_)),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn hibp_slow_server_beyond_the_timeout_is_unavailable() {
    let server =
        RangeServer::start(Behaviour::Delay(Duration::from_secs(5)), &[(LISTED, 10)]).await;
    let verdict = server.client(300, true).check(LISTED).await;
    let HibpVerdict::Unavailable(reason) = verdict else {
        panic!("expected Unavailable, got {verdict:?}");
    };
    assert!(reason.contains("timed out"), "{reason}");
    // The reason is safe to log: not even the prefix is in it.
    assert!(!reason.contains(&sha1_upper(LISTED)[..5]), "{reason}");
}

#[tokio::test]
async fn hibp_refused_connection_is_unavailable() {
    let base_url = format!("http://127.0.0.1:{}", closed_port());
    for fail_open in [true, false] {
        let client = HibpClient::new(&HibpConfig {
            enabled: true,
            base_url: base_url.clone(),
            timeout_ms: 1_000,
            fail_open,
        })
        .unwrap();
        assert_eq!(client.fail_open(), fail_open);
        let verdict = client.check(LISTED).await;
        let HibpVerdict::Unavailable(reason) = verdict else {
            panic!("expected Unavailable, got {verdict:?}");
        };
        assert!(!reason.contains(&sha1_upper(LISTED)[..5]), "{reason}");
    }
}
