//! Control requests: ping, topics, routes, broker info, queue and broker statistics,
//! promotion, consumer-group settings and descriptions, operator commits, open transactions.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::connection::{Connection, DEFAULT_REQUEST_TIMEOUT};
use crate::client::ClientError;
use crate::protocol::{
    BrokerInfo, CommitOffsetsRequest, CommittedOffset, Durability, GroupDescription, GroupSettings,
    Membership, QueueStat, Request, Response, RouteTable, ShardStats, TopicInfo, TransactionList,
};

/// A control client over one connection (any shard's port works: the broker forwards).
pub struct Admin {
    conn: Connection,
    timeout: Duration,
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Unexpected(format!("{r:?}"))
}

impl Admin {
    /// Connects to `addr`, or to the first broker of a comma-separated list that answers
    /// (the error names every address tried). Requests then go to that broker only: an
    /// admin request (a promotion, say) is about one broker, so it never fails over.
    pub fn connect(addr: &str) -> Result<Admin, ClientError> {
        let addrs = crate::client::cluster::parse_brokers(addr);
        let mut failures = Vec::new();
        for a in &addrs {
            match Connection::connect(a) {
                Ok(conn) => {
                    return Ok(Admin {
                        conn,
                        timeout: DEFAULT_REQUEST_TIMEOUT,
                    })
                }
                Err(e) => failures.push(e),
            }
        }
        Err(crate::client::cluster::connect_error(&addrs, failures))
    }

    fn call(&self, request: Request) -> Result<Response, ClientError> {
        Ok(self.conn.call(&request, Bytes::new(), self.timeout)?.0)
    }

    /// Round-trip time of one ping.
    pub fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.call(Request::Ping)? {
            Response::Pong => Ok(start.elapsed()),
            r => Err(unexpected(r)),
        }
    }

    /// Creates a topic; creating an existing topic with the same queue count succeeds.
    pub fn create_topic(&self, name: &str, queues: u32) -> Result<(), ClientError> {
        match self.call(Request::CreateTopic {
            name: name.to_string(),
            queues,
        })? {
            Response::TopicCreated { .. } => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// The open transactions of every shard (index = shard).
    pub fn transactions(&self) -> Result<Vec<TransactionList>, ClientError> {
        let shards = self.broker_info()?.shards;
        (0..shards)
            .map(
                |shard| match self.call(Request::ListTransactions { shard })? {
                    Response::Transactions(t) => Ok(t),
                    r => Err(unexpected(r)),
                },
            )
            .collect()
    }

    /// Grows a topic to `queues` queues (refused if it has more).
    pub fn alter_topic(&self, name: &str, queues: u32) -> Result<(), ClientError> {
        match self.call(Request::AlterTopic {
            name: name.to_string(),
            queues,
        })? {
            Response::TopicAltered { .. } => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// Deletes a topic; returns the queue count it had (0: it was deleted before).
    pub fn delete_topic(&self, name: &str) -> Result<u32, ClientError> {
        match self.call(Request::DeleteTopic {
            name: name.to_string(),
        })? {
            Response::TopicDeleted { queues, .. } => Ok(queues),
            r => Err(unexpected(r)),
        }
    }

    pub fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        match self.call(Request::ListTopics)? {
            Response::Topics(t) => Ok(t),
            r => Err(unexpected(r)),
        }
    }

    pub fn route(&self, topic: &str) -> Result<RouteTable, ClientError> {
        match self.call(Request::GetRoute {
            topic: topic.to_string(),
        })? {
            Response::Route(r) => Ok(r),
            r => Err(unexpected(r)),
        }
    }

    pub fn broker_info(&self) -> Result<BrokerInfo, ClientError> {
        match self.call(Request::BrokerInfo)? {
            Response::BrokerInfo(i) => Ok(i),
            r => Err(unexpected(r)),
        }
    }

    pub fn queue_stats(&self, topic: &str) -> Result<Vec<QueueStat>, ClientError> {
        match self.call(Request::QueueStats {
            topic: topic.to_string(),
        })? {
            Response::QueueStats(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// Counters, watermarks and replication state ([`ShardStats::replication`]) of every
    /// shard.
    pub fn broker_stats(&self) -> Result<Vec<ShardStats>, ClientError> {
        match self.call(Request::BrokerStats)? {
            Response::BrokerStats(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// Makes the connected broker a master and returns the epoch it entered. Promotion is per
    /// broker, so this goes to the broker at the address connected to, not to a shard owner.
    pub fn promote(&self) -> Result<u64, ClientError> {
        match self.call(Request::Promote)? {
            Response::Promoted { epoch } => Ok(epoch),
            r => Err(unexpected(r)),
        }
    }

    /// Creates a consumer group or changes its settings (0 for the consume timeout: the
    /// default); returns the settings in force.
    pub fn create_group(
        &self,
        group: &str,
        max_reconsume_times: u32,
        consume_timeout_ms: u32,
    ) -> Result<GroupSettings, ClientError> {
        match self.call(Request::CreateGroup(GroupSettings {
            group: group.to_string(),
            max_reconsume_times,
            consume_timeout_ms,
        }))? {
            Response::GroupCreated(g) => Ok(g),
            r => Err(unexpected(r)),
        }
    }

    pub fn describe_group(&self, group: &str) -> Result<GroupDescription, ClientError> {
        match self.call(Request::DescribeGroup {
            group: group.to_string(),
        })? {
            Response::GroupDescribed(d) => Ok(d),
            r => Err(unexpected(r)),
        }
    }

    /// An operator commit: moves the group's offset of queues no member holds (the
    /// dead-letter queue's redrive cursor).
    pub fn commit_offsets(
        &self,
        group: &str,
        offsets: Vec<CommittedOffset>,
    ) -> Result<Durability, ClientError> {
        match self.call(Request::CommitOffsets(CommitOffsetsRequest {
            who: Membership {
                group: group.to_string(),
                member: String::new(),
                generation: 0,
            },
            offsets,
        }))? {
            Response::OffsetsCommitted { durability, .. } => Ok(durability),
            r => Err(unexpected(r)),
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}
