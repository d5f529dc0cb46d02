//! Outgoing mail: verification links, password resets and security notices.
//!
//! Two [`Mailer`]s exist:
//!
//! * [`FileOutbox`] (the default) writes each message as an RFC 5322 `.eml` file into
//!   `<data dir>/mail`, so a newcomer running the embedded mode can open the link
//!   without any mail server. The body is written as raw UTF-8 (`8bit`) whenever
//!   that is valid, so links are readable with `cat` and not mangled by
//!   quoted-printable soft line breaks.
//! * [`SmtpMailer`] submits over SMTP with lettre and rustls (STARTTLS by default,
//!   implicit TLS, or plain text for a relay on localhost).
//!
//! [`build`] picks one from [`MailConfig`].

use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use lettre::message::header::{ContentTransferEncoding, ContentType, MIME_VERSION_1_0};
use lettre::message::{Body, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vaultpay_core::secret::Secret;

/// Sender used when the configuration names none.
pub const DEFAULT_FROM: &str = "VaultPay <no-reply@vaultpay.local>";
/// Sub-directory of the data dir that holds the file outbox.
pub const OUTBOX_DIR: &str = "mail";

/// The `[mail]` configuration section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// The `From` header of every message, e.g. `VaultPay <no-reply@example.com>`.
    pub from: String,
    /// Deliver over SMTP; when absent, mail goes to the file outbox in the data dir.
    pub smtp: Option<SmtpConfig>,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            from: DEFAULT_FROM.to_owned(),
            smtp: None,
        }
    }
}

/// The `[mail.smtp]` configuration section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Host name of the SMTP server; also the name its TLS certificate must carry.
    pub host: String,
    /// TCP port: 587 (submission with STARTTLS) by default; implicit TLS
    /// ([`SmtpTls::Tls`]) usually listens on 465.
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// User name for SMTP AUTH; must be set together with `password`.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for SMTP AUTH; never printed.
    #[serde(default)]
    pub password: Option<Secret>,
    /// How the connection is protected.
    #[serde(default)]
    pub tls: SmtpTls,
    /// Upper bound, in seconds, on delivering one message: connecting, the whole
    /// SMTP dialogue and the upload of the message together.
    #[serde(default = "default_smtp_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_smtp_port() -> u16 {
    587
}

fn default_smtp_timeout_secs() -> u64 {
    10
}

/// Transport security of the SMTP connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Connect in plain text and require an upgrade with `STARTTLS` before anything
    /// else is sent; a server that does not offer it is refused.
    #[default]
    Starttls,
    /// TLS from the first byte ("SMTPS", usually port 465).
    Tls,
    /// No encryption at all; only sensible for a relay on localhost.
    None,
}

/// One plain-text message to one recipient.
#[derive(Clone)]
pub struct Message {
    /// Recipient address, e.g. `alice@example.com` or `Alice <alice@example.com>`.
    pub to: String,
    /// Subject line; may contain any Unicode but no line breaks.
    pub subject: String,
    /// Plain-text body (UTF-8); line endings are normalised to CRLF.
    pub text: String,
}

impl fmt::Debug for Message {
    /// Shows the recipient and subject only: bodies carry single-use tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("to", &self.to)
            .field("subject", &self.subject)
            .field("text", &format_args!("<{} bytes>", self.text.len()))
            .finish()
    }
}

/// Why a message could not be built or delivered.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// A sender or recipient is not a valid mailbox.
    #[error("invalid mail address {address:?}: {source}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What the parser disliked.
        #[source]
        source: lettre::address::AddressError,
    },
    /// The message itself is malformed (e.g. a line break in the subject).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The mail configuration cannot work.
    #[error("invalid mail configuration: {0}")]
    Config(String),
    /// Writing to the file outbox failed.
    #[error("cannot write to the mail outbox {}: {source}", path.display())]
    Outbox {
        /// The file or directory being written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The SMTP server refused the message or the connection failed.
    #[error("SMTP delivery failed: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    /// The SMTP server did not complete delivery within the configured time.
    #[error("SMTP delivery timed out after {0:?}")]
    Timeout(Duration),
    /// The background sender's queue is full.
    #[error("too many messages waiting to be sent")]
    QueueFull,
}

/// Something that delivers [`Message`]s. Implementations are cheap to share behind
/// an `Arc` and safe to call concurrently.
pub trait Mailer: Send + Sync + 'static {
    /// Delivers one message, or says why it could not.
    fn send(&self, msg: Message) -> BoxFuture<'_, Result<(), MailError>>;
}

