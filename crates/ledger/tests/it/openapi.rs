#[test]
fn openapi_documents_every_ledger_route() {
    let doc = vaultpay_ledger::openapi();
    let v = serde_json::to_value(&doc).unwrap();
    for path in [
        "/v1/accounts",
        "/v1/accounts/{id}",
        "/v1/accounts/{id}/transactions",
        "/v1/accounts/{id}/statement.csv",
        "/v1/transfers",
        "/v1/transfers/batch",
        "/v1/transfers/{id}",
        "/v1/transfers/{id}/post",
        "/v1/transfers/{id}/void",
        "/v1/admin/deposits",
        "/v1/admin/withdrawals",
        "/v1/admin/accounts/{id}/freeze",
        "/v1/admin/accounts/{id}/unfreeze",
        "/v1/admin/accounts/{id}/close",
        "/v1/admin/failed-transfers",
        "/v1/admin/ledger/audit",
    ] {
        assert!(
            v["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    for schema in [
        "TransferRequest",
        "Transfer",
        "Account",
        "BatchRequest",
        "Problem",
    ] {
        assert!(
            v["components"]["schemas"].get(schema).is_some(),
            "{schema} schema missing"
        );
    }
}
