//! `ringmq admin cluster`: a broker cluster as etcd holds it, for a person (and a test).

use std::collections::BTreeMap;
use std::time::Duration;

use std::time::Instant;

use clap::Subcommand;
use ringmq::client::Admin;
use ringmq::cluster::etcd::Etcd;
use ringmq::cluster::records::{
    groups_prefix, master_route_key, topic_key, topics_prefix, unix_ms, InSyncRecord, MasterRecord,
    MasterRoute, MemberRecord, TopicRecord,
};
use ringmq::protocol::validate_topic_name;
use ringmq::shard::topics::MAX_QUEUES_PER_TOPIC;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Create a cluster topic: its queues spread over broker groups (queue q goes to group
    /// groups[q % n]); every broker of the cluster routes it, each group's master creates it.
    /// Waits until every group's master has it. Idempotent for the same queues and groups.
    TopicCreate {
        name: String,
        #[arg(long, default_value_t = 8)]
        queues: u32,
        /// The groups, in order `g1,g2,..` [default: every group in etcd, sorted by name]
        #[arg(long)]
        groups: Option<String>,
        /// How long to wait for the groups' masters to have it (0: do not wait)
        #[arg(long, default_value_t = 15)]
        wait_secs: u64,
    },
}

fn connect(endpoints: &str) -> Result<(Etcd, &str), String> {
    let list = endpoints.strip_prefix("etcd=").unwrap_or(endpoints);
    let etcd = Etcd::new(&Etcd::parse_endpoints(list), Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    Ok((etcd, list))
}

pub fn run(endpoints: &str, cluster: &str, command: &ClusterCommand) -> Result<(), String> {
    let (etcd, _) = connect(endpoints)?;
    match command {
        ClusterCommand::TopicCreate {
            name,
            queues,
            groups,
            wait_secs,
        } => create_topic(&etcd, cluster, name, *queues, groups.as_deref(), *wait_secs),
    }
}

fn create_topic(
    etcd: &Etcd,
    cluster: &str,
    name: &str,
    queues: u32,
    groups: Option<&str>,
    wait_secs: u64,
) -> Result<(), String> {
    validate_topic_name(name).map_err(|e| e.to_string())?;
    if queues == 0 || queues > MAX_QUEUES_PER_TOPIC {
        return Err(format!(
            "--queues {queues}: must be 1..={MAX_QUEUES_PER_TOPIC}"
        ));
    }
    let groups: Vec<String> = match groups {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect(),
        None => known_groups(etcd, cluster)?,
    };
    if groups.is_empty() {
        return Err(format!(
            "cluster {cluster} has no broker group in etcd yet: start its brokers, or name \
             the groups with --groups"
        ));
    }
    if let Some(bad) = groups
        .iter()
        .find(|g| g.contains('/') || g.chars().any(char::is_whitespace))
    {
        return Err(format!("--groups: {bad:?} is not a group name"));
    }
    let record = TopicRecord { queues, groups };
    let value = serde_json::to_vec(&record).expect("a record serializes");
    match etcd
        .create_if_absent(&topic_key(cluster, name), &value, None)
        .map_err(|e| e.to_string())?
    {
        Ok(_) => println!(
            "cluster topic {name}: {queues} queue(s) over group(s) {}",
            record.groups.join(",")
        ),
        Err(existing) => match serde_json::from_slice::<TopicRecord>(&existing.value) {
            Ok(r) if r == record => println!("cluster topic {name} exists with the same placement"),
            Ok(r) => {
                return Err(format!(
                    "cluster topic {name} exists with {} queue(s) over group(s) {}",
                    r.queues,
                    r.groups.join(",")
                ))
            }
            Err(e) => return Err(format!("{}: holds no topic record ({e})", existing.key)),
        },
    }
    if wait_secs == 0 {
        return Ok(());
    }
    // Each group's master creates it when it sees the record: wait for all of them.
    let deadline = Instant::now() + Duration::from_secs(wait_secs);
    let mut pending: Vec<&String> = record.groups.iter().collect();
    pending.dedup();
    loop {
        let mut why = Vec::new();
        let mut still = Vec::new();
        for group in pending {
            match group_has_topic(etcd, cluster, group, name) {
                Ok(addr) => println!("  group {group}: ready at {addr}"),
                Err(e) => {
                    why.push(format!("group {group}: {e}"));
                    still.push(group);
                }
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the topic is in etcd, but not yet served by every group ({}); each group's \
                 master creates it when it is elected",
                why.join("; ")
            ));
        }
        pending = still;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every group with keys in etcd, sorted by name.
fn known_groups(etcd: &Etcd, cluster: &str) -> Result<Vec<String>, String> {
    let prefix = groups_prefix(cluster);
    let kvs = etcd.get_prefix(&prefix).map_err(|e| e.to_string())?;
    let mut groups: Vec<String> = kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(&prefix)?.split_once('/'))
        .map(|(g, _)| g.to_string())
        .collect();
    groups.sort();
    groups.dedup();
    Ok(groups)
}

/// The group master's address once it lists `topic`.
fn group_has_topic(etcd: &Etcd, cluster: &str, group: &str, topic: &str) -> Result<String, String> {
    let kv = etcd
        .get(&master_route_key(cluster, group))
        .map_err(|e| e.to_string())?
        .ok_or("no master serves it now")?;
    let route: MasterRoute = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
    let addr = route.shards.first().ok_or("its master names no address")?;
    let topics = Admin::connect(addr)
        .and_then(|a| a.list_topics())
        .map_err(|e| format!("{addr}: {e}"))?;
    if topics.iter().any(|t| t.name == topic) {
        Ok(addr.clone())
    } else {
        Err(format!("its master {addr} has not created it yet"))
    }
}

pub fn show(endpoints: &str, cluster: &str) -> Result<(), String> {
    let (etcd, list) = connect(endpoints)?;
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
    let topics = etcd
        .get_prefix(&topics_prefix(cluster))
        .map_err(|e| e.to_string())?;
    for kv in topics {
        let name = kv
            .key
            .strip_prefix(&topics_prefix(cluster))
            .unwrap_or(&kv.key);
        match serde_json::from_slice::<TopicRecord>(&kv.value) {
            Ok(r) => println!(
                "topic={name} queues={} groups={}",
                r.queues,
                r.groups.join(",")
            ),
            Err(e) => println!("topic={name} unreadable: {e}"),
        }
    }
    Ok(())
}