/// Builds the configured mailer: SMTP when `[mail.smtp]` is present, otherwise the
/// file outbox under `data_dir/mail`.
///
/// # Errors
///
/// [`MailError::InvalidAddress`] for a bad `from`, [`MailError::Config`] for an SMTP
/// section that cannot work. Both are found here, at start-up, rather than at the
/// first registration.
pub fn build(cfg: &MailConfig, data_dir: &Path) -> Result<Arc<dyn Mailer>, MailError> {
    match &cfg.smtp {
        Some(smtp) => Ok(Arc::new(SmtpMailer::new(smtp, &cfg.from)?)),
        None => Ok(Arc::new(
            FileOutbox::new(data_dir.join(OUTBOX_DIR)).with_from(&cfg.from)?,
        )),
    }
}

fn parse_mailbox(address: &str) -> Result<Mailbox, MailError> {
    address
        .trim()
        .parse::<Mailbox>()
        .map_err(|source| MailError::InvalidAddress {
            address: address.to_owned(),
            source,
        })
}

/// How the body of a message is encoded.
#[derive(Clone, Copy)]
enum BodyEncoding {
    /// Raw UTF-8 when lines are short enough, so the file stays readable.
    Readable,
    /// Whatever lettre finds best among 7bit, quoted-printable and base64; safe for
    /// any SMTP server, even one without `8BITMIME`.
    SevenBitSafe,
}

/// Builds a complete RFC 5322 message with Date, From, To, Subject, Message-ID,
/// MIME-Version and a `text/plain; charset=utf-8` body.
fn build_message(
    from: &Mailbox,
    msg: Message,
    encoding: BodyEncoding,
) -> Result<lettre::Message, MailError> {
    if msg.subject.chars().any(char::is_control) {
        return Err(MailError::InvalidMessage(
            "the subject contains a control character".to_owned(),
        ));
    }
    let to = parse_mailbox(&msg.to)?;
    let message_id = format!("<{}@{}>", Uuid::now_v7().simple(), from.email.domain());
    let body = match encoding {
        BodyEncoding::Readable => readable_body(&msg.text).unwrap_or_else(|| Body::new(msg.text)),
        BodyEncoding::SevenBitSafe => Body::new(msg.text),
    };
    lettre::Message::builder()
        .from(from.clone())
        .to(to)
        .subject(msg.subject)
        .message_id(Some(message_id))
        .header(MIME_VERSION_1_0)
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| MailError::InvalidMessage(e.to_string()))
}

/// Longest line RFC 5322 allows, in octets, without its CRLF.
const MAX_LINE_OCTETS: usize = 998;

/// `text` as an unencoded body (`7bit` when ASCII, else `8bit`) with CRLF line
/// endings, or `None` when it cannot be sent raw (a line over 998 octets, a NUL).
///
/// lettre would switch to quoted-printable for any line over 76 characters, which
/// turns `token=abc` in a link into `token=3Dabc` and splits it with soft breaks.
fn readable_body(text: &str) -> Option<Body> {
    let crlf = text
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .replace('\n', "\r\n");
    if crlf.contains('\0') || crlf.split("\r\n").any(|l| l.len() > MAX_LINE_OCTETS) {
        return None;
    }
    let encoding = if crlf.is_ascii() {
        ContentTransferEncoding::SevenBit
    } else {
        ContentTransferEncoding::EightBit
    };
    Some(Body::dangerous_pre_encoded(crlf.into_bytes(), encoding))
}

/// Writes each message as an RFC 5322 `.eml` file into a directory.
///
/// Each file has Date, From, To, Subject, Message-ID and a `text/plain` UTF-8 body.
/// The directory is created if missing (0700 on unix); file names sort by time:
/// `<unix micros>-<uuid>.eml`. Each message is written to a temp name, synced, then
/// renamed, so readers never see half a file. Files are 0600 on unix: they carry
/// single-use tokens.
#[derive(Debug, Clone)]
pub struct FileOutbox {
    dir: PathBuf,
    /// The sender; `None` means [`DEFAULT_FROM`].
    from: Option<Mailbox>,
}

