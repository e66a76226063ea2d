//! `ringmq admin cluster`: a broker cluster as etcd holds it, for a person (and a test).

use std::collections::BTreeMap;
use std::time::Duration;

use ringmq::cluster::etcd::Etcd;
use ringmq::cluster::records::{groups_prefix, unix_ms, InSyncRecord, MasterRecord, MemberRecord};

pub fn show(endpoints: &str, cluster: &str) -> Result<(), String> {
    let list = endpoints.strip_prefix("etcd=").unwrap_or(endpoints);
    let etcd = Etcd::new(&Etcd::parse_endpoints(list), Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    let prefix = groups_prefix(cluster);
    let kvs = etcd.get_prefix(&prefix).map_err(|e| e.to_string())?;
    // group -> (master key, in-sync record, members)
    type Group = (
        Option<(MasterRecord, u64, u64)>,
        Option<InSyncRecord>,
        Vec<MemberRecord>,
    );
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for kv in &kvs {
        let Some(rest) = kv.key.strip_prefix(&prefix) else {
            continue;
        };
        let Some((group, what)) = rest.split_once('/') else {
            continue;
        };
        let entry = groups.entry(group.to_string()).or_default();
        match what {
            "master" => {
                if let Ok(m) = serde_json::from_slice(&kv.value) {
                    entry.0 = Some((m, kv.create_revision, kv.lease));
                }
            }
            "in_sync" => entry.1 = serde_json::from_slice(&kv.value).ok(),
            w if w.starts_with("members/") => {
                if let Ok(m) = serde_json::from_slice(&kv.value) {
                    entry.2.push(m);
                }
            }
            _ => {}
        }
    }
    if groups.is_empty() {
        println!("cluster {cluster}: no broker group in etcd ({list})");
        return Ok(());
    }
    let now = unix_ms();
    for (group, (master, in_sync, members)) in groups {
        let (node, addr, term, lease) = match &master {
            Some((m, term, lease)) => {
                // How long the master's lease would last if it stopped renewing now.
                let ttl = match etcd.time_to_live(*lease) {
                    Ok(Some((left, granted))) => format!("{left}/{granted}s"),
                    Ok(None) => "gone".to_string(),
                    Err(_) => "?".to_string(),
                };
                (
                    m.node.as_str(),
                    m.addr.as_str(),
                    term.to_string(),
                    format!("{lease:x} lease_ttl={ttl}"),
                )
            }
            None => ("none", "-", "-".to_string(), "-".to_string()),
        };
        let in_sync = in_sync.map_or("-".to_string(), |r| {
            if r.nodes.is_empty() {
                "none".to_string()
            } else {
                r.nodes.join(",")
            }
        });
        println!(
            "group={group} master={node} addr={addr} term={term} lease={lease} in_sync={in_sync}"
        );
        for m in members {
            println!(
                "  member={} addr={} role={} epoch={} log_end={} following={} streaming={} \
                 lag_bytes={} lag_ms={} updated_ms_ago={}",
                m.node,
                m.addr,
                m.role,
                m.epoch,
                m.log_end,
                m.following.as_deref().unwrap_or("-"),
                m.streaming,
                m.lag_bytes,
                m.lag_ms,
                now.saturating_sub(m.updated_unix_ms)
            );
        }
    }
    Ok(())
}
