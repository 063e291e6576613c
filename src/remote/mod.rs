//! Peers on other hosts, reached over ssh by running `cr0sync serve` there (the rsync and
//! Unison model: no daemon, no port, no credentials of cr0sync's own).
//!
//! - `proto`: the framed, versioned wire format and every request and response.
//! - `serve`: the remote end (`cr0sync serve [--allow DIR]...`).
//! - `client`: the local end: `ssh://` paths, one connection per host per job run, and
//!   one clear line per failure naming the host.
//!
//! Served: database peers (`db/sync/remote.rs` on the local side) and file-tree peers
//! (`files/side.rs`). Log sources on other hosts are not served yet (a configuration that
//! names one is refused with that line).

pub(crate) mod client;
pub(crate) mod proto;
pub(crate) mod serve;
