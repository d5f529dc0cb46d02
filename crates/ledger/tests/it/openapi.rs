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

/// Every ledger operation says it needs a bearer token and documents the 401 a
/// request without a valid one gets and the 503 of an unreachable database; every GET
/// with query parameters its 400; every POST its 400, 413 and 415.
#[test]
fn every_ledger_operation_documents_its_authentication() {
    let v = serde_json::to_value(vaultpay_ledger::openapi()).unwrap();
    let mut seen = 0;
    for (path, item) in v["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            seen += 1;
            assert_eq!(
                op["security"],
                serde_json::json!([{ "bearer": [] }]),
                "{method} {path}"
            );
            let responses = op["responses"].as_object().unwrap();
            let mut want = vec!["401", "503"];
            let has_query = op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
            if method == "get" && has_query {
                want.push("400");
            }
            if method == "post" {
                want.extend(["400", "413"]);
                if !path.ends_with("/post") && !path.ends_with("/void") {
                    want.push("415");
                }
            }
            for status in want {
                assert!(
                    responses.contains_key(status),
                    "{method} {path}: no {status}"
                );
            }
        }
    }
    assert!(seen >= 17, "{seen} operations");
}
