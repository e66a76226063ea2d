//! The admin family: Ping (1), BrokerInfo (5) and Promote (7). Their requests are field-less
//! tables (an empty header is accepted too); Pong is field-less as well.

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::protocol::generated as fb;

/// What a broker says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    pub version: String,
    pub shards: u32,
    /// `SYNC_FLUSH` or `ASYNC_FLUSH`.
    pub flush_mode: String,
    /// `master` or `slave`.
    pub role: String,
    /// The effective configuration.
    pub config_toml: String,
    /// The broker's current epoch (0 from a broker that predates replication).
    pub epoch: u64,
    /// `host:port` of the master this broker follows; empty when it follows none.
    pub master_address: String,
    /// The replication mode, e.g. `ASYNC_MASTER` or `SYNC_MASTER/durable`; empty from a broker
    /// that predates replication.
    pub replication: String,
    /// `host:port` of each shard's listener, by shard index.
    pub shard_addresses: Vec<String>,
}

impl<'a> fb::BrokerInfoResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, info: &BrokerInfo) -> WIPOffset<Self> {
        let version = fbb.create_string(&info.version);
        let flush_mode = fbb.create_string(&info.flush_mode);
        let role = fbb.create_string(&info.role);
        let config_toml = fbb.create_string(&info.config_toml);
        let master_address = fbb.create_string(&info.master_address);
        let replication = fbb.create_string(&info.replication);
        let addrs: Vec<_> = info
            .shard_addresses
            .iter()
            .map(|a| fbb.create_string(a))
            .collect();
        let shard_addresses = fbb.create_vector(&addrs);
        let args = fb::BrokerInfoResponseArgs {
            version: Some(version),
            shards: info.shards,
            flush_mode: Some(flush_mode),
            role: Some(role),
            config_toml: Some(config_toml),
            epoch: info.epoch,
            master_address: Some(master_address),
            replication: Some(replication),
            shard_addresses: Some(shard_addresses),
        };
        fb::BrokerInfoResponse::create(fbb, &args)
    }

    /// Fields a broker that predates them does not send read as empty.
    pub(crate) fn decode(self) -> Result<BrokerInfo, String> {
        Ok(BrokerInfo {
            version: self.version().to_owned(),
            shards: self.shards(),
            flush_mode: self.flush_mode().to_owned(),
            role: self.role().to_owned(),
            config_toml: self.config_toml().to_owned(),
            epoch: self.epoch(),
            master_address: self.master_address().unwrap_or_default().to_owned(),
            replication: self.replication().unwrap_or_default().to_owned(),
            shard_addresses: self
                .shard_addresses()
                .map(|v| v.iter().map(str::to_owned).collect())
                .unwrap_or_default(),
        })
    }
}

impl<'a> fb::PromoteResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, epoch: &u64) -> WIPOffset<Self> {
        fb::PromoteResponse::create(fbb, &fb::PromoteResponseArgs { epoch: *epoch })
    }

    pub(crate) fn decode(self) -> Result<u64, String> {
        Ok(self.epoch())
    }
}