impl FileOutbox {
    /// An outbox writing into `dir`, sending as [`DEFAULT_FROM`]. The directory is
    /// created on the first message.
    #[must_use]
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, from: None }
    }

    /// Uses `from` (e.g. `VaultPay <no-reply@example.com>`) as the sender.
    ///
    /// # Errors
    ///
    /// [`MailError::InvalidAddress`] when `from` is not a mailbox.
    pub fn with_from(mut self, from: &str) -> Result<Self, MailError> {
        self.from = Some(parse_mailbox(from)?);
        Ok(self)
    }

    fn sender(&self) -> Result<Mailbox, MailError> {
        match &self.from {
            Some(from) => Ok(from.clone()),
            None => parse_mailbox(DEFAULT_FROM),
        }
    }

    /// The directory messages are written to.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `bytes` as a new `.eml` file and returns its path. Blocking.
    fn write(dir: &Path, bytes: &[u8]) -> Result<PathBuf, MailError> {
        let outbox_err = |path: &Path| {
            let path = path.to_owned();
            move |source| MailError::Outbox { path, source }
        };
        create_private_dir(dir).map_err(outbox_err(dir))?;

        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        // 16 digits keep names the same width (and so sortable) until the year 2286.
        let name = format!("{micros:016}-{}.eml", Uuid::now_v7());
        let final_path = dir.join(&name);
        // A leading dot and another extension keep `*.eml` globs off the temp file.
        let tmp_path = dir.join(format!(".{name}.tmp"));

        let written = (|| {
            let mut file = create_private_file(&tmp_path)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp_path, &final_path)
        })();
        if let Err(source) = written {
            // Best effort: the temp file is useless now and the error is what matters.
            let _ = std::fs::remove_file(&tmp_path);
            return Err(MailError::Outbox {
                path: final_path,
                source,
            });
        }
        // Make the rename durable; failure here does not lose the message content.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(final_path)
    }
}

impl Mailer for FileOutbox {
    fn send(&self, msg: Message) -> BoxFuture<'_, Result<(), MailError>> {
        Box::pin(async move {
            let bytes = build_message(&self.sender()?, msg, BodyEncoding::Readable)?.formatted();
            let dir = self.dir.clone();
            let path = tokio::task::spawn_blocking(move || Self::write(&dir, &bytes))
                .await
                .map_err(|e| MailError::Outbox {
                    path: self.dir.clone(),
                    source: std::io::Error::other(e),
                })??;
            tracing::info!(path = %path.display(), "mail written to the file outbox");
            Ok(())
        })
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// lettre `AsyncSmtpTransport<Tokio1Executor>` over rustls.
///
/// Each message opens a fresh connection. lettre's own timeout covers only the TCP
/// connect, so every delivery is additionally bounded by `timeout_secs` as a whole:
/// a server that accepts and then stalls yields [`MailError::Timeout`], never a hang.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    timeout: Duration,
}

impl fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("from", &self.from)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SmtpMailer {
    /// Builds the transport; nothing is connected until the first message.
    ///
    /// # Errors
    ///
    /// [`MailError::InvalidAddress`] for a bad `from`; [`MailError::Config`] for an
    /// empty host, a zero timeout, a user name without a password (or the reverse)
    /// or a TLS setup failure.
    pub fn new(cfg: &SmtpConfig, from: &str) -> Result<Self, MailError> {
        let from = parse_mailbox(from)?;
        let host = cfg.host.trim();
        if host.is_empty() {
            return Err(MailError::Config("smtp.host is empty".to_owned()));
        }
        if cfg.timeout_secs == 0 {
            return Err(MailError::Config(
                "smtp.timeout_secs must be at least 1".to_owned(),
            ));
        }
        let timeout = Duration::from_secs(cfg.timeout_secs);

        let tls = match cfg.tls {
            SmtpTls::Starttls => Tls::Required(tls_parameters(host)?),
            SmtpTls::Tls => Tls::Wrapper(tls_parameters(host)?),
            SmtpTls::None => {
                if !is_loopback(host) {
                    tracing::warn!(
                        host,
                        "SMTP without TLS to a host that is not localhost: \
                         mail and credentials cross the network in plain text"
                    );
                }
                Tls::None
            }
        };

        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(cfg.port)
            .tls(tls)
            .timeout(Some(timeout));
        match (&cfg.username, &cfg.password) {
            (Some(user), Some(password)) => {
                builder = builder
                    .credentials(Credentials::new(user.clone(), password.expose().to_owned()));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(MailError::Config(
                    "smtp.username is set but smtp.password is not".to_owned(),
                ))
            }
            (None, Some(_)) => {
                return Err(MailError::Config(
                    "smtp.password is set but smtp.username is not".to_owned(),
                ))
            }
        }

        Ok(Self {
            transport: builder.build(),
            from,
            timeout,
        })
    }
}

