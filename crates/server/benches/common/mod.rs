//! What every server benchmark starts from: a free port, a fresh data dir and fresh
//! databases on `backend`, durable commits, a generated master key.

use vaultpay_server::Config;
use vaultpay_store::Backend;

pub async fn server_config(backend: Backend) -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: std::env::temp_dir()
            .join("vaultpay-bench")
            .join(uuid::Uuid::now_v7().to_string()),
        ..Config::default()
    };
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    let auth = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    let ledger = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    cfg.database.auth_url = Some(vaultpay_core::secret::Secret::new(auth));
    cfg.database.ledger_url = Some(vaultpay_core::secret::Secret::new(ledger));
    cfg.database.sqlite_synchronous_full = true; // durable commits
    cfg.master_key = Some(vaultpay_core::secret::Secret::new(
        vaultpay_core::crypto::MasterKey::generate()
            .to_hex()
            .to_string(),
    ));
    cfg
}
