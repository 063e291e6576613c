//! The signed baseline on disk (`shared_storage/file_hashes.json`): its body sorted by
//! path, the HMAC-SHA256 over the body's exact bytes under `state/integrity.key`, and the
//! key itself. A baseline whose HMAC does not verify is never trusted.

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::context::Context;
use crate::error::{Error, io_text};
use crate::fsutil;
use crate::security::events::{self, Event};
use crate::util::hex;

use super::{Entry, Files};

/// The baseline as read.
#[derive(Debug, Deserialize)]
pub(super) struct BodyRead {
    #[allow(dead_code)]
    version: u32,
    #[allow(dead_code)]
    created: DateTime<Utc>,
    #[serde(deserialize_with = "sorted_files")]
    pub(super) files: Files,
}

/// The baseline as written: `files` is a JSON object keyed by path, in path order.
#[derive(Debug, Serialize)]
struct BodyWrite<'a> {
    version: u32,
    created: DateTime<Utc>,
    #[serde(serialize_with = "files_as_object")]
    files: &'a [(String, Entry)],
}

fn files_as_object<S: serde::Serializer>(
    files: &&[(String, Entry)],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(files.iter().map(|(p, e)| (p, e)))
}

/// Reads the `files` object in file order (written sorted; sorted here if it is not).
fn sorted_files<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Files, D::Error> {
    struct InOrder;
    impl<'de> serde::de::Visitor<'de> for InOrder {
        type Value = Files;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of paths")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Files, A::Error> {
            let mut files = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(pair) = map.next_entry()? {
                files.push(pair);
            }
            Ok(files)
        }
    }
    let mut files = d.deserialize_map(InOrder)?;
    if !files.windows(2).all(|w| w[0].0 < w[1].0) {
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files.dedup_by(|a, b| a.0 == b.0);
    }
    Ok(files)
}

/// The file: the baseline's exact bytes and their HMAC, so verifying needs no
/// re-serialization.
#[derive(Debug, Deserialize)]
struct Signed<'a> {
    hmac: String,
    #[serde(borrow)]
    baseline: &'a serde_json::value::RawValue,
}

type HmacSha256 = hmac::Hmac<Sha256>;

/// HMAC-SHA256 (RFC 2104) of `msg` under `key`, through RustCrypto's `hmac` (the
/// companion of the `sha2` already used).
fn mac(key: &[u8], msg: &[u8]) -> HmacSha256 {
    use hmac::{KeyInit, Mac};
    // HMAC takes a key of any length: this never fails.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()));
    m.update(msg);
    m
}

/// The HMAC of `msg` under `key`, in hex.
fn hmac(key: &[u8], msg: &[u8]) -> String {
    use hmac::Mac;
    hex(&mac(key, msg).finalize().into_bytes())
}

/// Whether `expected` (hex) is the HMAC of `msg` under `key`, compared in constant time.
fn hmac_verifies(key: &[u8], msg: &[u8], expected: &str) -> bool {
    use hmac::Mac;
    crate::util::unhex(expected).is_some_and(|bytes| mac(key, msg).verify_slice(&bytes).is_ok())
}

pub(super) fn key(ctx: &Context) -> Result<Vec<u8>> {
    let path = ctx.layout.integrity_key();
    let key = std::fs::read(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the integrity key {}: {}. Try: cr0sync init",
            path.display(),
            io_text(&e)
        )
    })?;
    Ok(key.trim_ascii().to_vec())
}

pub(super) fn write_baseline(
    ctx: &Context,
    key: &[u8],
    files: &Files,
    now: DateTime<Utc>,
) -> Result<()> {
    let body = serde_json::to_string(&BodyWrite {
        version: 1,
        created: now,
        files,
    })?;
    let mac = hmac(key, body.as_bytes());
    // Compact: a large tree's baseline parses faster (`jq .` shows it indented).
    let mut bytes = format!("{{\"hmac\":\"{mac}\",\"baseline\":{body}}}").into_bytes();
    bytes.push(b'\n');
    let path = ctx.layout.file_hashes();
    fsutil::atomic_write(&path, &bytes, ctx.perms.file_mode, &ctx.perms)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads and verifies the baseline; an unsigned or edited one is an `Error::Security`.
pub(super) fn load_baseline(ctx: &Context, key: &[u8]) -> Result<Files> {
    let path = ctx.layout.file_hashes();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no integrity baseline yet ({}). Try: cr0sync security baseline",
            path.display()
        ),
        Err(e) => anyhow::bail!("cannot read {}: {}", path.display(), io_text(&e)),
    };
    let untrusted = |why: &str| -> anyhow::Error {
        let event = Event {
            time: crate::ops::clock::now(),
            kind: "integrity.baseline_untrusted".into(),
            path: Some(path.display().to_string()),
            detail: why.into(),
        };
        // The check fails with the error below whatever happens here; the event is the
        // second copy of the news.
        if let Err(e) = events::append(ctx, &[event]) {
            log::warn!("{e:#} (the untrusted baseline is reported by the failed check)");
        }
        Error::Security(format!(
            "the integrity baseline {} is {why}; it is not trusted. Try: find out who changed \
             it, then record a new one with cr0sync security baseline",
            path.display()
        ))
        .into()
    };
    let Ok(signed) = serde_json::from_slice::<Signed>(&bytes) else {
        return Err(untrusted("not a signed baseline"));
    };
    if !hmac_verifies(key, signed.baseline.get().as_bytes(), &signed.hmac) {
        return Err(untrusted("edited (its HMAC does not verify)"));
    }
    let body: BodyRead = serde_json::from_str(signed.baseline.get())
        .map_err(|_| untrusted("signed but unreadable"))?;
    Ok(body.files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        let want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert_eq!(hmac(b"Jefe", b"what do ya want for nothing?"), want);
        assert!(hmac_verifies(
            b"Jefe",
            b"what do ya want for nothing?",
            want
        ));
        assert!(!hmac_verifies(
            b"Jefe",
            b"what do ya want for nothing!",
            want
        ));
        assert!(!hmac_verifies(
            b"Jefe",
            b"what do ya want for nothing?",
            "5bdc"
        ));
        assert!(!hmac_verifies(
            b"Jefe",
            b"what do ya want for nothing?",
            "zz"
        ));
        // A key longer than a block (RFC 4231 test case 6).
        assert_eq!(
            hmac(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_baseline_with_unsorted_paths_is_read_sorted() {
        let e = serde_json::to_value(super::super::tests::file(1)).unwrap();
        let text = format!(
            r#"{{"version":1,"created":"2026-01-01T00:00:00Z","files":{{"/w/b":{e},"/w/a":{e},"/w/c":{e}}}}}"#
        );
        let body: BodyRead = serde_json::from_str(&text).unwrap();
        let paths: Vec<&str> = body.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/w/a", "/w/b", "/w/c"]);
    }
}