impl Mailer for SmtpMailer {
    fn send(&self, msg: Message) -> BoxFuture<'_, Result<(), MailError>> {
        Box::pin(async move {
            // lettre ends DATA with CRLF "." CRLF even when the message already ends
            // with a line break, which would add an empty line to every body.
            let text = match msg.text.strip_suffix('\n') {
                Some(text) => text.strip_suffix('\r').unwrap_or(text).to_owned(),
                None => msg.text,
            };
            let msg = Message { text, ..msg };
            let email = build_message(&self.from, msg, BodyEncoding::SevenBitSafe)?;
            match tokio::time::timeout(self.timeout, self.transport.send(email)).await {
                Ok(Ok(response)) => {
                    tracing::debug!(code = %response.code(), "mail accepted by the SMTP server");
                    Ok(())
                }
                Ok(Err(e)) if e.is_timeout() => Err(MailError::Timeout(self.timeout)),
                Ok(Err(e)) => Err(MailError::Smtp(e)),
                Err(_elapsed) => Err(MailError::Timeout(self.timeout)),
            }
        })
    }
}

/// Messages waiting for the background sender beyond those being sent.
const BACKGROUND_QUEUE: usize = 1024;
/// Messages the background sender delivers at once.
const BACKGROUND_CONCURRENCY: usize = 8;

/// Delivers through another mailer on a background task: `send` only queues. The
/// service puts SMTP behind it, so that no request waits for the SMTP server: a
/// password-reset request for an existing account (which sends mail) then takes as
/// long as one for an unknown address (which does not) instead of a round trip to the
/// server longer, and a slow server slows no request. Delivery failures are logged, as
/// they were when the request waited (it could not tell its caller anyway). A full
/// queue refuses the message at once ([`MailError::QueueFull`]).
pub struct Background {
    tx: tokio::sync::mpsc::Sender<Message>,
}

impl Background {
    /// Starts the sender on the current tokio runtime; it stops when this is dropped
    /// and the queue is empty.
    pub fn spawn(inner: Arc<dyn Mailer>) -> Self {
        use futures::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Message>(BACKGROUND_QUEUE);
        let queue =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        tokio::spawn(
            queue.for_each_concurrent(BACKGROUND_CONCURRENCY, move |msg| {
                let inner = inner.clone();
                async move {
                    if let Err(e) = inner.send(msg).await {
                        tracing::warn!(error = %e, "could not send mail");
                    }
                }
            }),
        );
        Self { tx }
    }
}

impl Mailer for Background {
    fn send(&self, msg: Message) -> BoxFuture<'_, Result<(), MailError>> {
        Box::pin(async move { self.tx.try_send(msg).map_err(|_| MailError::QueueFull) })
    }
}

/// rustls parameters verifying the server certificate against the Mozilla roots
/// (webpki-roots) for `host`.
fn tls_parameters(host: &str) -> Result<TlsParameters, MailError> {
    TlsParameters::new(host.to_owned())
        .map_err(|e| MailError::Config(format!("TLS setup for smtp.host {host:?}: {e}")))
}

