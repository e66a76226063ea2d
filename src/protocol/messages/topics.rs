//! The topics family: CreateTopic (2), ListTopics (3) and GetRoute (4). Names are checked by
//! the broker against [`validate_topic_name`](crate::protocol::validate_topic_name), not here:
//! the codec carries any string so that the refusal can say what was wrong.

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::protocol::generated as fb;

/// One topic in a ListTopics response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub queues: u32,
}

/// Which shard owns a queue and where that shard listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRoute {
    pub queue: u32,
    pub shard: u32,
    /// `host:port` of the owning shard's listener; empty for a queue of a cluster topic whose
    /// broker group has no master now.
    pub address: String,
    /// A topic spread over the broker groups of a cluster on etcd: the group that serves the
    /// queue (`None` for a topic of one broker).
    pub group: Option<String>,
}

/// The route table of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    pub topic: String,
    pub queues: Vec<QueueRoute>,
}

/// CreateTopic's request and its response carry the same two fields: the name and the queue
/// count (the response echoes what was created).
macro_rules! name_and_queues {
    ($table:ident, $args:ident) => {
        impl<'a> fb::$table<'a> {
            pub(crate) fn encode(
                fbb: &mut FlatBufferBuilder<'a>,
                name: &str,
                queues: &u32,
            ) -> WIPOffset<Self> {
                let name = fbb.create_string(name);
                let args = fb::$args {
                    name: Some(name),
                    queues: *queues,
                };
                fb::$table::create(fbb, &args)
            }

            pub(crate) fn decode(self) -> Result<(String, u32), String> {
                Ok((self.name().to_owned(), self.queues()))
            }
        }
    };
}

name_and_queues!(CreateTopicRequest, CreateTopicRequestArgs);
name_and_queues!(TopicCreatedResponse, TopicCreatedResponseArgs);
name_and_queues!(AlterTopicRequest, AlterTopicRequestArgs);
name_and_queues!(AlterTopicResponse, AlterTopicResponseArgs);
name_and_queues!(DeleteTopicResponse, DeleteTopicResponseArgs);

impl<'a> fb::DeleteTopicRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, name: &str) -> WIPOffset<Self> {
        let name = fbb.create_string(name);
        fb::DeleteTopicRequest::create(fbb, &fb::DeleteTopicRequestArgs { name: Some(name) })
    }

    pub(crate) fn decode(self) -> Result<String, String> {
        Ok(self.name().to_owned())
    }
}

impl<'a> fb::ListTopicsResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, topics: &[TopicInfo]) -> WIPOffset<Self> {
        let items: Vec<_> = topics
            .iter()
            .map(|t| {
                let name = fbb.create_string(&t.name);
                let args = fb::TopicInfoArgs {
                    name: Some(name),
                    queues: t.queues,
                };
                fb::TopicInfo::create(fbb, &args)
            })
            .collect();
        let topics = fbb.create_vector(&items);
        let args = fb::ListTopicsResponseArgs {
            topics: Some(topics),
        };
        fb::ListTopicsResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<Vec<TopicInfo>, String> {
        let topics = self.topics().into_iter().flatten();
        Ok(topics
            .map(|t| TopicInfo {
                name: t.name().to_owned(),
                queues: t.queues(),
            })
            .collect())
    }
}

impl<'a> fb::GetRouteRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, topic: &str) -> WIPOffset<Self> {
        let topic = fbb.create_string(topic);
        fb::GetRouteRequest::create(fbb, &fb::GetRouteRequestArgs { topic: Some(topic) })
    }

    pub(crate) fn decode(self) -> Result<String, String> {
        Ok(self.topic().to_owned())
    }
}

impl<'a> fb::RouteResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, route: &RouteTable) -> WIPOffset<Self> {
        let items: Vec<_> = route
            .queues
            .iter()
            .map(|q| {
                let address = fbb.create_string(&q.address);
                let group = q.group.as_deref().map(|g| fbb.create_string(g));
                let args = fb::QueueRouteArgs {
                    queue: q.queue,
                    shard: q.shard,
                    address: Some(address),
                    group,
                };
                fb::QueueRoute::create(fbb, &args)
            })
            .collect();
        let queues = fbb.create_vector(&items);
        let topic = fbb.create_string(&route.topic);
        let args = fb::RouteResponseArgs {
            topic: Some(topic),
            queues: Some(queues),
        };
        fb::RouteResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<RouteTable, String> {
        let queues = self.queues().into_iter().flatten();
        Ok(RouteTable {
            topic: self.topic().to_owned(),
            queues: queues
                .map(|q| QueueRoute {
                    queue: q.queue(),
                    shard: q.shard(),
                    address: q.address().to_owned(),
                    group: q.group().map(str::to_owned),
                })
                .collect(),
        })
    }
}
