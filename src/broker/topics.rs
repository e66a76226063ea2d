//! Topics: create, alter and delete (on shard 0, through the topic log), list, route; and the
//! topic/queue checks other services use.

use crate::broker::topic_log;
use crate::broker::{Result, ServiceError, Services};
use crate::protocol::{ErrorCode, QueueRoute, Response, RouteTable, TopicInfo};
use crate::shard::topics::TopicChange;

fn topic_not_found(topic: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::TopicNotFound,
        format!("topic {topic:?} does not exist (create it with `ringmq admin topic create`)"),
    )
}

/// How many queues `topic` has, or TOPIC_NOT_FOUND.
pub fn queue_count(s: &Services, topic: &str) -> Result<u32> {
    s.shard
        .topic(topic)
        .map(|m| m.queues)
        .ok_or_else(|| topic_not_found(topic))
}

/// TOPIC_NOT_FOUND or QUEUE_NOT_FOUND unless `topic` has a queue `queue`.
pub fn check_queue(s: &Services, topic: &str, queue: u32) -> Result<()> {
    let queues = queue_count(s, topic)?;
    if queue >= queues {
        return Err(ServiceError::new(
            ErrorCode::QueueNotFound,
            format!("topic {topic:?} has queues 0..{queues}; there is no queue {queue}"),
        ));
    }
    Ok(())
}

/// NOT_MASTER unless this broker's group serves `queue` of `topic` (always so for a topic
/// that is not a cluster topic, or without a cluster). A client with an old route hears whom
/// to ask; a message for another group's queue stored here would never reach its consumers.
pub fn check_served_here(s: &Services, topic: &str, queue: u32) -> Result<()> {
    let Some(view) = s.shard.cluster_routes() else {
        return Ok(());
    };
    if view.served_here(topic, queue) {
        return Ok(());
    }
    let owner = view
        .owner(topic, queue)
        .expect("a cluster topic has an owner");
    let at = owner.at.map_or("no master now".to_string(), |(_, addr)| {
        format!("master at {addr}")
    });
    Err(ServiceError::new(
        ErrorCode::NotMaster,
        format!(
            "queue {queue} of cluster topic {topic:?} is served by broker group {} ({at}), \
             not by group {}: ask for routes again",
            owner.group, view.group
        ),
    ))
}

/// INVALID_ARGUMENT for a cluster topic whose queues other broker groups serve too: `what`
/// (consumer groups, transactions) is coordinated on one broker and cannot span groups yet.
pub fn check_one_group(s: &Services, topic: &str, what: &str) -> Result<()> {
    let Some(view) = s.shard.cluster_routes() else {
        return Ok(());
    };
    match view.placement(topic) {
        Some(p) if p.groups.iter().any(|g| *g != view.group) => Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            format!(
                "{what} on cluster topic {topic:?}, spread over broker groups {}, are not \
                 built yet (their coordinators are per broker); use a topic of one group",
                p.groups.join(",")
            ),
        )),
        _ => Ok(()),
    }
}

/// INVALID_TOPIC for the broker's own topics (`%RETRY%<group>`, `%DLQ%<group>`, `%SYS%...`):
/// clients neither create nor produce to them.
pub fn check_not_reserved(topic: &str) -> Result<()> {
    if topic.starts_with('%') {
        return Err(ServiceError::new(
            ErrorCode::InvalidTopic,
            format!("{topic:?}: names starting with % are the broker's own topics"),
        ));
    }
    Ok(())
}

/// AlterTopic, on shard 0: grows a topic's queue count. The new queues spread over the shards
/// like a new topic's (`shard_of` of their numbers); the existing ones stay where they are.
pub async fn alter(s: &Services, name: &str, queues: u32) -> Result<Response> {
    s.check_writable("alter topics")?;
    check_not_reserved(name)?;
    let change = TopicChange::Grow {
        name: name.to_string(),
        queues,
    };
    topic_log::change(s, change).await?;
    Ok(Response::TopicAltered {
        name: name.to_string(),
        queues,
    })
}

/// Runs on shard 0 (the dispatcher forwards it there).
pub async fn create(s: &Services, name: &str, queues: u32) -> Result<Response> {
    // A slave's topics are copied from its master; a local one would diverge.
    s.check_writable("create topics")?;
    check_not_reserved(name)?;
    let change = TopicChange::Create {
        name: name.to_string(),
        queues,
    };
    topic_log::change(s, change).await?;
    Ok(Response::TopicCreated {
        name: name.to_string(),
        queues,
    })
}

/// DeleteTopic, on shard 0: the topic is gone for producers and consumers at once (TOPIC_NOT_
/// FOUND); its messages stay in the log until retention drops their segments (the log is
/// shared by every topic of a shard), and its name stays taken (a tombstone) meanwhile.
/// Answered with the queue count it had; deleting a deleted topic succeeds again.
pub async fn delete(s: &Services, name: &str) -> Result<Response> {
    s.check_writable("delete topics")?;
    check_not_reserved(name)?;
    let queues = match s.shard.topics().get(name) {
        Some(m) => m.queues,
        None if s.shard.topics().is_deleted(name) => 0,
        None => return Err(topic_not_found(name)),
    };
    let change = TopicChange::Delete {
        name: name.to_string(),
    };
    topic_log::change(s, change).await?;
    Ok(Response::TopicDeleted {
        name: name.to_string(),
        queues,
    })
}

pub fn list(s: &Services) -> Response {
    Response::Topics(
        s.shard
            .topics()
            .iter()
            .map(|(name, meta)| TopicInfo {
                name: name.to_string(),
                queues: meta.queues,
            })
            .collect(),
    )
}

/// The route of `topic`: for a cluster topic from the cluster's routes (every broker of the
/// cluster answers it, whichever groups serve the topic), else this broker's shards.
pub fn route(s: &Services, topic: &str) -> Result<Response> {
    if let Some(view) = s.shard.cluster_routes() {
        if let Some(placement) = view.placement(topic) {
            let queues = (0..placement.queues)
                .map(|queue| {
                    let owner = view.owner(topic, queue).expect("a placed topic");
                    let (shard, address) = owner.at.unwrap_or((0, ""));
                    QueueRoute {
                        queue,
                        shard: shard as u32,
                        address: address.to_string(),
                        group: Some(owner.group.to_string()),
                    }
                })
                .collect();
            return Ok(Response::Route(RouteTable {
                topic: topic.to_string(),
                queues,
            }));
        }
    }
    let queues = queue_count(s, topic)?;
    Ok(Response::Route(RouteTable {
        topic: topic.to_string(),
        queues: (0..queues)
            .map(|queue| {
                let shard = s.shard.owner_of(topic, queue);
                QueueRoute {
                    queue,
                    shard: shard as u32,
                    address: s.shard.addresses[shard].clone(),
                    group: None,
                }
            })
            .collect(),
    }))
}
