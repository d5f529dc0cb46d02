//! Custom roles: create, assign through the grant route, effective at once, delete;
//! built-in roles are fixed; no escalation; invalidation across replicas (Redis).

use crate::auth_flows::{audit_action, id_of};
use crate::each_backend;
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use vaultpay_store::Backend;

fn perms(r: &Resp) -> Vec<String> {
    r.body["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn custom_role_create_assign_effective_delete() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin_mfa().await.access;
        let id = id_of(&app.register("gail@example.com").await);
        let t = app.login("gail@example.com", PASSWORD).await;
        // warms the permission cache with the customer permissions
        app.get("/v1/admin/audit", Some(&t.access))
            .await
            .assert_problem(403, "forbidden");
        assert!(!perms(&app.get("/v1/me", Some(&t.access)).await).contains(&"audit:read".into()));

        let r = app
            .post(
                "/v1/admin/roles",
                Some(&admin),
                json!({ "name": "auditor", "description": "Reads the audit log", "permissions": ["audit:read", "users:read", "audit:read"] }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["builtin"], false);
        assert_eq!(r.body["permissions"], json!(["audit:read", "users:read"]));
        let roles = app.get("/v1/admin/roles", Some(&admin)).await;
        let role = |name: &str| {
            roles.body["roles"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == name)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            role("auditor")["permissions"],
            json!(["audit:read", "users:read"])
        );
        // a built-in role says what its permissions let it do (auth migration 0012)
        let support = role("support");
        assert_eq!(
            support["description"],
            "Reads customer profiles and ledger accounts to help them"
        );
        assert_eq!(
            support["permissions"],
            json!(["accounts:read", "users:read"])
        );

        let r = app
            .post(
                &format!("/v1/admin/users/{id}/roles"),
                Some(&admin),
                json!({ "role": "auditor" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(r.body["roles"]
            .as_array()
            .unwrap()
            .contains(&json!("auditor")));
        // effective at once, with the same access token
        let me = app.get("/v1/me", Some(&t.access)).await;
        assert!(perms(&me).contains(&"audit:read".into()), "{}", me.text);
        assert!(
            perms(&me).contains(&"profile:read".into()),
            "customer permissions stay"
        );
        assert_eq!(
            app.get("/v1/admin/audit", Some(&t.access)).await.status,
            StatusCode::OK
        );
        // a fresh login carries the role in the token
        let t2 = app.login("gail@example.com", PASSWORD).await;
        let claims = crate::auth_flows::jwt_part(&t2.access, 1);
        assert!(claims["roles"]
            .as_array()
            .unwrap()
            .contains(&json!("auditor")));

        let r = app.delete("/v1/admin/roles/auditor", Some(&admin)).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        // holders lose it at once
        app.get("/v1/admin/audit", Some(&t.access))
            .await
            .assert_problem(403, "forbidden");
        let u = app
            .get(&format!("/v1/admin/users/{id}"), Some(&admin))
            .await;
        assert_eq!(u.body["roles"], json!(["customer"]), "{}", u.text);
        let roles = app.get("/v1/admin/roles", Some(&admin)).await;
        assert!(!roles.text.contains("\"auditor\""));
        app.delete("/v1/admin/roles/auditor", Some(&admin))
            .await
            .assert_problem(404, "not_found");
        // and it can be created again
        let r = app
            .post(
                "/v1/admin/roles",
                Some(&admin),
                json!({ "name": "auditor", "permissions": ["audit:read"] }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

        let created = audit_action(&app, &admin, "role.created").await;
        assert_eq!(created.len(), 2);
        assert_eq!(created[1]["resource"], "auditor");
        assert_eq!(
            created[1]["metadata"]["permissions"],
            json!(["audit:read", "users:read"])
        );
        let deleted = audit_action(&app, &admin, "role.deleted").await;
        assert_eq!(deleted[0]["resource"], "auditor");
        assert_eq!(deleted[0]["metadata"]["holders_removed"], 1);
        app.stop().await;
    });
}

/// A revoked admin role stops the ledger's admin actions at once: the token still says
/// "admin" until it expires, but those actions introspect, and introspection reports
/// only the roles the user still holds.
#[tokio::test]
async fn a_revoked_admin_role_stops_ledger_admin_actions_before_the_token_expires() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin_mfa().await.access;
        let id = id_of(&app.register("treasurer@example.com").await);
        let grant = |role: &'static str| {
            let (app, admin, id) = (&app, &admin, &id);
            async move {
                let r = app
                    .post(
                        &format!("/v1/admin/users/{id}/roles"),
                        Some(admin),
                        json!({ "role": role }),
                    )
                    .await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            }
        };
        grant("admin").await;
        let t = app.login("treasurer@example.com", PASSWORD).await;
        let c = app.user("payee@example.com").await;
        let r = app
            .post(
                "/v1/accounts",
                Some(&c.access),
                json!({ "currency": "USD", "kind": "current", "name": "main" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let account = r.body["id"].as_str().unwrap().to_owned();
        let deposit = |key: &'static str| {
            ledger_post(
                &app,
                "/v1/admin/deposits",
                &t.access,
                key,
                json!({ "account_id": account, "amount": 500, "currency": "USD", "reference": "r" }),
            )
        };
        let r = deposit("d-1").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

        let r = app
            .delete(&format!("/v1/admin/users/{id}/roles/admin"), Some(&admin))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        deposit("d-2").await.assert_problem(403, "forbidden");
        app.post(
            &format!("/v1/admin/accounts/{account}/freeze"),
            Some(&t.access),
            json!({ "reason": "x" }),
        )
        .await
        .assert_problem(403, "forbidden");
        // Plain reads still go by the token until it expires; the money stayed put.
        let r = app
            .get(&format!("/v1/accounts/{account}"), Some(&c.access))
            .await;
        assert_eq!(r.body["balance"], 500, "{}", r.text);

        // Granted again: the same token works again (its claim and the live role agree).
        grant("admin").await;
        let r = deposit("d-3").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        app.stop().await;
    });
}

#[tokio::test]
async fn custom_roles_refuse_bad_input_builtins_and_escalation() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin_mfa().await.access;
        let create = |token: String, body: serde_json::Value| {
            let app = &app;
            async move { app.post("/v1/admin/roles", Some(&token), body).await }
        };
        create(
            admin.clone(),
            json!({ "name": "x1", "permissions": ["money:print"] }),
        )
        .await
        .assert_problem(422, "permission_unknown");
        create(admin.clone(), json!({ "name": "x1", "permissions": [] }))
            .await
            .assert_problem(422, "permissions_invalid");
        // the ledger decides by built-in role: a custom role cannot carry its permissions
        for p in ["treasury:move", "accounts:manage", "transfers:read"] {
            create(
                admin.clone(),
                json!({ "name": "treasurer", "permissions": ["audit:read", p] }),
            )
            .await
            .assert_problem(422, "permission_not_delegable");
        }
        for bad in [
            "",
            "A",
            "Admin2",
            "x y",
            "1abc",
            "ab/c",
            "a".repeat(49).as_str(),
        ] {
            create(
                admin.clone(),
                json!({ "name": bad, "permissions": ["audit:read"] }),
            )
            .await
            .assert_problem(422, "role_name_invalid");
        }
        create(
            admin.clone(),
            json!({ "name": "x1", "permissions": ["audit:read"], "extra": 1 }),
        )
        .await
        .assert_problem(422, "invalid_request");
        // the four tiers are fixed
        for builtin in ["admin", "customer", "support", "compliance"] {
            create(
                admin.clone(),
                json!({ "name": builtin, "permissions": ["audit:read"] }),
            )
            .await
            .assert_problem(409, "role_exists");
            app.delete(&format!("/v1/admin/roles/{builtin}"), Some(&admin))
                .await
                .assert_problem(409, "role_builtin");
        }
        let roles = app.get("/v1/admin/roles", Some(&admin)).await;
        let admin_role = roles.body["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "admin")
            .cloned()
            .unwrap();
        assert_eq!(admin_role["permissions"].as_array().unwrap().len(), 15);
        assert_eq!(admin_role["builtin"], true);
        assert!(audit_action(&app, &admin, "role.created").await.is_empty());

        // customers cannot manage roles
        let id = id_of(&app.register("hank@example.com").await);
        let t = app.login("hank@example.com", PASSWORD).await;
        create(
            t.access.clone(),
            json!({ "name": "mine", "permissions": ["profile:read"] }),
        )
        .await
        .assert_problem(403, "forbidden");
        app.delete("/v1/admin/roles/admin", Some(&t.access))
            .await
            .assert_problem(403, "forbidden");
        // a role manager cannot hand out permissions they do not hold
        let r = create(
            admin.clone(),
            json!({ "name": "role-manager", "permissions": ["roles:manage"] }),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = app
            .post(
                &format!("/v1/admin/users/{id}/roles"),
                Some(&admin),
                json!({ "role": "role-manager" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        // a role manager without a second factor may not change roles at all
        let r = create(
            t.access.clone(),
            json!({ "name": "reader", "permissions": ["profile:read"] }),
        )
        .await;
        r.assert_problem(401, "insufficient_user_authentication");
        assert_eq!(r.body["mfa_enrolled"], false, "{}", r.text);
        // with one, within the limits of their own permissions
        let t = app.with_mfa("hank@example.com").await;
        create(
            t.access.clone(),
            json!({ "name": "keys", "permissions": ["keys:manage"] }),
        )
        .await
        .assert_problem(403, "forbidden");
        let r = create(
            t.access.clone(),
            json!({ "name": "reader", "permissions": ["profile:read"] }),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        // nor grant a role that carries them (not even to themselves)
        for role in ["admin", "compliance"] {
            app.post(
                &format!("/v1/admin/users/{id}/roles"),
                Some(&t.access),
                json!({ "role": role }),
            )
            .await
            .assert_problem(403, "forbidden");
        }
        let r = app
            .post(
                &format!("/v1/admin/users/{id}/roles"),
                Some(&t.access),
                json!({ "role": "reader" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let u = app
            .get(&format!("/v1/admin/users/{id}"), Some(&admin))
            .await;
        assert!(!u.text.contains("\"admin\""), "{}", u.text);
        // nor take away a role they could not grant: not admin from the administrator,
        // and not a role whose permissions they lack, by revoking or by deleting it
        let me = app.get("/v1/me", Some(&admin)).await;
        let admin_id = me.body["id"].as_str().unwrap().to_owned();
        app.delete(
            &format!("/v1/admin/users/{admin_id}/roles/admin"),
            Some(&t.access),
        )
        .await
        .assert_problem(403, "forbidden");
        let r = create(
            admin.clone(),
            json!({ "name": "auditor", "permissions": ["audit:read"] }),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = app
            .post(
                &format!("/v1/admin/users/{admin_id}/roles"),
                Some(&admin),
                json!({ "role": "auditor" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        app.delete(
            &format!("/v1/admin/users/{admin_id}/roles/auditor"),
            Some(&t.access),
        )
        .await
        .assert_problem(403, "forbidden");
        app.delete("/v1/admin/roles/auditor", Some(&t.access))
            .await
            .assert_problem(403, "forbidden");
        let u = app
            .get(&format!("/v1/admin/users/{admin_id}"), Some(&admin))
            .await;
        assert!(
            u.text.contains("\"admin\"") && u.text.contains("\"auditor\""),
            "{}",
            u.text
        );
        // what they could grant, they may take away
        let r = app
            .delete(
                &format!("/v1/admin/users/{id}/roles/reader"),
                Some(&t.access),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = app.delete("/v1/admin/roles/reader", Some(&t.access)).await;
        assert!(r.status.is_success(), "{}", r.text);
        app.stop().await;
    });
}

/// Two replicas sharing one PostgreSQL database and one Redis: a role change on one
/// is effective on the other at once (pub/sub invalidation), although its
/// permission cache would otherwise hold the old answer for an hour; trusted
/// networks confirmed or revoked on one are seen by the other (shared sets).
#[cfg(feature = "redis")]
#[tokio::test]
async fn two_replicas_share_invalidations_and_trusted_networks() {
    let Some((one, two)) = two_replicas(|c| {
        c.auth.permission_cache_ttl_secs = 3_600;
        c.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await
    else {
        return;
    };

    let admin = one.admin_mfa().await.access;
    let id = id_of(&one.register("ivy@example.com").await);
    let t = two.login("ivy@example.com", PASSWORD).await;
    two.get("/v1/admin/audit", Some(&t.access))
        .await
        .assert_problem(403, "forbidden");
    let r = one
        .post(
            "/v1/admin/roles",
            Some(&admin),
            json!({ "name": "auditor", "permissions": ["audit:read"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = one
        .post(
            &format!("/v1/admin/users/{id}/roles"),
            Some(&admin),
            json!({ "role": "auditor" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let poll = |want: StatusCode| {
        let (two, token) = (&two, t.access.clone());
        async move {
            for _ in 0..100 {
                if two.get("/v1/admin/audit", Some(&token)).await.status == want {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("replica two never answered {want}");
        }
    };
    poll(StatusCode::OK).await;
    let r = one.delete("/v1/admin/roles/auditor", Some(&admin)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    poll(StatusCode::FORBIDDEN).await;

    // trusted networks: held on two, confirmed through one, completed on two
    use crate::iptrust::{complete_from, link_post, login_from};
    let email = "jay@example.com";
    one.register(email).await;
    assert_eq!(
        login_from(&one, "198.51.100.1", email, "d1").await.status,
        StatusCode::OK
    );
    let held = login_from(&two, "203.0.113.1", email, "d2").await;
    assert_eq!(held.status, StatusCode::ACCEPTED, "{}", held.text);
    let ticket = held.body["login_ticket"].as_str().unwrap().to_owned();
    // both replicas write the file outbox of their own data dir
    let confirm = crate::auth_flows::mail_token(&two, email, "login/confirm?token=");
    assert_eq!(
        link_post(&one, "confirm", &confirm).await.status,
        StatusCode::OK
    );
    let done = complete_from(&two, "203.0.113.1", &ticket, "d2").await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text);
    assert_eq!(
        login_from(&two, "203.0.113.9", email, "d2").await.status,
        StatusCode::OK
    );
    let access = done.body["access_token"].as_str().unwrap().to_owned();
    let nets = crate::iptrust::send_from(
        &one,
        "203.0.113.1",
        reqwest::Method::GET,
        "/v1/me/trusted-networks",
        Some(&access),
        None,
    )
    .await;
    let net = nets.body["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["network"] == "203.0.113.0/24")
        .cloned()
        .unwrap();
    let r = crate::iptrust::send_from(
        &one,
        "203.0.113.1",
        reqwest::Method::DELETE,
        &format!("/v1/me/trusted-networks/{}", net["id"].as_str().unwrap()),
        Some(&access),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    // revoked on one: two holds the next login from there at once
    assert_eq!(
        login_from(&two, "203.0.113.9", email, "d2").await.status,
        StatusCode::ACCEPTED
    );
    one.stop().await;
    two.stop().await;
}

/// A grant of a custom role that an administrator deletes meanwhile is refused as an
/// unknown role, not answered 500: on PostgreSQL the grant's foreign-key check waits for
/// the deletion (held open by the test here) and then finds the role gone.
#[tokio::test]
async fn a_grant_racing_the_roles_deletion_is_refused_cleanly() {
    if !vaultpay_store::testing::backends().contains(&Backend::Postgres) {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let admin = app.admin_mfa().await.access;
    let id = id_of(&app.register("late.grant@example.com").await);
    let r = app
        .post(
            "/v1/admin/roles",
            Some(&admin),
            json!({ "name": "fleeting", "permissions": ["audit:read"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let mut deletion = app.auth_db().writer().begin().await.unwrap();
    for sql in [
        "DELETE FROM user_roles WHERE role = 'fleeting'",
        "DELETE FROM role_permissions WHERE role = 'fleeting'",
        "DELETE FROM roles WHERE name = 'fleeting'",
    ] {
        sqlx::query(sql).execute(&mut *deletion).await.unwrap();
    }
    let path = format!("/v1/admin/users/{id}/roles");
    let grant = app.post(&path, Some(&admin), json!({ "role": "fleeting" }));
    let commit = async {
        until_waiting_at(&app, "INSERT INTO user_roles").await;
        deletion.commit().await.unwrap();
    };
    let (r, ()) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures::future::join(grant, commit),
    )
    .await
    .expect("the grant neither waited nor answered");
    r.assert_problem(422, "role_unknown");
    assert_eq!(app.count_where("user_roles", "role = 'fleeting'").await, 0);
    app.stop().await;
}
