//! The thin management-API side of `setup`: read what the broker has into an
//! [`Actual`], and apply one [`Change`]. No decisions are made here.

use std::collections::BTreeMap;

use serde_json::Map;

use super::desired::{Desired, Perms};
use super::plan::{Actual, ActualExchange, ActualQueue, ActualUser, Change, arg_json};
use crate::broker::mgmt::{MgmtClient, MgmtError, QueueSpec};

/// Reads users (with a password check for the declared ones whose password is known),
/// permissions, exchanges, queues and bindings of `desired.vhost`.
pub async fn fetch(
    mgmt: &MgmtClient,
    admin_url: &str,
    desired: &Desired,
) -> Result<Actual, MgmtError> {
    let vhost = desired.vhost.as_str();
    let vhosts = mgmt.list_vhosts().await?;
    let mut actual = Actual {
        vhost_exists: vhosts.iter().any(|v| v == vhost),
        ..Actual::default()
    };

    for user in mgmt.list_users().await? {
        let password_matches = match desired
            .users
            .get(&user.name)
            .and_then(|u| u.password.as_ref())
        {
            Some(password) => {
                Some(password_matches(admin_url, &user.name, password.expose()).await?)
            }
            None => None,
        };
        actual.users.insert(
            user.name,
            ActualUser {
                tags: user.tags,
                password_matches,
            },
        );
    }

    if !actual.vhost_exists {
        return Ok(actual); // nothing in it yet
    }
    actual.permissions = permissions_of(mgmt, vhost).await?.unwrap_or_default();
    if desired.prune {
        for other in vhosts.iter().filter(|v| *v != vhost) {
            // A vhost deleted since the listing has no users to protect.
            if let Some(perms) = permissions_of(mgmt, other).await? {
                actual.users_elsewhere.extend(perms.into_keys());
            }
        }
    }
    for x in mgmt.list_exchanges(vhost).await? {
        actual.exchanges.insert(
            x.name,
            ActualExchange {
                kind: x.kind,
                durable: x.durable,
                auto_delete: x.auto_delete,
                internal: x.internal,
            },
        );
    }
    for q in mgmt.list_queues(vhost).await? {
        actual.queues.insert(
            q.name,
            ActualQueue {
                durable: q.durable,
                arguments: q.arguments,
            },
        );
    }
    actual.bindings = mgmt
        .list_bindings(vhost)
        .await?
        .into_iter()
        .filter(|b| !b.source.is_empty())
        .collect();
    actual.shovels = mgmt
        .list_shovel_definitions(vhost)
        .await?
        .into_iter()
        .collect();
    Ok(actual)
}

/// Permissions on `vhost` by user; `None` when the vhost is gone.
async fn permissions_of(
    mgmt: &MgmtClient,
    vhost: &str,
) -> Result<Option<BTreeMap<String, Perms>>, MgmtError> {
    match mgmt.list_permissions(vhost).await {
        Ok(list) => Ok(Some(
            list.into_iter()
                .map(|p| {
                    let perms = Perms {
                        configure: p.configure,
                        write: p.write,
                        read: p.read,
                    };
                    (p.user, perms)
                })
                .collect(),
        )),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `password` is already `user`'s. The API never returns a password, so this
/// logs in to the management API as that user (`GET /api/overview`): 200 means yes, and
/// so does RabbitMQ's 401 "Not management user" for an account without a management
/// tag — it is only given once the password was accepted; a wrong password gets
/// "Login failed". This keeps a second `setup` from rewriting every password (which is
/// harmless but would never print `no change`) without needing AMQP access to the vhost.
pub async fn password_matches(
    admin_url: &str,
    user: &str,
    password: &str,
) -> Result<bool, MgmtError> {
    let client = MgmtClient::new(admin_url, user, password)?;
    match client.overview().await {
        Ok(_) => Ok(true),
        Err(MgmtError::Status {
            status: 401,
            reason,
            ..
        }) => Ok(reason.contains("Not management user")),
        Err(e) => Err(e),
    }
}

/// What applying one change found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// The broker would not do it, for a reason the operator must act on (the text).
    Problem(String),
}

/// Applies one change to `vhost`. A [`Change::Problem`] does nothing.
pub async fn apply(mgmt: &MgmtClient, vhost: &str, change: &Change) -> Result<Applied, MgmtError> {
    if let Change::DeleteQueueIfEmpty(name) = change {
        return Ok(if mgmt.delete_queue_if_empty(vhost, name).await? {
            Applied::Done
        } else {
            Applied::Problem(format!(
                "queue {name} of the two-stage route of earlier versions still holds reports: \
                 let them drain (run the earlier route once more) or delete it, then run setup again"
            ))
        });
    }
    apply_one(mgmt, vhost, change).await.map(|()| Applied::Done)
}

async fn apply_one(mgmt: &MgmtClient, vhost: &str, change: &Change) -> Result<(), MgmtError> {
    match change {
        Change::CreateVhost(name) => mgmt.create_vhost(name).await,
        Change::CreateUser {
            name,
            tags,
            password,
            ..
        }
        | Change::UpdateUser {
            name,
            tags,
            password,
            ..
        } => {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            mgmt.put_user(name, password.expose(), &tags).await
        }
        Change::SetPermissions { user, perms, .. } => {
            mgmt.put_permissions(vhost, user, &perms.configure, &perms.write, &perms.read)
                .await
        }
        Change::DeclareExchange(name) => mgmt.declare_exchange(vhost, name, "topic", true).await,
        Change::DeclareQueue { name, arguments } => {
            let spec = QueueSpec {
                durable: true,
                arguments: arguments
                    .iter()
                    .map(|(k, v)| (k.clone(), arg_json(v)))
                    .collect::<Map<_, _>>(),
            };
            mgmt.declare_queue(vhost, name, &spec).await
        }
        Change::Bind(b) => mgmt.bind_queue(vhost, &b.exchange, &b.queue, &b.key).await,
        Change::BindExchange(b) => {
            mgmt.bind_exchange(vhost, &b.source, &b.destination, &b.key)
                .await
        }
        Change::PutShovel { name, spec, .. } => mgmt.put_shovel(vhost, name, spec).await,
        Change::DeleteShovel(name) => mgmt.delete_shovel(vhost, name).await,
        Change::DeleteQueueIfEmpty(_) => Ok(()),
        Change::Unbind(b) => mgmt.delete_binding(vhost, b).await,
        Change::DeleteQueue(name) => mgmt.delete_queue(vhost, name).await,
        Change::DeleteExchange(name) => mgmt.delete_exchange(vhost, name).await,
        Change::DeleteUser(name) => mgmt.delete_user(name).await,
        Change::Problem(_) => Ok(()),
    }
}