/// Whether `host` names this machine (so plain-text SMTP does not leave it).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A mailer that takes each message and then waits until it is let go.
    struct Stuck {
        got: tokio::sync::mpsc::UnboundedSender<String>,
        release: Arc<tokio::sync::Semaphore>,
    }

    impl Mailer for Stuck {
        fn send(&self, msg: Message) -> BoxFuture<'_, Result<(), MailError>> {
            Box::pin(async move {
                self.got.send(msg.subject).unwrap();
                self.release.acquire().await.unwrap().forget();
                Ok(())
            })
        }
    }

    /// `send` returns while the server is still busy with the message, and the
    /// message is delivered once the server answers.
    #[tokio::test]
    async fn background_sending_does_not_wait_for_the_server() {
        let (got, mut delivered) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mailer = Background::spawn(Arc::new(Stuck {
            got,
            release: release.clone(),
        }));
        let msg = |s: &str| Message {
            to: "a@example.com".into(),
            subject: s.into(),
            text: "x".into(),
        };
        // returns although the inner mailer does not finish until released (a wait
        // for it would never end; the timeout turns that into a failure)
        let queue_both = async {
            mailer.send(msg("first")).await.unwrap();
            mailer.send(msg("second")).await.unwrap();
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), queue_both)
            .await
            .expect("send waited for the server");
        let mut seen = vec![
            delivered.recv().await.unwrap(),
            delivered.recv().await.unwrap(),
        ];
        seen.sort();
        assert_eq!(seen, ["first", "second"]);
        release.add_permits(2);
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let cfg: MailConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.from, DEFAULT_FROM);
        assert!(cfg.smtp.is_none());

        let cfg: MailConfig =
            serde_json::from_str(r#"{"smtp": {"host": "mail.example.com"}}"#).unwrap();
        let smtp = cfg.smtp.unwrap();
        assert_eq!(smtp.port, 587);
        assert_eq!(smtp.tls, SmtpTls::Starttls);
        assert_eq!(smtp.timeout_secs, 10);
        assert!(smtp.username.is_none() && smtp.password.is_none());

        let smtp: SmtpConfig =
            serde_json::from_str(r#"{"host": "h", "tls": "none", "password": "pw"}"#).unwrap();
        assert_eq!(smtp.tls, SmtpTls::None);
        let shown = format!("{smtp:?}");
        assert!(
            shown.contains("**redacted**") && !shown.contains("\"pw\""),
            "{shown}"
        );

        assert!(serde_json::from_str::<MailConfig>(r#"{"frm": "x"}"#).is_err());
        assert!(serde_json::from_str::<SmtpConfig>(r#"{"host": "h", "tsl": "tls"}"#).is_err());
        assert!(serde_json::from_str::<SmtpConfig>(r#"{"host": "h", "tls": "ssl"}"#).is_err());
    }

    #[test]
    fn default_outbox_sender_matches_the_default_config() {
        let outbox = FileOutbox::new(PathBuf::from("x"));
        assert_eq!(outbox.sender().unwrap().to_string(), DEFAULT_FROM);
    }

    #[test]
    fn smtp_config_is_checked() {
        let base = SmtpConfig {
            host: "127.0.0.1".to_owned(),
            port: 2525,
            username: None,
            password: None,
            tls: SmtpTls::None,
            timeout_secs: 10,
        };
        assert!(SmtpMailer::new(&base, DEFAULT_FROM).is_ok());
        assert!(matches!(
            SmtpMailer::new(&base, "not an address"),
            Err(MailError::InvalidAddress { .. })
        ));
        let half_auth = SmtpConfig {
            username: Some("u".to_owned()),
            ..base.clone()
        };
        assert!(matches!(
            SmtpMailer::new(&half_auth, DEFAULT_FROM),
            Err(MailError::Config(_))
        ));
        let no_timeout = SmtpConfig {
            timeout_secs: 0,
            ..base.clone()
        };
        assert!(matches!(
            SmtpMailer::new(&no_timeout, DEFAULT_FROM),
            Err(MailError::Config(_))
        ));
        let starttls = SmtpConfig {
            host: "mail.example.com".to_owned(),
            tls: SmtpTls::Starttls,
            ..base
        };
        assert!(SmtpMailer::new(&starttls, DEFAULT_FROM).is_ok());
    }

    #[test]
    fn subject_line_breaks_are_refused() {
        let from: Mailbox = DEFAULT_FROM.parse().unwrap();
        let msg = Message {
            to: "a@example.com".to_owned(),
            subject: "hi\r\nBcc: evil@example.com".to_owned(),
            text: "x".to_owned(),
        };
        assert!(matches!(
            build_message(&from, msg, BodyEncoding::Readable),
            Err(MailError::InvalidMessage(_))
        ));
    }

    #[test]
    fn readable_body_keeps_links_intact() {
        let from: Mailbox = DEFAULT_FROM.parse().unwrap();
        let link = format!(
            "http://127.0.0.1:8080/v1/auth/verify-email?token={}",
            "A".repeat(64)
        );
        let msg = Message {
            to: "a@example.com".to_owned(),
            subject: "Verify".to_owned(),
            text: format!("Grüße!\nOpen {link}\n"),
        };
        let raw = build_message(&from, msg.clone(), BodyEncoding::Readable)
            .unwrap()
            .formatted();
        let raw = String::from_utf8(raw).unwrap();
        assert!(raw.contains(&link), "{raw}");
        assert!(raw.contains("Content-Transfer-Encoding: 8bit"), "{raw}");

        let raw = build_message(&from, msg.clone(), BodyEncoding::SevenBitSafe)
            .unwrap()
            .formatted();
        assert!(raw.is_ascii());

        // A line longer than RFC 5322 allows cannot go raw: quoted-printable it is.
        let long = Message {
            text: "x".repeat(MAX_LINE_OCTETS + 1),
            ..msg
        };
        let raw = build_message(&from, long, BodyEncoding::Readable)
            .unwrap()
            .formatted();
        let raw = String::from_utf8(raw).unwrap();
        assert!(
            raw.contains("Content-Transfer-Encoding: quoted-printable"),
            "{raw}"
        );
    }

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "127.0.0.1", "::1", "[::1]", "LOCALHOST"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["mail.example.com", "10.0.0.1", "localhost.example.com"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
